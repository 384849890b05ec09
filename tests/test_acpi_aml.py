"""The AML writer (pyvmm/boot/aml.py) against byte sequences worked out by
hand from the AML grammar (ACPI 6.4, chapter 20), and the DSDT with the
PCI hotplug slots (pyvmm/boot/acpi_hotplug.py) disassembled by ACPICA's
iasl, which must parse every byte of it."""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from pyvmm.boot import acpi, aml
from pyvmm.boot.acpi_hotplug import pci_hotplug_aml
from pyvmm.devices.pci.aml import pci_root_aml
from pyvmm.memory import GuestMemory

from .hostfacts import require_from_setup

H = bytes.fromhex


@pytest.mark.parametrize("body, encoded", [
    (0, "01"),           # the length counts its own byte
    (62, "3f"),          # 63: the largest one-byte length
    (63, "4104"),        # 65 = 0x41: two bytes, low nibble 1 in the lead byte, then 0x4
    (4093, "4fff"),      # 4095 = 0xfff: the largest two-byte length
    (4094, "810001"),    # 4097 = 0x1001: three bytes
])
def test_pkg_length(body, encoded):
    assert aml.pkg_length(body) == H(encoded)


def test_field_length_does_not_count_itself():
    assert aml.field_length(32) == H("20")
    assert aml.field_length(64) == H("4004")


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (1, "01"), (5, "0a05"), (0xAE00, "0b00ae"), (0x10000, "0c00000100"),
    (1 << 32, "0e0000000001000000"),
])
def test_integer(value, encoded):
    assert aml.integer(value) == H(encoded)


def test_integer_out_of_range():
    with pytest.raises(ValueError):
        aml.integer(-1)
    with pytest.raises(ValueError):
        aml.integer(1 << 64)


@pytest.mark.parametrize("path, encoded", [
    ("S1", b"S1__"),
    ("PCI0.S01", b"\x2ePCI0S01_"),                    # DualNamePrefix
    ("\\_SB_.PCI0.PCNT", b"\\\x2f\x03_SB_PCI0PCNT"),   # RootChar, MultiNamePrefix, 3 segments
    ("^PCEJ", b"^PCEJ"),                              # ParentPrefixChar
    ("\\", b"\\\x00"),                                # the root: RootChar, NullName
])
def test_name_string(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["s01", "TOOLONG", "1ABC", "", "A-B"])
def test_bad_name_segment(bad):
    with pytest.raises(ValueError):
        aml.name_seg(bad)


def test_terms():
    # OperationRegion (PCST, SystemIO, 0xAE00, 0x08)
    assert aml.operation_region("PCST", aml.SYSTEM_IO, 0xAE00, 8) == H("5b80") + b"PCST" + H("01 0b00ae 0a08")
    # Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32 }: body of 15, PkgLength 16
    flags = aml.DWORD_ACC | aml.NO_LOCK | aml.WRITE_AS_ZEROS
    assert aml.field("PCST", flags, ("PCIU", 32), ("PCID", 32)) == \
        H("5b81 10") + b"PCST" + H("43") + b"PCIU" + H("20") + b"PCID" + H("20")
    # Method (_EJ0, 1, NotSerialized) { Store (0x02, B0EJ) }: body of 12
    assert aml.method("_EJ0", 1, aml.store(2, aml.name_string("B0EJ"))) == \
        H("14 0d") + b"_EJ0" + H("01 70 0a02") + b"B0EJ"
    assert aml.method("LOCK", 2, serialized=True) == H("14 06") + b"LOCK" + H("0a")
    # If (And (Local0, 0x02)) { Notify (S01, One) }: body of 11
    assert aml.if_(aml.and_(aml.local(0), 2), aml.notify("S01", aml.DEVICE_CHECK)) == \
        H("a0 0c 7b 60 0a02 00 86") + b"S01_" + H("01")
    # Store (ShiftLeft (One, Arg0), B0EJ)
    assert aml.store(aml.shift_left(1, aml.arg(0)), aml.name_string("B0EJ")) == H("70 79 01 68 00") + b"B0EJ"
    assert aml.store(aml.name_string("PCIU"), aml.local(1)) == H("70") + b"PCIU" + H("61")
    # Scope (\_GPE) { Method (_E01, 0) { \_SB.PCI0.PCNT () } }: method body 20, scope body 27
    assert aml.scope("\\_GPE", aml.method("_E01", 0, aml.call("\\_SB_.PCI0.PCNT"))) == \
        H("10 1c 5c") + b"_GPE" + H("14 15") + b"_E01" + H("00 5c 2f 03") + b"_SB_PCI0PCNT"
    # Device (S01) { Name (_ADR, 0x00010000) }: body 14
    assert aml.device("S01", aml.name("_ADR", 0x10000)) == \
        H("5b82 0f") + b"S01_" + H("08") + b"_ADR" + H("0c 00000100")
    assert aml.dword(2) == H("0c 02000000")
    assert aml.call("PCEJ", aml.name_string("_SUN")) == b"PCEJ_SUN"


