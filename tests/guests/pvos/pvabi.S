# Conformance guest for pyvmm's hypercall ABI (docs/paravirt.md).
# 32-bit Multiboot kernel, linked at 1 MiB with tests/guests/guest.ld.
# Prints one "name=ok|bad" line per check over COM1, then shuts down through
# the hypercall (status 7: exit code 15).  Without the pyvmm signature it
# prints "sig=none" and exits through isa-debug-exit (port 0xf4) with 3.
    .equ MB_MAGIC, 0x1BADB002
    .equ MB_FLAGS, 0x00000003
    .equ COM1, 0x3f8
    .equ MSR_HCPAGE, 0x40000200
    .equ OP_VERSION, 0
    .equ OP_CONSOLE, 1
    .equ OP_SHARED, 2
    .equ OP_IRQ_ENABLE, 3
    .equ OP_MMU, 4
    .equ OP_CR3, 5
    .equ OP_FLUSH, 6
    .equ OP_TIMER, 7
    .equ OP_TIME, 8
    .equ OP_HALT, 9
    .equ OP_YIELD, 10
    .equ OP_SHUTDOWN, 11
    .equ OP_UPDATE_VA, 12
    .equ UVA_INVLPG, 1
    .equ EFAULT, -14
    .equ EINVAL, -22
    .equ ENOSYS, -38
    .equ TESTVA, 0x400000

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    # --- discovery: search 0x40000000 + k*0x100 for the signature
    movl $0x40000000, %ebp
1:  movl %ebp, %eax
    cpuid
    cmpl $0x4d567950, %ebx          # "PyVM"
    jne 2f
    cmpl $0x5679504d, %ecx          # "MPyV"
    jne 2f
    cmpl $0x79504d4d, %edx          # "MMPy"
    je 3f
2:  addl $0x100, %ebp
    cmpl $0x40010000, %ebp
    jb 1b
    movl $m_signone, %esi
    call puts
    movl $3, %eax
    outl %eax, $0xf4
    hlt
3:  movl $m_sig, %esi
    call puts
    leal 1(%ebp), %eax
    cpuid
    cmpl $0x10001, %eax             # ABI 1.1 (feature bit 6, update_va, only where bit 2 is offered)
    sete %al
    movl $m_cpuidver, %esi
    call check
    # --- install the hypercall page, read the MSR back
    movl $MSR_HCPAGE, %ecx
    movl $hcpage, %eax
    orl $1, %eax
    xorl %edx, %edx
    wrmsr
    rdmsr
    cmpl $hcpage+1, %eax
    sete %al
    movl $m_msr, %esi
    call check
    # --- version
    movl $OP_VERSION, %eax
    call hcpage
    cmpl $0x10001, %eax
    sete %al
    movl $m_version, %esi
    call check
    # --- console write (good, bad address, too long)
    movl $OP_CONSOLE, %eax
    movl $m_hello, %ebx
    movl $m_hello_len, %ecx
    call hcpage
    cmpl $m_hello_len, %eax
    sete %al
    movl $m_console, %esi
    call check
    movl $OP_CONSOLE, %eax
    movl $0xF0000000, %ebx
    movl $16, %ecx
    call hcpage
    cmpl $EFAULT, %eax
    sete %al
    movl $m_efault, %esi
    call check
    movl $OP_CONSOLE, %eax
    movl $m_hello, %ebx
    movl $100000, %ecx
    call hcpage
    cmpl $EINVAL, %eax
    sete %al
    movl $m_einval, %esi
    call check
    movl $99, %eax
    call hcpage
    cmpl $ENOSYS, %eax
    sete %al
    movl $m_enosys, %esi
    call check
    # --- shared page
    movl $OP_SHARED, %eax
    movl $shared, %ebx
    call hcpage
    testl %eax, %eax
    jnz 4f
    cmpb $1, shared
4:  sete %al
    movl $m_shared, %esi
    call check
    movl $OP_SHARED, %eax
    movl $shared+4, %ebx
    call hcpage
    cmpl $EINVAL, %eax
    sete %al
    movl $m_shared_bad, %esi
    call check
    # --- time
    movl $OP_TIME, %eax
    call hcpage
    movl %eax, %edi
    movl $20000, %ecx
9:  loop 9b
    movl $OP_TIME, %eax
    call hcpage
    cmpl %edi, %eax
    setae %al
    movl $m_time, %esi
    call check
    # --- interrupts: PIC at 0x20/0x28, only IRQ10 (vector 0x2a) open
    call pic_init
    lidt idt_desc
    movl $OP_YIELD, %eax
    call hcpage
    testl %eax, %eax
    sete %al
    movl $m_yield, %esi
    call check
    # timer while virtually masked: pending set, no interrupt
    movb $0, shared
    movl $OP_TIME, %eax
    call hcpage
    addl $1000000, %eax
    movl %eax, %ebx
    movl $OP_TIMER, %eax
    call hcpage
    sti
    movl $200000000, %ecx
10: cmpb $0, shared+1
    jne 11f
    pause
    loop 10b
11: cmpb $1, shared+1
    jne 12f
    cmpl $0, ticks
12: sete %al
    movl $m_pending, %esi
    call check
    movl $OP_IRQ_ENABLE, %eax
    call hcpage
    movl %eax, %edi
    movl $20000000, %ecx
13: cmpl $0, ticks
    jne 14f
    loop 13b
14: cmpl $1, %edi
    jne 15f
    cmpl $1, ticks
    jne 15f
    cmpb $0, shared+1
15: sete %al
    movl $m_irq, %esi
    call check
    # halt: sleeps (with IF set by the call) until the timer's interrupt
    cli
    movl $OP_TIME, %eax
    call hcpage
    addl $2000000, %eax
    movl %eax, %ebx
    movl $OP_TIMER, %eax
    call hcpage
    movl $OP_HALT, %eax
    call hcpage
    cmpl $2, ticks
    sete %al
    movl $m_halt, %esi
    call check
    cli
    # --- PAE paging (last: hosts whose KVM cannot run 32-bit paged guests stop here): identity 0-2M, TESTVA (PD slot 2) -> page_a; pdpt1 has pt2 there
    movl $0, %ecx
