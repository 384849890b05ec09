/* guestos boot: Multiboot v1 header (a.out kludge, so QEMU's -kernel and
 * pyvmm load the same flat image), 32-bit entry, switch to 64-bit long
 * mode with an identity map of the first GiB (2 MiB pages), then kmain.
 * Linked at 1 MiB by guestos.ld; physical == virtual for the kernel. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010003          /* page-align, memory info, a.out kludge */

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .long mb_header, _load_start, _load_end, _bss_end, _start

    .section .boot, "ax"
    .code32
    .globl _start
_start:
    cli
    movl %eax, mb_magic
    movl %ebx, mb_info
    movl $boot_stack_top, %esp
    /* kernel_pd: 512 x 2 MiB identity pages, supervisor only */
    movl $kernel_pd, %edi
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                    /* present, writable, 2 MiB */
    movl %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b
    movl $kernel_pd, %eax
    orl $0x3, %eax
    movl %eax, kernel_pdpt
    movl $kernel_pdpt, %eax
    orl $0x3, %eax
    movl %eax, kernel_pml4
    /* PAE, long mode, paging (with write protect) */
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $kernel_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl mb_magic, %edi
    movl mb_info, %esi
    call kmain
2:  cli
    hlt
    jmp 2b

    .data
    .align 16
    .globl gdt
gdt:
    /* accessed bits preset: no descriptor write when a selector is loaded */
    .quad 0                             /* 0x00 null */
    .quad 0x00209B0000000000            /* 0x08 kernel code, 64-bit */
    .quad 0x0000930000000000            /* 0x10 kernel data */
    .quad 0x0000F30000000000            /* 0x18 user data (0x1b) */
    .quad 0x0020FB0000000000            /* 0x20 user code (0x23) */
    .quad 0, 0                          /* 0x28 TSS, filled by cpu.c */
gdt_end:
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
mb_magic: .long 0
mb_info:  .long 0

    .bss
    .align 4096
    .globl kernel_pml4, kernel_pdpt, kernel_pd
kernel_pml4: .skip 4096
kernel_pdpt: .skip 4096
kernel_pd:   .skip 4096
    .align 16
boot_stack:  .skip 16384
    .globl boot_stack_top
boot_stack_top:
    .section .note.GNU-stack, "", @progbits
