"""A tiny test disk for the BIOS -> boot sector handoff: an MBR whose code
prints through the BIOS (INT 10h, which SeaBIOS's serial console carries),
reads its second sector through INT 13h, prints that too, and ends pyvmm
through isa-debug-exit with the boot drive number the BIOS passed in DL."""

from __future__ import annotations

from pathlib import Path

from tests.asm import assemble

DEBUG_EXIT_PORT = 0xF4
DISK_BYTES = 4 << 20
GREETING = "pyvmm-mbr: hello from the boot sector"
SECTOR2_TEXT = "pyvmm-mbr: sector 2 read through INT 13h"

MBR_SOURCE = f"""
    .code16
    ljmp $0, $start            # CS:IP = 0:7C00 whatever the BIOS used
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7C00, %sp
    mov %dl, boot_drive
    mov $greeting, %si
    call print
    mov $0x0201, %ax           # read 1 sector
    mov $0x0002, %cx           # cylinder 0, sector 2
    xor %dh, %dh               # head 0
    mov boot_drive, %dl
    mov $0x8000, %bx
    int $0x13
    jc failed
    mov $0x8000, %si
    call print
    mov boot_drive, %al
    jmp done
failed:
    mov $0xEE, %al
done:
    out %al, ${DEBUG_EXIT_PORT:#x}
1:  hlt
    jmp 1b
print:                         # DS:SI, NUL-terminated
    lodsb
    test %al, %al
    jz 2f
    mov $0x0E, %ah
    mov $0x0007, %bx
    int $0x10
    jmp print
2:  ret
boot_drive: .byte 0
greeting: .asciz "{GREETING}\\r\\n"
    .org 446
    .byte 0x80, 0, 2, 0, 0x83, 0, 2, 0   # one bootable partition, from sector 1
    .long 1, 63
    .org 510
    .byte 0x55, 0xAA
"""


def boot_sector() -> bytes:
    """The 512-byte MBR."""
    data = Path(assemble(MBR_SOURCE, fmt="bin", org=0x7C00)).read_bytes()
    assert len(data) == 512, len(data)
    return data


def write_disk(path: Path, bootable: bool = True) -> Path:
    """A 4 MiB raw disk (a BIOS needs a cylinder at least): the MBR (or,
    not bootable, a zero first sector: no boot signature) and the text of
    sector 2."""
    first = boot_sector() if bootable else bytes(512)
    second = (SECTOR2_TEXT + "\r\n").encode().ljust(512, b"\0")
    with open(path, "wb") as f:
        f.write(first + second)
        f.truncate(DISK_BYTES)
    return path
