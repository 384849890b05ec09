"""An MBR (DOS) partition table, written here rather than by fdisk/sfdisk so
that building a disk needs no block device and no privileges.

Layout of sector 0: 440 bytes of boot code, a 4-byte disk signature, two
zero bytes, four 16-byte partition entries at 446 and 0x55 0xAA at 510.
Each entry carries its extent twice, as CHS (for old BIOSes and boot
code that still read it) and as LBA (what everything since the 90s uses).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError

SECTOR = 512
BOOT_CODE_SIZE = 440
TABLE_OFFSET = 446
ENTRY = struct.Struct("<B3sB3sII")    # status, first CHS, type, last CHS, first LBA, sectors
SIGNATURE = b"\x55\xaa"
# The translated geometry every BIOS reports for disks over 8 GiB and that
# partitioning tools assume: 255 heads, 63 sectors per track.
HEADS = 255
SECTORS_PER_TRACK = 63

TYPE_FAT16_LBA = 0x0E
TYPE_FAT32_LBA = 0x0C
TYPE_LINUX = 0x83
ACTIVE = 0x80


@dataclass(frozen=True)
class Partition:
    """One primary partition: its first sector and length in sectors."""
    start: int
    sectors: int
    type: int
    bootable: bool = False

    @property
    def end(self) -> int:
        """The first sector after the partition."""
        return self.start + self.sectors


def chs(lba: int) -> bytes:
    """The 3-byte CHS form of `lba`; past cylinder 1023 the maximum
    (1023/254/63), which tells readers to use the LBA fields."""
    cylinder, rest = divmod(lba, HEADS * SECTORS_PER_TRACK)
    head, sector = divmod(rest, SECTORS_PER_TRACK)
    if cylinder > 1023:
        cylinder, head, sector = 1023, 254, 62
    return bytes((head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF))


def mbr_sector(boot_code: bytes, partitions: list[Partition], disk_signature: int) -> bytes:
    """Sector 0 of a disk holding `partitions` (up to four, in order, not
    overlapping sector 0 or each other). Raises ConfigError otherwise."""
    if len(boot_code) > BOOT_CODE_SIZE:
        raise ConfigError(f"MBR boot code is {len(boot_code)} bytes; at most {BOOT_CODE_SIZE} fit")
    if len(partitions) > 4:
        raise ConfigError("an MBR holds at most four primary partitions")
    previous_end = 1
    table = b""
    for p in partitions:
        if p.sectors <= 0 or p.start < previous_end or p.end > 1 << 32:
            raise ConfigError(f"partition at sector {p.start} ({p.sectors} sectors) overlaps or does not fit an MBR")
        previous_end = p.end
        table += ENTRY.pack(ACTIVE if p.bootable else 0, chs(p.start), p.type, chs(p.end - 1), p.start, p.sectors)
    table = table.ljust(4 * ENTRY.size, b"\0")
    head = boot_code.ljust(BOOT_CODE_SIZE, b"\0") + struct.pack("<IH", disk_signature & 0xFFFFFFFF, 0)
    return head + table + SIGNATURE


def read_partitions(sector0: bytes) -> list[Partition]:
    """The non-empty entries of an MBR sector. Raises ConfigError without
    the 0x55AA signature."""
    if len(sector0) < SECTOR or sector0[510:512] != SIGNATURE:
        raise ConfigError("no MBR signature (0x55 0xAA) in sector 0")
    found = []
    for i in range(4):
        status, _, ptype, _, start, sectors = ENTRY.unpack_from(sector0, TABLE_OFFSET + i * ENTRY.size)
        if ptype:
            found.append(Partition(start, sectors, ptype, bool(status & ACTIVE)))
    return found
