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

    .include "guestlib32.S"

    .section .rodata
msg_magic:    .asciz "magic=ok\n"
msg_badmagic: .asciz "magic=bad\n"
msg_memupper: .asciz "mem_upper="
msg_cmdline:  .asciz "cmdline="
msg_mods:     .asciz "mods="
msg_mod0:     .asciz "mod0="
msg_mmap:     .asciz "mmap="
msg_loader:   .asciz "loader="

    .data
    .align 4
info_ptr: .long 0
scratch:  .long 0

    .bss
    .align 16
stack:    .space 16384
stack_top:
