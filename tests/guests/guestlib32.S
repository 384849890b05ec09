# Routines shared by the 32-bit test guests: fw_cfg report, command-line
# "exit=N" parsing and UART output. Included with .include; the including
# guest defines COM1, COM1_LSR, FW_CFG_SEL, FW_CFG_DATA and `scratch`.

    .text
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
msg_fwcfg:    .asciz "fw_cfg="
msg_cpus:     .asciz "cpus="
msg_ram:      .asciz "ram="
msg_mib:      .asciz "M\n"
msg_exit:     .asciz "exit="