5:  movl %ecx, %eax
    shll $12, %eax
    orl $3, %eax
    movl %eax, pt0(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 5b
    movl $pd0+1, pdpt0
    movl $pd1+1, pdpt1
    movl $pt0+3, pd0
    movl $pt1+3, pd0+16
    movl $pt0+3, pd1
    movl $pt2+3, pd1+16
    movl $page_a+3, pt1
    movl $page_a+3, pt2
    movl $0x41414141, page_a
    movl $0x42424242, page_b
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pdpt0, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    cmpl $0x41414141, TESTVA
    sete %al
    movl $m_paging, %esi
    call check
    # keep a translation of TESTVA hot, then change it with one hypercall
    movl TESTVA, %eax
    movl $pt1, mmulist
    movl $page_b+3, mmulist+8
    movl $OP_MMU, %eax
    movl $mmulist, %ebx
    movl $1, %ecx
    movl $8, %esi
    call hcpage
    cmpl $1, %eax
    jne 6f
    movl $OP_FLUSH, %eax
    movl $TESTVA, %ebx
    call hcpage
    testl %eax, %eax
    jnz 6f
    cmpl $0x42424242, TESTVA
6:  sete %al
    movl $m_mmu, %esi
    call check
    movl $0xF0000000, mmulist
    movl $OP_MMU, %eax
    movl $mmulist, %ebx
    movl $1, %ecx
    movl $8, %esi
    call hcpage
    cmpl $EFAULT, %eax
    jne 7f
    movl $OP_MMU, %eax
    movl $3, %esi
    call hcpage
    cmpl $EINVAL, %eax
7:  sete %al
    movl $m_mmu_bad, %esi
    call check
    movl $OP_CR3, %eax
    movl $pdpt1, %ebx
    call hcpage
    testl %eax, %eax
    jnz 8f
    movl %cr3, %eax
    cmpl $pdpt1, %eax
    jne 8f
    cmpl $0x41414141, TESTVA
8:  sete %al
    movl $m_cr3, %esi
    call check
    movl $OP_FLUSH, %eax
    movl $0xFFFFFFFF, %ebx
    call hcpage
    testl %eax, %eax
    sete %al
    movl $m_flushall, %esi
    call check
    # update_va: TESTVA (hot, page_a through pt2) -> page_b in one call
    cmpl $0x41414141, TESTVA
    jne 9f
    movl $OP_UPDATE_VA, %eax
    movl $pt2, %ebx
    movl $page_b+3, %ecx
    movl $TESTVA, %esi
    movl $UVA_INVLPG, %edi
    call hcpage
    testl %eax, %eax
    jnz 9f
    cmpl $0x42424242, TESTVA
9:  sete %al
    movl $m_uva, %esi
    call check
    # bad flags, a misaligned entry, an entry outside RAM: errors, nothing written
    movl $OP_UPDATE_VA, %eax
    movl $pt2, %ebx
    movl $page_a+3, %ecx
    movl $TESTVA, %esi
    movl $0x80, %edi
    call hcpage
    cmpl $EINVAL, %eax
    jne 10f
    movl $OP_UPDATE_VA, %eax
    movl $pt2+4, %ebx
    movl $UVA_INVLPG, %edi
    call hcpage
    cmpl $EFAULT, %eax
    jne 10f
    movl $OP_UPDATE_VA, %eax
    movl $0xF0000000, %ebx
    call hcpage
    cmpl $EFAULT, %eax
    jne 10f
    cmpl $0x42424242, TESTVA
10: sete %al
    movl $m_uva_bad, %esi
    call check
    cli
    movl $m_done, %esi
    call puts
    movl $OP_SHUTDOWN, %eax
    movl $0, %ebx
    movl $7, %ecx
    call hcpage
    movl $m_alive, %esi
    call puts
    hlt

pic_init:
    movb $0x11, %al
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x20, %al
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xa1
    movb $4, %al
    outb %al, $0x21
    movb $2, %al
    outb %al, $0xa1
    movb $1, %al
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xfb, %al
    outb %al, $0x21
    outb %al, $0xa1
    # IDT entry 0x2a -> irq10 (interrupt gate, selector = current CS)
    movl $irq10, %eax
    movw %ax, idt + 0x2a*8
    movw %cs, idt + 0x2a*8 + 2
    movw $0x8e00, idt + 0x2a*8 + 4
    shrl $16, %eax
    movw %ax, idt + 0x2a*8 + 6
    ret

irq10:
    pushl %eax
    incl ticks
    movb $0x20, %al
    outb %al, $0xa0
    outb %al, $0x20
    popl %eax
    iret

# check: AL != 0 -> "<name>=ok" else "<name>=bad"; ESI = name
check:
    pushl %eax
    call puts
    popl %eax
    movl $m_ok, %esi
    testb %al, %al
    jnz 1f
    movl $m_bad, %esi
1:  jmp puts

puts:                               # ESI: NUL-terminated string
    pushl %eax
    pushl %edx
1:  lodsb
    testb %al, %al
    jz 3f
    movb %al, %ah
    movw $COM1+5, %dx
2:  inb %dx, %al
    testb $0x20, %al
    jz 2b
    movb %ah, %al
    movw $COM1, %dx
    outb %al, %dx
    jmp 1b
3:  popl %edx
    popl %eax
    ret

    .section .rodata
m_signone: .asciz "sig=none\n"
m_sig: .asciz "sig=pyvmm\n"
m_cpuidver: .asciz "cpuid_version="
m_msr: .asciz "msr="
m_version: .asciz "version="
m_hello: .ascii "hello through the hypercall\n"
    .equ m_hello_len, . - m_hello
    .byte 0
m_console: .asciz "console="
m_efault: .asciz "console_efault="
m_einval: .asciz "console_einval="
m_enosys: .asciz "enosys="
m_shared: .asciz "shared="
m_shared_bad: .asciz "shared_einval="
m_paging: .asciz "paging="
m_mmu: .asciz "mmu_update="
m_mmu_bad: .asciz "mmu_update_errors="
m_cr3: .asciz "set_cr3="
m_flushall: .asciz "flush_all="
m_uva: .asciz "update_va="
m_uva_bad: .asciz "update_va_errors="
m_time: .asciz "read_time="
m_yield: .asciz "yield="
m_pending: .asciz "timer_pending="
m_irq: .asciz "irq_enable="
m_halt: .asciz "halt="
m_done: .asciz "done\n"
m_alive: .asciz "still alive after shutdown\n"
m_ok: .asciz "ok\n"
m_bad: .asciz "bad\n"

    .data
    .align 8
idt_desc:
    .word 256*8-1
    .long idt
ticks: .long 0
mmulist: .quad 0, 0

    .bss
    .align 4096
hcpage: .space 4096
shared: .space 4096
pdpt0: .space 32
    .align 4096
pdpt1: .space 32
    .align 4096
pd0: .space 4096
pd1: .space 4096
pt0: .space 4096
pt1: .space 4096
pt2: .space 4096
page_a: .space 4096
page_b: .space 4096
idt: .space 2048
    .space 8192
stack_top:
