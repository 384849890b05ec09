# A Multiboot (v1) test kernel: 32-bit ELF, linked at 1 MiB with guest.ld.
#
# It prints what the loader and the board gave it over COM1 (0x3f8, polling
# LSR bit 5), one "key=value" per line:
#   magic=ok  mem_upper=<KiB>  cmdline=<text>  mods=<n>  mod0=<first 8 bytes>
#   mmap=<entries>  loader=<name>  fw_cfg=<signature>  cpus=<n>  ram=<MiB>M
#   exit=<n>
# then writes n (from "exit=<n>" on the command line, 1 without it) to the
# isa-debug-exit port 0xf4 and halts.  A wrong EAX magic prints "magic=bad"
# and exits with 0x7f.
#
# Plain GNU as syntax (AT&T), no C preprocessor.

    .equ MB_HEADER_MAGIC, 0x1BADB002
    .equ MB_HEADER_FLAGS, 0x00000003      # page-aligned modules, memory info
    .equ MB_LOADER_MAGIC, 0x2BADB002
    .equ COM1, 0x3f8
    .equ COM1_LSR, 0x3fd
    .equ FW_CFG_SEL, 0x510
    .equ FW_CFG_DATA, 0x511
    .equ DEBUG_EXIT, 0xf4

    .section .multiboot, "a"
    .align 4
    .long MB_HEADER_MAGIC
    .long MB_HEADER_FLAGS
    .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    movl %ebx, info_ptr
    cmpl $MB_LOADER_MAGIC, %eax
    je 1f
    movl $msg_badmagic, %esi
    call puts
    movl $0x7f, %eax
    jmp exit_with
1:  movl $msg_magic, %esi
    call puts
    movl info_ptr, %ebx

    movl $msg_memupper, %esi          # info+8: mem_upper
    call puts
    movl 8(%ebx), %eax
    call putdec
    call newline

    movl $msg_cmdline, %esi           # info+16: cmdline
    call puts
    movl 16(%ebx), %esi
    call puts
    call newline

    movl $msg_mods, %esi              # info+20: mods_count, info+24: mods_addr
    call puts
    movl 20(%ebx), %eax
    call putdec
    call newline
    testl %eax, %eax
    jz 2f
    movl $msg_mod0, %esi
    call puts
    movl 24(%ebx), %edx
    movl (%edx), %esi                 # mod_start
    movl 4(%edx), %ecx                # mod_end
    subl %esi, %ecx
    cmpl $8, %ecx
    jbe 3f
    movl $8, %ecx
3:  call putn
    call newline

2:  movl 48(%ebx), %esi               # info+44: mmap_length, info+48: mmap_addr
    movl 44(%ebx), %edi
    addl %esi, %edi
    xorl %eax, %eax
4:  cmpl %edi, %esi
    jae 5f
    incl %eax
    addl (%esi), %esi                 # size field does not count itself
    addl $4, %esi
    jmp 4b
5:  movl $msg_mmap, %esi
    call puts
    call putdec
    call newline

    movl $msg_loader, %esi            # info+64: boot_loader_name
    call puts
    movl 64(%ebx), %esi
    call puts
    call newline

    call fwcfg_report

    movl 16(%ebx), %esi
    call parse_exit
exit_with:
    movl $msg_exit, %esi
    call puts
    call putdec
    call newline
    movw $DEBUG_EXIT, %dx
    outb %al, %dx
halt:
    cli
    hlt
    jmp halt

# fw_cfg over port I/O: signature (item 0), CPU count (5), RAM size (3).
fwcfg_report:
    pushal
    movl $msg_fwcfg, %esi
    call puts
    movw $0, %ax
    call fwcfg_select
    call fwcfg_read32
    movl %eax, scratch
    movl $scratch, %esi
    movl $4, %ecx
    call putn
    call newline
    movl $msg_cpus, %esi
    call puts
    movw $5, %ax
    call fwcfg_select
    call fwcfg_read32                 # a 2-byte item: reads past its end give 0
    call putdec
    call newline
    movl $msg_ram, %esi
    call puts
    movw $3, %ax
    call fwcfg_select
    call fwcfg_read32
    movl %eax, %ebx
    call fwcfg_read32
    movl %eax, %edx
    movl %ebx, %eax
    shrdl $20, %edx, %eax             # bytes -> MiB
    call putdec
    movl $msg_mib, %esi
    call puts
    popal
    ret

fwcfg_select:                         # ax = selector
    pushl %edx
    movw $FW_CFG_SEL, %dx
    outw %ax, %dx
    popl %edx
    ret

fwcfg_read32:                         # eax = next 4 data bytes, little-endian
    pushl %ebx
    pushl %ecx
    pushl %edx
    movw $FW_CFG_DATA, %dx
    xorl %ebx, %ebx
    movl $4, %ecx
1:  inb %dx, %al
    shrdl $8, %eax, %ebx
    loop 1b
    movl %ebx, %eax
    popl %edx
    popl %ecx
    popl %ebx
    ret

# eax = the number after "exit=" in the string at esi, or 1 without one.
parse_exit:
    pushl %edx
    pushl %esi
1:  cmpb $0, (%esi)
    je 4f
    cmpl $0x74697865, (%esi)          # "exit"
    jne 3f
    cmpb $'=', 4(%esi)
    jne 3f
    addl $5, %esi
    xorl %eax, %eax
2:  movzbl (%esi), %edx
    subl $'0', %edx
    cmpl $9, %edx
    ja 5f
    imull $10, %eax
    addl %edx, %eax
    incl %esi
    jmp 2b
3:  incl %esi
    jmp 1b
4:  movl $1, %eax
5:  popl %esi
    popl %edx
    ret

putc:                                 # al
    pushl %edx
    pushl %eax
    movw $COM1_LSR, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    popl %eax
    movw $COM1, %dx
    outb %al, %dx
    popl %edx
    ret

puts:                                 # esi = NUL-terminated string
    pushal
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    jmp 1b
2:  popal
    ret

putn:                                 # esi, ecx bytes; unprintable ones as '.'
    pushal
    jecxz 3f
1:  lodsb
    cmpb $0x20, %al
    jb 2f
    cmpb $0x7e, %al
    jbe 4f
2:  movb $'.', %al
4:  call putc
    loop 1b
3:  popal
    ret

putdec:                               # eax, unsigned decimal
    pushal
    movl $10, %ecx
    xorl %ebx, %ebx
1:  xorl %edx, %edx
    divl %ecx
    pushl %edx
    incl %ebx
    testl %eax, %eax
    jnz 1b
2:  popl %eax
    addb $'0', %al
    call putc
    decl %ebx
    jnz 2b
    popal
    ret

newline:
    pushl %eax
    movb $'\n', %al
    call putc
    popl %eax
    ret

    .section .rodata
msg_magic:    .asciz "magic=ok\n"
msg_badmagic: .asciz "magic=bad\n"
msg_memupper: .asciz "mem_upper="
msg_cmdline:  .asciz "cmdline="
msg_mods:     .asciz "mods="
msg_mod0:     .asciz "mod0="
msg_mmap:     .asciz "mmap="
msg_loader:   .asciz "loader="
msg_fwcfg:    .asciz "fw_cfg="
msg_cpus:     .asciz "cpus="
msg_ram:      .asciz "ram="
msg_mib:      .asciz "M\n"
msg_exit:     .asciz "exit="

    .data
    .align 4
info_ptr: .long 0
scratch:  .long 0

    .bss
    .align 16
stack:    .space 16384
stack_top:
