# A PVH test kernel: 32-bit ELF, linked at 1 MiB with guest.ld, entered at
# the address in its Xen PHYS32_ENTRY note (owner "Xen", type 18) with EBX
# pointing at an hvm_start_info.
#
# It prints over COM1 (0x3f8, polling LSR bit 5), one "key=value" per line:
#   magic=ok  version=<n>  cmdline=<text>  mods=<n>  mod0=<first 8 bytes>
#   memmap=<entries>  rsdp=<8 bytes at rsdp_paddr>  fw_cfg_dma=<signature
#   read by DMA>  fw_cfg=<signature>  cpus=<n>  ram=<MiB>M  exit=<n>
# then writes n (from "exit=<n>" on the command line, 1 without it) to the
# isa-debug-exit port 0xf4 and halts.  A wrong start-info magic prints
# "magic=bad" and exits with 0x7f.
#
# Plain GNU as syntax (AT&T), no C preprocessor.

    .equ START_INFO_MAGIC, 0x336ec578
    .equ COM1, 0x3f8
    .equ COM1_LSR, 0x3fd
    .equ FW_CFG_SEL, 0x510
    .equ FW_CFG_DATA, 0x511
    .equ FW_CFG_DMA_HI, 0x514
    .equ FW_CFG_DMA_LO, 0x518
    .equ DEBUG_EXIT, 0xf4

    .section .note.Xen, "a", @note
    .align 4
    .long 4                           # namesz ("Xen\0")
    .long 4                           # descsz
    .long 18                          # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .align 4
    .long _start

    .text
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    movl %ebx, info_ptr
    cmpl $START_INFO_MAGIC, (%ebx)
    je 1f
    movl $msg_badmagic, %esi
    call puts
    movl $0x7f, %eax
    jmp exit_with
1:  movl $msg_magic, %esi
    call puts

    movl $msg_version, %esi           # +4: version
    call puts
    movl 4(%ebx), %eax
    call putdec
    call newline

    movl $msg_cmdline, %esi           # +24: cmdline_paddr
    call puts
    movl 24(%ebx), %esi
    call puts
    call newline

    movl $msg_mods, %esi              # +12: nr_modules, +16: modlist_paddr
    call puts
    movl 12(%ebx), %eax
    call putdec
    call newline
    testl %eax, %eax
    jz 2f
    movl $msg_mod0, %esi
    call puts
    movl 16(%ebx), %edx
    movl (%edx), %esi                 # paddr
    movl 8(%edx), %ecx                # size
    cmpl $8, %ecx
    jbe 3f
    movl $8, %ecx
3:  call putn
    call newline

2:  movl $msg_memmap, %esi            # +48: memmap_entries
    call puts
    movl 48(%ebx), %eax
    call putdec
    call newline

    movl $msg_rsdp, %esi              # +32: rsdp_paddr
    call puts
    movl 32(%ebx), %esi
    movl $8, %ecx
    call putn
    call newline

    call fwcfg_dma_signature
    call fwcfg_report

    movl 24(%ebx), %esi
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

# fw_cfg DMA: select item 0 and read its 4 bytes into dma_buf.
fwcfg_dma_signature:
    pushal
    movl $dma_buf, %eax
    bswapl %eax
    movl %eax, dma_access + 12        # be64 address, low half
    xorl %eax, %eax
    movw $FW_CFG_DMA_HI, %dx
    outl %eax, %dx                    # high 32 bits of the descriptor address
    movl $dma_access, %eax
    bswapl %eax
    movw $FW_CFG_DMA_LO, %dx
    outl %eax, %dx                    # low 32 bits: starts the transfer
    movl $msg_fwcfg_dma, %esi
    call puts
    cmpl $0, dma_access               # control is 0 when done without error
    jne 1f
    movl $dma_buf, %esi
    movl $4, %ecx
    call putn
    jmp 2f
1:  movl $msg_error, %esi
    call puts
2:  call newline
    popal
    ret

    .include "guestlib32.S"

    .section .rodata
msg_magic:     .asciz "magic=ok\n"
msg_badmagic:  .asciz "magic=bad\n"
msg_version:   .asciz "version="
msg_cmdline:   .asciz "cmdline="
msg_mods:      .asciz "mods="
msg_mod0:      .asciz "mod0="
msg_memmap:    .asciz "memmap="
msg_rsdp:      .asciz "rsdp="
msg_fwcfg_dma: .asciz "fw_cfg_dma="
msg_error:     .asciz "error"

    .data
    .align 8
# FWCfgDmaAccess, big-endian: control = select item 0 (upper 16 bits) | SELECT | READ,
# length = 4, address (filled in at run time).
dma_access:
    .byte 0, 0, 0, 0x0a
    .byte 0, 0, 0, 4
    .long 0, 0
dma_buf:  .long 0
info_ptr: .long 0
scratch:  .long 0

    .bss
    .align 16
stack:    .space 16384
stack_top:
