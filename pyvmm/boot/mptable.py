"""Intel MultiProcessor Specification 1.4 tables: how a guest finds its CPUs,
IOAPIC and ISA interrupt routing without ACPI.

The floating pointer structure goes at layout.EBDA_ADDR (the last KiB of base
memory, which Linux scans) and the configuration table right after it; tables
for more than 40 CPUs go to the top of the BIOS area instead.
Entry layouts are declared as struct formats next to their type codes.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from ..errors import ConfigError, ImageError
from ..memory import GuestMemory
from . import layout

log = logging.getLogger(__name__)

SPEC_REV = 4                       # MP spec 1.4
FLOATING_SIGNATURE = b"_MP_"
CONFIG_SIGNATURE = b"PCMP"
OEM_ID = b"PYVMM   "
PRODUCT_ID = b"PYVMM-MP    "
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600              # family 6, model 0, stepping 0
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, on-chip APIC
ISA_IRQS = 16
ISA_CASCADE_IRQ = 2                # the 8259 cascade: no IOAPIC route of its own
ALL_LAPICS = 0xFF

# BIOS data area words that point at the EBDA and give base memory in KiB.
BDA_EBDA_SEGMENT = 0x40E
BDA_BASE_MEM_KIB = 0x413
# Where tables too large for the EBDA go: the top 4 KiB of the BIOS area
# (reserved in the e820 map; ACPI tables grow up from its bottom).
OVERFLOW_ADDR = layout.BIOS_AREA_END - 0x1000

# struct formats, little-endian, as in the spec's tables 4-1 .. 4-12.
FLOATING_POINTER = struct.Struct("<4sIBBB5s")        # signature, config addr, length/16, rev, checksum, features
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")  # signature, length, rev, checksum, OEM, product,
                                                     # OEM table, OEM size, entry count, LAPIC addr,
                                                     # extended length, extended checksum
PROCESSOR = struct.Struct("<BBBBII8x")               # type, APIC id, APIC version, flags, signature, features
BUS = struct.Struct("<BB6s")                         # type, bus id, bus type string
IOAPIC = struct.Struct("<BBBBI")                     # type, id, version, flags, address
INTERRUPT = struct.Struct("<BBHBBBB")                # type, int type, flags, src bus, src irq, dst id, dst pin

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINT, ENTRY_LINT = 0, 1, 2, 3, 4
ENTRY_SIZES = {ENTRY_PROCESSOR: PROCESSOR.size, ENTRY_BUS: BUS.size, ENTRY_IOAPIC: IOAPIC.size,
               ENTRY_IOINT: INTERRUPT.size, ENTRY_LINT: INTERRUPT.size}
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
CPU_ENABLED, CPU_BSP = 0x01, 0x02
IOAPIC_ENABLED = 0x01
ISA_BUS_ID = 0


def _checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte 0) sum to 0 modulo 256."""
    return (-sum(data)) & 0xFF


def isa_irq_pin(irq: int) -> int:
    """The IOAPIC pin an ISA IRQ arrives on: the PIT's IRQ 0 on pin 2, as on PCs."""
    return 2 if irq == 0 else irq


