"""ACPI tables for a PC with an IOAPIC, one local APIC per vCPU and the PM
block of devices/acpi_pm.py.

write_acpi_tables() puts, from layout.BIOS_AREA_ADDR on (where guests scan
for the RSDP, and which the e820 map reserves):

    RSDP (rev 2) -> RSDT and XSDT -> FADT, MADT[, MCFG]
    FADT -> FACS, DSDT (AML: Name(_S5_, Package(){5, 5, 0, 0}), and the PCI
            bus with its hotplug slots when there is one)

MCFG (PCI Firmware spec 3.2, 4.1.2) is there when the machine has a PCI bus:
it names the ECAM window of devices/pci/ecam.py.

ACPI is always enabled: the FADT has no SMI command port, and PM1_CNT.SCI_EN
reads 1 from reset.  Power-off is SLP_TYP=5 | SLP_EN written to PM1a_CNT.
Reset is the keyboard controller's pulse (0xFE written to port 0x64).
"""

from __future__ import annotations

import logging
import struct

from ..devices import acpi_pm
from ..errors import ConfigError
from ..memory import GuestMemory
from . import layout

log = logging.getLogger(__name__)

RSDP_ADDR = layout.BIOS_AREA_ADDR

# The PM register block (devices/acpi_pm.py, one device at 0x600..0x60b).
PM_BASE = acpi_pm.PM_BASE
PM1A_EVT_BLK = PM_BASE + acpi_pm.PM1_STS_OFFSET   # 0x600: PM1_STS (2 bytes) + PM1_EN (2 bytes)
PM1_EVT_LEN = 4
PM1A_CNT_BLK = PM_BASE + acpi_pm.PM1_CNT_OFFSET   # 0x604: PM1_CNT
PM1_CNT_LEN = 2
PM_TMR_BLK = PM_BASE + acpi_pm.PM_TMR_OFFSET      # 0x608: 32-bit PM timer
PM_TMR_LEN = 4
GPE0_BLK = PM_BASE + acpi_pm.GPE0_STS_OFFSET      # 0x60c: GPE0_STS (2 bytes) + GPE0_EN (2 bytes)
GPE0_BLK_LEN = acpi_pm.GPE0_LENGTH
PM_BLOCK_LEN = acpi_pm.PM_LENGTH
SCI_IRQ = 9
SLP_TYP_S5 = acpi_pm.SLP_TYP_SOFT_OFF             # the value in the DSDT's _S5_ package
RESET_PORT = 0x64               # i8042 command port ...
RESET_VALUE = 0xFE              # ... "pulse reset line"

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMTBL"
CREATOR_ID = b"PYVM"

# Common header of every system description table (36 bytes):
# signature, length, revision, checksum, OEM id, OEM table id, OEM revision,
# creator id, creator revision.
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
# RSDP rev 2: signature, checksum, OEM id, revision, RSDT, length, XSDT,
# extended checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3x")
# Generic Address Structure: space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# FADT flags.
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5   # 1: no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8  # the PM timer is 32 bits wide
FADT_RESET_REG_SUP = 1 << 10
# PWR_BUTTON (bit 4) stays clear: the power button is the fixed-feature one in PM1.
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
FADT_REVISION = 3
FADT_LENGTH = 244

# MADT.
MADT_PCAT_COMPAT = 1
MADT_LAPIC = struct.Struct("<BBBBI")      # type 0, len 8, ACPI uid, APIC id, flags
MADT_IOAPIC = struct.Struct("<BBBBII")    # type 1, len 12, id, 0, address, GSI base
MADT_ISO = struct.Struct("<BBBBIH")       # type 2, len 10, bus, source IRQ, GSI, flags
MADT_LAPIC_NMI = struct.Struct("<BBBHB")  # type 4, len 6, uid (0xff = all), flags, LINT#
LAPIC_ENABLED = 1
# MPS INTI flags: polarity bits 0-1 (1 = active high), trigger bits 2-3 (1 edge, 3 level).
INTI_EDGE_HIGH = 0x1 | (0x1 << 2)
INTI_LEVEL_HIGH = 0x1 | (0x3 << 2)

# MCFG: 8 reserved bytes after the header, then one allocation per segment:
# ECAM base, PCI segment, first bus, last bus, 4 reserved bytes.
MCFG_ALLOCATION = struct.Struct("<QHBB4x")
MCFG_REVISION = 1

# DSDT body, hand-encoded AML:
S5_AML = bytes([
    0x08,                    # NameOp
    0x5F, 0x53, 0x35, 0x5F,  # NameSeg "_S5_"
    0x12,                    # PackageOp
    0x08,                    # PkgLength: 8 bytes, counting itself, up to the package end
    0x04,                    # NumElements
    0x0A, SLP_TYP_S5,        # BytePrefix 5: SLP_TYPa
    0x0A, SLP_TYP_S5,        # BytePrefix 5: SLP_TYPb
    0x00,                    # ZeroOp (reserved)
    0x00,                    # ZeroOp (reserved)
])


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus itself sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = SDT_HEADER.size + len(body)
    raw = SDT_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1) + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def _gas(port: int, length: int, access: int) -> bytes:
    return GAS.pack(GAS_SYSTEM_IO, length * 8, 0, access, port)


def build_madt(cpus: int) -> bytes:
    """MADT: one enabled local APIC per vCPU (APIC id = index), the IOAPIC
    (id = cpus, GSI base 0), IRQ0 -> GSI2 and the level-triggered SCI."""
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(cpus):
        body += MADT_LAPIC.pack(0, MADT_LAPIC.size, i, i, LAPIC_ENABLED)
    body += MADT_IOAPIC.pack(1, MADT_IOAPIC.size, cpus, 0, layout.IOAPIC_ADDR, 0)
    body += MADT_ISO.pack(2, MADT_ISO.size, 0, 0, 2, INTI_EDGE_HIGH)
    body += MADT_ISO.pack(2, MADT_ISO.size, 0, SCI_IRQ, SCI_IRQ, INTI_LEVEL_HIGH)
    body += MADT_LAPIC_NMI.pack(4, MADT_LAPIC_NMI.size, 0xFF, 0, 1)
    return _table(b"APIC", 3, body)


