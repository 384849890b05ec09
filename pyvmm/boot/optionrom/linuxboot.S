# pyvmm's Linux loader option ROM: the BIOS boots a bzImage that pyvmm
# hands over through fw_cfg (`pyvmm run --bios --kernel ...`).
#
# SeaBIOS runs fw_cfg files named genroms/* as option ROMs; this one has a
# PnP header whose bootstrap entry vector (BEV) the BIOS calls as a boot
# device.  The BEV reads each part's address and size from fw_cfg items
# (real-mode setup 0x16/0x17, kernel 0x07/0x08, initrd 0x0A/0x0B, command
# line 0x13/0x14), copies the part itself there with fw_cfg DMA (0x18,
# 0x11, 0x12, 0x15), and enters the setup code as the boot protocol says:
# every data segment at the setup's segment, SP at its top, jump to
# segment + 0x20, offset 0.  pyvmm (boot/linuxboot.py) has already filled
# in the setup header (loader type, heap end, command line and initrd).
#
# Assembled at run time by boot/optionrom.py; it pads the image to 512
# bytes and sets the PnP header and ROM checksums.

    .code16
    .text
    .globl _start
_start:
    .byte 0x55, 0xAA
    .byte 1                         # size in 512-byte blocks
    jmp init                        # offset 3: initialisation entry
    .org 0x1A
    .word pnp                       # offset 0x1A: PnP expansion header

    .balign 16
pnp:
    .ascii "$PnP"
    .byte 1                         # structure revision
    .byte 2                         # length in 16-byte units
    .word 0                         # next header
    .byte 0                         # reserved
    .byte 0                         # checksum (set by optionrom.py)
    .long 0                         # device identifier
    .word manufacturer
    .word product
    .byte 0, 0, 0                   # device type code
    .byte 0x14                      # indicators: IPL device, may be shadowed
    .word 0                         # boot connection vector
    .word 0                         # disconnect vector
    .word bev                       # bootstrap entry vector
    .word 0                         # reserved
    .word 0                         # static resource information

manufacturer: .asciz "pyvmm"
product:      .asciz "pyvmm Linux loader"

init:
    lret

# fw_cfg at 0x510: selector (16-bit write), data (byte reads), DMA address
# at 0x514 (high) and 0x518 (low), big-endian.
    .set FW_CFG_SELECT, 0x510
    .set FW_CFG_DATA, 0x511
    .set FW_CFG_DMA_HIGH, 0x514
    .set FW_CFG_DMA_LOW, 0x518
    .set DMA_DESC, 0x7E00           # the DMA descriptor: free RAM when the BIOS boots
    .set DMA_SELECT_READ, 0x0A      # control bits: select (8) | read (2)

# read32: EAX = the 4-byte little-endian item %bx.
read32:
    mov %bx, %ax
    mov $FW_CFG_SELECT, %dx
    out %ax, %dx
    mov $FW_CFG_DATA, %dx
    mov $4, %cx
1:  in %dx, %al
    ror $8, %eax
    loop 1b
    ret

# dma_read: copies %ecx bytes of item %bx to physical address %edi.
dma_read:
    test %ecx, %ecx
    jz 2f
    movzwl %bx, %eax
    shl $16, %eax
    or $DMA_SELECT_READ, %eax
    bswap %eax
    mov %eax, DMA_DESC              # control
    mov %ecx, %eax
    bswap %eax
    mov %eax, DMA_DESC + 4          # length
    movl $0, DMA_DESC + 8           # address, high half
    mov %edi, %eax
    bswap %eax
    mov %eax, DMA_DESC + 12         # address, low half
    xor %eax, %eax
    mov $FW_CFG_DMA_HIGH, %dx
    out %eax, %dx
    mov $DMA_DESC, %eax
    bswap %eax
    mov $FW_CFG_DMA_LOW, %dx
    out %eax, %dx                   # runs the transfer
2:  ret

# load: item pair (address item %si, size item %bp, data item %bx).
load:
    push %bx
    mov %si, %bx
    call read32
    mov %eax, %edi
    mov %bp, %bx
    call read32
    mov %eax, %ecx
    pop %bx
    jmp dma_read

bev:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $0x16, %si                  # real-mode setup
    mov $0x17, %bp
    mov $0x18, %bx
    call load
    mov $0x07, %si                  # protected-mode kernel
    mov $0x08, %bp
    mov $0x11, %bx
    call load
    mov $0x0A, %si                  # initrd (size 0: none)
    mov $0x0B, %bp
    mov $0x12, %bx
    call load
    mov $0x13, %si                  # command line
    mov $0x14, %bp
    mov $0x15, %bx
    call load
    mov $0x16, %bx
    call read32
    shr $4, %eax                    # the setup's segment
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $0xFFF0, %sp                # its top: heap_end_ptr is 0x200 below (linuxboot.py)
    add $0x20, %ax
    push %ax
    push $0
    lret