def build_mptable(cpus: int, addr: int = layout.EBDA_ADDR) -> bytes:
    """The floating pointer followed by the configuration table, for placing at `addr`.

    Raises ConfigError for a CPU count outside 1..254."""
    if not 1 <= cpus <= 254:
        raise ConfigError(f"an MP table describes 1..254 CPUs, not {cpus}")
    ioapic_id = cpus
    entries = [PROCESSOR.pack(ENTRY_PROCESSOR, i, LAPIC_VERSION,
                              CPU_ENABLED | (CPU_BSP if i == 0 else 0), CPU_SIGNATURE, CPU_FEATURES)
               for i in range(cpus)]
    entries.append(BUS.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        if irq == ISA_CASCADE_IRQ:
            continue
        entries.append(INTERRUPT.pack(ENTRY_IOINT, INT_TYPE_INT, 0, ISA_BUS_ID, irq,
                                      ioapic_id, isa_irq_pin(irq)))
    entries.append(INTERRUPT.pack(ENTRY_LINT, INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0, ALL_LAPICS, 0))
    entries.append(INTERRUPT.pack(ENTRY_LINT, INT_TYPE_NMI, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1))
    body = b"".join(entries)

    config_addr = addr + FLOATING_POINTER.size
    length = CONFIG_HEADER.size + len(body)
    header = CONFIG_HEADER.pack(CONFIG_SIGNATURE, length, SPEC_REV, 0, OEM_ID, PRODUCT_ID,
                                0, 0, len(entries), layout.LAPIC_ADDR, 0, 0)
    csum = _checksum(header + body)
    header = header[:7] + bytes([csum]) + header[8:]

    fp = FLOATING_POINTER.pack(FLOATING_SIGNATURE, config_addr, 1, SPEC_REV, 0, bytes(5))
    fp = fp[:10] + bytes([_checksum(fp)]) + fp[11:]
    return fp + header + body


def write_mptable(memory: GuestMemory, cpus: int, addr: int | None = None,
                  limit: int | None = None) -> int:
    """Writes the MP tables for `cpus` CPUs and returns their address.

    By default they go in the EBDA (room for 40 CPUs), or, when larger, in
    the last 4 KiB of the reserved BIOS area (OVERFLOW_ADDR), which Linux
    scans too.  An explicit `addr` must have the tables end by `limit`.
    The BIOS data area is pointed at the EBDA either way.
    Raises ConfigError when the tables do not fit."""
    if addr is None:
        table = build_mptable(cpus, layout.EBDA_ADDR)
        if layout.EBDA_ADDR + len(table) <= layout.EBDA_END:
            addr = layout.EBDA_ADDR
        else:
            addr, limit = OVERFLOW_ADDR, layout.BIOS_AREA_END
            table = build_mptable(cpus, addr)
    else:
        table = build_mptable(cpus, addr)
    limit = layout.EBDA_END if limit is None else limit
    if addr + len(table) > limit:
        raise ConfigError(f"MP table for {cpus} CPUs needs {len(table)} bytes but only "
                          f"{limit - addr} are reserved at 0x{addr:x}")
    memory.write(addr, table)
    memory.write_u16(BDA_EBDA_SEGMENT, layout.EBDA_ADDR >> 4)
    memory.write_u16(BDA_BASE_MEM_KIB, layout.EBDA_ADDR >> 10)
    log.debug("MP table for %d CPUs at 0x%x (%d bytes)", cpus, addr, len(table))
    return addr


@dataclass
class MpTable:
    """An MP table read back from guest memory (for tests and debugging)."""
    config_addr: int
    lapic_addr: int
    processors: list[tuple[int, int, int]] = field(default_factory=list)       # (apic id, version, flags)
    buses: list[tuple[int, bytes]] = field(default_factory=list)              # (id, type)
    ioapics: list[tuple[int, int, int, int]] = field(default_factory=list)    # (id, version, flags, addr)
    io_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    local_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    # interrupt tuples: (int type, flags, src bus, src irq, dst id, dst pin)


def read_mptable(memory: GuestMemory, addr: int = layout.EBDA_ADDR) -> MpTable:
    """Parses and checks the MP tables at `addr`.

    Raises ImageError for a bad signature, checksum or entry."""
    fp = memory.read(addr, FLOATING_POINTER.size)
    sig, config_addr, length16, _, _, _ = FLOATING_POINTER.unpack(fp)
    if sig != FLOATING_SIGNATURE or sum(fp[:length16 * 16]) & 0xFF:
        raise ImageError(f"no valid MP floating pointer at 0x{addr:x}")
    hdr = memory.read(config_addr, CONFIG_HEADER.size)
    csig, length, _, _, _, _, _, _, count, lapic, _, _ = CONFIG_HEADER.unpack(hdr)
    table = memory.read(config_addr, length)
    if csig != CONFIG_SIGNATURE or sum(table) & 0xFF:
        raise ImageError(f"no valid MP configuration table at 0x{config_addr:x}")
    mp = MpTable(config_addr=config_addr, lapic_addr=lapic)
    off = CONFIG_HEADER.size
    for _ in range(count):
        kind = table[off]
        if kind not in ENTRY_SIZES or off + ENTRY_SIZES[kind] > length:
            raise ImageError(f"bad MP table entry type {kind} at offset {off}")
        if kind == ENTRY_PROCESSOR:
            mp.processors.append(PROCESSOR.unpack_from(table, off)[1:4])
        elif kind == ENTRY_BUS:
            mp.buses.append(BUS.unpack_from(table, off)[1:])
        elif kind == ENTRY_IOAPIC:
            mp.ioapics.append(IOAPIC.unpack_from(table, off)[1:])
        elif kind == ENTRY_IOINT:
            mp.io_interrupts.append(INTERRUPT.unpack_from(table, off)[1:])
        else:
            mp.local_interrupts.append(INTERRUPT.unpack_from(table, off)[1:])
        off += ENTRY_SIZES[kind]
    return mp