def build_mcfg(ecam_base: int, first_bus: int, last_bus: int) -> bytes:
    """MCFG with one ECAM allocation for segment 0, buses first..last."""
    return _table(b"MCFG", MCFG_REVISION, bytes(8) + MCFG_ALLOCATION.pack(ecam_base, 0, first_bus, last_bus))


def build_fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    """FADT revision 3 (244 bytes) describing the PM block at PM_BASE."""
    f = bytearray(FADT_LENGTH - SDT_HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, f, offset - SDT_HEADER.size, *values)

    put(36, "<II", facs_addr, dsdt_addr)          # FIRMWARE_CTRL, DSDT
    put(45, "<B", 0)                              # Preferred_PM_Profile: unspecified
    put(46, "<H", SCI_IRQ)                        # SCI_INT
    put(48, "<I", 0)                              # SMI_CMD: none, ACPI always on
    put(56, "<II", PM1A_EVT_BLK, 0)               # PM1a/b_EVT_BLK
    put(64, "<II", PM1A_CNT_BLK, 0)               # PM1a/b_CNT_BLK
    put(72, "<II", 0, PM_TMR_BLK)                 # PM2_CNT_BLK, PM_TMR_BLK
    put(80, "<II", GPE0_BLK, 0)                   # GPE0_BLK, GPE1_BLK
    put(88, "<BBBBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, GPE0_BLK_LEN, 0)
    put(96, "<HH", 101, 1001)                     # P_LVL2/3_LAT: C2/C3 not supported
    put(108, "<B", 0x32)                          # CENTURY: RTC CMOS index
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT)
    put(112, "<I", FADT_FLAGS)
    put(116, "<12s", _gas(RESET_PORT, 1, ACCESS_BYTE))  # RESET_REG
    put(128, "<B", RESET_VALUE)
    # X_FIRMWARE_CTRL must be 0 when FIRMWARE_CTRL is used (the FACS is below 4 GiB).
    put(132, "<QQ", 0, dsdt_addr)                 # X_FIRMWARE_CTRL, X_DSDT
    put(148, "<12s", _gas(PM1A_EVT_BLK, PM1_EVT_LEN, ACCESS_WORD))   # X_PM1a_EVT_BLK
    put(172, "<12s", _gas(PM1A_CNT_BLK, PM1_CNT_LEN, ACCESS_WORD))   # X_PM1a_CNT_BLK
    put(208, "<12s", _gas(PM_TMR_BLK, PM_TMR_LEN, ACCESS_DWORD))     # X_PM_TMR_BLK
    put(220, "<12s", _gas(GPE0_BLK, GPE0_BLK_LEN, ACCESS_BYTE))      # X_GPE0_BLK
    return _table(b"FACP", FADT_REVISION, bytes(f))


def build_facs() -> bytes:
    """FACS (64 bytes, no checksum): signature, length, hardware signature,
    waking vectors, global lock, flags, version 2."""
    return struct.pack("<4sIIIII QB31x", b"FACS", 64, 0, 0, 0, 0, 0, 2)


def build_rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, RSDP.size, xsdt_addr, 0))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def write_acpi_tables(memory: GuestMemory, cpus: int, dsdt_extra: bytes = b"",
                      extra_tables: tuple[bytes, ...] = ()) -> int:
    """Writes RSDP, RSDT, XSDT, FADT, FACS, DSDT and MADT into the BIOS area;
    returns the RSDP address (always RSDP_ADDR).

    `dsdt_extra` is AML appended to the DSDT (the PCI root bridge of
    devices/pci/aml.py when the machine has PCI devices); `extra_tables`
    are whole tables (build_mcfg) that the RSDT and XSDT list after the MADT.
    Raises ConfigError for a CPU count the MADT cannot describe, and
    GuestMemoryError when the BIOS area is not RAM."""
    if not 1 <= cpus <= 254:
        raise ConfigError(f"ACPI: cannot describe {cpus} CPUs (1..254)")
    cursor = RSDP_ADDR + 64
    placed: dict[str, int] = {}

    def place(name: str, data: bytes, align: int = 16) -> int:
        nonlocal cursor
        addr = (cursor + align - 1) & ~(align - 1)
        if addr + len(data) > layout.BIOS_AREA_END:
            raise ConfigError("ACPI tables do not fit in the BIOS area")
        memory.write(addr, data)
        cursor = addr + len(data)
        placed[name] = addr
        return addr

    facs = place("FACS", build_facs(), align=64)
    dsdt = place("DSDT", _table(b"DSDT", 2, S5_AML + dsdt_extra))
    fadt = place("FACP", build_fadt(facs, dsdt))
    listed = [fadt, place("APIC", build_madt(cpus))]
    listed += [place(table[:4].decode(), table) for table in extra_tables]
    rsdt = place("RSDT", _table(b"RSDT", 1, struct.pack(f"<{len(listed)}I", *listed)))
    xsdt = place("XSDT", _table(b"XSDT", 1, struct.pack(f"<{len(listed)}Q", *listed)))
    memory.write(RSDP_ADDR, build_rsdp(rsdt, xsdt))
    log.debug("ACPI tables: RSDP 0x%x %s", RSDP_ADDR,
              " ".join(f"{n}@0x{a:x}" for n, a in placed.items()))
    return RSDP_ADDR
