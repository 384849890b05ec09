"""pyvmm's ACPI tables handed to BIOS firmware through fw_cfg, as QEMU does.

Under a BIOS, pyvmm does not write tables into guest RAM itself (the
firmware owns 0xE0000-0xFFFFF).  It gives the firmware three fw_cfg files
instead:

    etc/acpi/tables   FACS, DSDT, FADT, MADT[, MCFG], RSDT, XSDT, with every
                      pointer between them written as an offset in this file
    etc/acpi/rsdp     the RSDP, its pointers offsets in etc/acpi/tables
    etc/table-loader  commands, 128 bytes each: allocate each file (the RSDP
                      in the F segment, where OSes scan for it), add each
                      file's address to the pointers into it, fix checksums

SeaBIOS runs the commands and uses the result instead of its own tables, so
the guest sees the same tables (PCI routing in the DSDT, the PM block, the
MADT) as in a direct kernel boot.

Command layout (QEMU's BIOS linker/loader interface), little-endian:
    u32 command, then
    1 ALLOCATE      char file[56], u32 align, u8 zone (1 high memory, 2 F segment)
    2 ADD_POINTER   char dest_file[56], char src_file[56], u32 offset, u8 size
    3 ADD_CHECKSUM  char file[56], u32 offset, u32 start, u32 length
"""

from __future__ import annotations

import struct

from ..errors import ConfigError
from . import acpi

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

ENTRY_SIZE = 128
NAME_SIZE = 56
CMD_ALLOCATE, CMD_ADD_POINTER, CMD_ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2

SDT_CHECKSUM_OFFSET = 9
SDT_ENTRIES_OFFSET = acpi.SDT_HEADER.size      # RSDT/XSDT entries follow the header
FADT_POINTERS = ((36, 4), (40, 4), (140, 8))   # FIRMWARE_CTRL (FACS), DSDT, X_DSDT
RSDP_RSDT, RSDP_XSDT = 16, 24
RSDP_CHECKSUM, RSDP_CHECKSUM_LEN = 8, 20
RSDP_EXT_CHECKSUM = 32


def _name(file: str) -> bytes:
    return file.encode().ljust(NAME_SIZE, b"\0")


def allocate(file: str, align: int, zone: int) -> bytes:
    return struct.pack("<I56sIB", CMD_ALLOCATE, _name(file), align, zone).ljust(ENTRY_SIZE, b"\0")


def add_pointer(dest: str, src: str, offset: int, size: int) -> bytes:
    return struct.pack("<I56s56sIB", CMD_ADD_POINTER, _name(dest), _name(src), offset, size).ljust(
        ENTRY_SIZE, b"\0")


def add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    return struct.pack("<I56sIII", CMD_ADD_CHECKSUM, _name(file), offset, start, length).ljust(
        ENTRY_SIZE, b"\0")


def acpi_files(cpus: int, dsdt_extra: bytes = b"",
               extra_tables: tuple[bytes, ...] = ()) -> list[tuple[str, bytes]]:
    """The three fw_cfg files. Raises ConfigError for a CPU count the MADT
    cannot describe."""
    blob = bytearray()
    where: dict[str, int] = {}
    commands = [allocate(TABLES_FILE, 64, ZONE_HIGH), allocate(RSDP_FILE, 16, ZONE_FSEG)]
    checksums: list[bytes] = []

    def place(name: str, data: bytes, align: int = 16, summed: bool = True) -> int:
        blob.extend(bytes(-len(blob) % align))
        offset = len(blob)
        blob.extend(data)
        where[name] = offset
        if summed:
            checksums.append(add_checksum(TABLES_FILE, offset + SDT_CHECKSUM_OFFSET, offset, len(data)))
        return offset

    if not 1 <= cpus <= 254:
        raise ConfigError(f"ACPI: cannot describe {cpus} CPUs (1..254)")
    facs = place("FACS", acpi.build_facs(), align=64, summed=False)   # the FACS has no checksum
    dsdt = place("DSDT", acpi._table(b"DSDT", 2, acpi.S5_AML + dsdt_extra))
    fadt = place("FACP", acpi.build_fadt(facs, dsdt))
    for field, size in FADT_POINTERS:
        commands.append(add_pointer(TABLES_FILE, TABLES_FILE, fadt + field, size))
    listed = [fadt, place("APIC", acpi.build_madt(cpus))]
    listed += [place(t[:4].decode(), t) for t in extra_tables]
    for sig, fmt, size in ((b"RSDT", "I", 4), (b"XSDT", "Q", 8)):
        table = place(sig.decode(), acpi._table(sig, 1, struct.pack(f"<{len(listed)}{fmt}", *listed)))
        for i in range(len(listed)):
            commands.append(add_pointer(TABLES_FILE, TABLES_FILE, table + SDT_ENTRIES_OFFSET + i * size, size))
    rsdp = acpi.build_rsdp(where["RSDT"], where["XSDT"])
    commands += [add_pointer(RSDP_FILE, TABLES_FILE, RSDP_RSDT, 4),
                 add_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT, 8)]
    # Checksums after every pointer: each covers the patched bytes.
    commands += checksums
    commands += [add_checksum(RSDP_FILE, RSDP_CHECKSUM, 0, RSDP_CHECKSUM_LEN),
                 add_checksum(RSDP_FILE, RSDP_EXT_CHECKSUM, 0, len(rsdp))]
    return [(TABLES_FILE, bytes(blob)), (RSDP_FILE, rsdp), (LOADER_FILE, b"".join(commands))]


__all__ = ["LOADER_FILE", "RSDP_FILE", "TABLES_FILE", "acpi_files"]
