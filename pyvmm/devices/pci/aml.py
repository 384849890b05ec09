"""The DSDT's description of PCI bus 0, as hand-encoded AML:

    Scope (\\_SB) {
        Device (PCI0) {
            Name (_HID, EisaId ("PNP0A03"))     // PCI root bridge
            Name (_UID, 0)
            Name (_ADR, 0)
            Name (_CRS, ResourceTemplate () {   // what the bridge decodes
                WordBusNumber 0-0
                WordIO 0-0xCF7, WordIO 0xD00-0xFFFF
                DWordMemory host.MMIO_WINDOW
            })
            Name (_PRT, Package () {            // slot S INTx -> GSI, as host.intx_gsi
                Package () { 0xSSSSFFFF, pin, Zero, gsi }, ...
            })
        }
        Device (MRES) {
            Name (_HID, EisaId ("PNP0C02"))     // motherboard resources
            Name (_CRS, ResourceTemplate () {
                Memory32Fixed host.ECAM_BASE, host.ECAM_SIZE
            })
        }
    }

MRES claims the ECAM window: Linux uses the window the MCFG table names
only when the firmware reserved it, in the e820 map or as a motherboard
resource (arch/x86/pci/mmconfig-shared.c); otherwise it logs "not using
MMCONFIG" and stays on ports 0xCF8/0xCFC.

Without a PNP0A03 device an ACPI kernel never scans the bus (Linux uses
ACPI for IRQ routing whenever ACPI is on, and then only probes the root
bridges the namespace names).  _PRT entries with a zero Source are GSIs
(ACPI 6.4, 6.2.13); Linux takes them as level-triggered, active-low,
which the IOAPIC models ignore as KVM's does (devices report logical
levels).

Encodings: ACPI 6.4 chapter 20 (AML grammar) and 6.4 (resource data types).
"""

from __future__ import annotations

import struct

from ...boot.aml import integer, pkg_length
from .host import ECAM_BASE, ECAM_SIZE, IO_WINDOW, MMIO_WINDOW, SLOTS, intx_gsi

NAME_OP, SCOPE_OP, PACKAGE_OP, BUFFER_OP = 0x08, 0x10, 0x12, 0x11
EXT_OP, DEVICE_OP = 0x5B, 0x82
ZERO_OP, ONE_OP = 0x00, 0x01
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E
ROOT_CHAR = 0x5C

# Large resource descriptors: tag, length, then the fields.
WORD_ADDRESS = struct.Struct("<BHBBBHHHHH")     # 0x88, len 13, type, general, specific, gran, min, max, tra, len
DWORD_ADDRESS = struct.Struct("<BHBBBIIIII")    # 0x87, len 23, ...
RES_MEMORY, RES_IO, RES_BUS = 0, 1, 2
MIN_MAX_FIXED = 0x0C           # _MIF and _MAF: the range is exactly this
IO_ENTIRE_RANGE = 0x03
MEM_READ_WRITE = 0x01
END_TAG = bytes([0x79, 0x00])  # checksum 0: "treat as summing to zero"
MEMORY32_FIXED = struct.Struct("<BHBII")       # 0x86, len 9, read/write, base, length
PNP0A03 = 0x030AD041           # EisaId("PNP0A03") as the AML DWord
PNP0C02 = 0x020CD041           # EisaId("PNP0C02"): motherboard resources


def name(seg: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + seg.encode() + value


def package(items: list[bytes]) -> bytes:
    body = bytes([len(items)]) + b"".join(items)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def device(seg: str, body: bytes) -> bytes:
    inner = seg.encode() + body
    return bytes([EXT_OP, DEVICE_OP]) + pkg_length(len(inner)) + inner


def scope(path: bytes, body: bytes) -> bytes:
    inner = path + body
    return bytes([SCOPE_OP]) + pkg_length(len(inner)) + inner


def _word(kind: int, specific: int, lo: int, hi: int) -> bytes:
    return WORD_ADDRESS.pack(0x88, WORD_ADDRESS.size - 3, kind, MIN_MAX_FIXED, specific,
                             0, lo, hi, 0, hi - lo + 1)


def root_resources() -> bytes:
    """_CRS of the root bridge: bus 0 (the one bus, all the ECAM window
    covers), the I/O ports around the config ports, and the MMIO window
    BARs are placed in."""
    lo, hi = MMIO_WINDOW
    crs = (_word(RES_BUS, 0, 0, 0)
           + _word(RES_IO, IO_ENTIRE_RANGE, 0, 0xCF7)
           + _word(RES_IO, IO_ENTIRE_RANGE, 0xD00, IO_WINDOW[1] - 1)
           + DWORD_ADDRESS.pack(0x87, DWORD_ADDRESS.size - 3, RES_MEMORY, MIN_MAX_FIXED, MEM_READ_WRITE,
                                0, lo, hi - 1, 0, hi - lo)
           + END_TAG)
    return crs


def routing_table() -> bytes:
    """_PRT: INTA#..INTD# of slots 1-31 (every pin of a slot on its one GSI)."""
    entries = [package([integer((slot << 16) | 0xFFFF), integer(pin), integer(0), integer(intx_gsi(slot))])
               for slot in range(1, SLOTS) for pin in range(4)]
    return package(entries)


def ecam_reservation() -> bytes:
    """_CRS of the motherboard-resources device: the ECAM window."""
    return MEMORY32_FIXED.pack(0x86, MEMORY32_FIXED.size - 3, MEM_READ_WRITE, ECAM_BASE, ECAM_SIZE) + END_TAG


def pci_root_aml() -> bytes:
    """The Scope(\\_SB) { Device(PCI0) {...} Device(MRES) {...} } term to
    append to a DSDT."""
    body = (name("_HID", integer(PNP0A03)) + name("_UID", integer(0)) + name("_ADR", integer(0))
            + name("_CRS", buffer(root_resources())) + name("_PRT", routing_table()))
    reserved = name("_HID", integer(PNP0C02)) + name("_CRS", buffer(ecam_reservation()))
    return scope(bytes([ROOT_CHAR]) + b"_SB_", device("PCI0", body) + device("MRES", reserved))


__all__ = ["pci_root_aml", "pkg_length", "integer", "routing_table", "root_resources", "ecam_reservation"]