def test_long_device_gets_a_two_byte_length():
    body = aml.name("_ADR", 0x10000) * 7               # 70 bytes of names, 74 with the NameSeg
    encoded = aml.device("S01", body)
    assert encoded[:4] == H("5b82 4c04")                  # 74 + 2 = 76 = 0x4c: lead 0x40 | 0xc, then 0x4
    assert len(encoded) == 2 + 2 + 4 + 70


def _dsdt_with_hotplug(tmp_path) -> bytes:
    mem = GuestMemory(32 << 20)
    try:
        acpi.write_acpi_tables(mem, 1, pci_root_aml() + pci_hotplug_aml())
        rsdp = mem.read(acpi.RSDP_ADDR, 36)
        rsdt = struct.unpack_from("<I", rsdp, 16)[0]
        fadt = struct.unpack_from("<I", mem.read(rsdt, 40), 36)[0]
        dsdt = struct.unpack_from("<I", mem.read(fadt, 44), 40)[0]
        length = struct.unpack_from("<I", mem.read(dsdt, 8), 4)[0]
        return mem.read(dsdt, length)
    finally:
        mem.close()


def test_iasl_disassembles_the_hotplug_dsdt(tmp_path):
    require_from_setup(programs=["iasl"], package="acpica-tools")
    raw = _dsdt_with_hotplug(tmp_path)
    assert raw[:4] == b"DSDT" and sum(raw) % 256 == 0
    (tmp_path / "dsdt.aml").write_bytes(raw)
    done = subprocess.run(["iasl", "-d", "dsdt.aml"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not re.search(r"\b(Error|Warning)\b", done.stdout + done.stderr), done.stdout + done.stderr
    dsl = re.sub(r"\s+", " ", (tmp_path / "dsdt.dsl").read_text())
    assert "Scope (\\_SB.PCI0) { OperationRegion (PCST, SystemIO, 0xAE00, 0x08)" \
           " Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32 }" in dsl
    assert "Field (SEJ, DWordAcc, NoLock, WriteAsZeros) { B0EJ, 32 }" in dsl
    assert "Method (PCEJ, 1, NotSerialized) { B0EJ = (One << Arg0) }" in dsl
    for slot in (1, 0x1F):
        assert (f"Device (S{slot:02X}) {{ Name (_ADR, 0x{slot:04X}0000) // _ADR: Address"
                f" Name (_SUN, {'One' if slot == 1 else f'0x{slot:02X}'}) // _SUN: Slot User Number"
                f" Method (_EJ0, 1, NotSerialized) // _EJx: Eject Device, x=0-9 {{ PCEJ (_SUN) }} }}") in dsl
        assert (f"If ((Local0 & 0x{1 << slot:08X})) {{ Notify (S{slot:02X}, One) // Device Check }}"
                f" If ((Local1 & 0x{1 << slot:08X})) {{ Notify (S{slot:02X}, 0x03) // Eject Request }}") in dsl
    assert len(re.findall(r"Device \(S[0-9A-F]{2}\)", dsl)) == 31
    assert "Method (PCNT, 0, NotSerialized) { Local0 = PCIU /* \\_SB_.PCI0.PCIU */" \
           " Local1 = PCID /* \\_SB_.PCI0.PCID */" in dsl
    # ... and the disassembly is ASL that iasl compiles again (a misparse would not be).
    again = subprocess.run(["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, check=False, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "0 Errors" in again.stdout, again.stdout + again.stderr
    assert "Scope (\\_GPE) { Method (_E01, 0, NotSerialized) // _Exx: Edge-Triggered GPE, xx=0x00-0xFF" \
           " { \\_SB.PCI0.PCNT () } }" in dsl
