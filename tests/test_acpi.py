"""ACPI tables parsed back from guest memory, and the PM device through a bus."""

from __future__ import annotations

import json
import struct

import pytest

from pyvmm.boot import acpi, layout
from pyvmm.bus import Bus
from pyvmm.devices.acpi_pm import (PM_TIMER_HZ, PWRBTN_STS, REGISTER_RANGE, SCI_EN, AcpiPm)
from pyvmm.device import DeviceStateError
from pyvmm.errors import ConfigError
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory

MIB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(32 * MIB)
    yield m
    m.close()


def table(mem: GuestMemory, addr: int) -> tuple[bytes, bytes]:
    """(signature, whole table) after checking length and checksum."""
    sig, length = struct.unpack("<4sI", mem.read(addr, 8))
    raw = mem.read(addr, length)
    assert sum(raw) % 256 == 0, f"{sig} checksum"
    assert layout.BIOS_AREA_ADDR <= addr and addr + length <= layout.BIOS_AREA_END
    return sig, raw


def tables(mem: GuestMemory, cpus: int = 2) -> dict[bytes, bytes]:
    rsdp_addr = acpi.write_acpi_tables(mem, cpus)
    assert rsdp_addr == acpi.RSDP_ADDR and rsdp_addr % 16 == 0
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    sig, rev, rsdt_addr, length, xsdt_addr = struct.unpack_from("<8s7xBIIQ", rsdp)
    assert rev == 2 and length == 36
    _, rsdt = table(mem, rsdt_addr)
    _, xsdt = table(mem, xsdt_addr)
    rsdt_ptrs = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    xsdt_ptrs = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert list(rsdt_ptrs) == list(xsdt_ptrs)
    out = {b"RSDT": rsdt, b"XSDT": xsdt}
    for p in rsdt_ptrs:
        sig, raw = table(mem, p)
        out[sig] = raw
    return out


def test_rsdt_lists_fadt_and_madt(mem):
    t = tables(mem)
    assert set(t) == {b"RSDT", b"XSDT", b"FACP", b"APIC"}


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_madt_entries(mem, cpus):
    madt = tables(mem, cpus)[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.LAPIC_ADDR and flags & 1
    off, entries = 44, []
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        entries.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    lapics = [e for t, e in entries if t == 0]
    assert len(lapics) == cpus
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == \
        [(i, i, 1) for i in range(cpus)]
    (ioapic,) = [e for t, e in entries if t == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, cpus, 0, layout.IOAPIC_ADDR, 0)
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for t, e in entries if t == 2}
    assert overrides == {0: (2, 0x5), 9: (9, 0xD)}


def test_fadt_fields(mem):
    t = tables(mem)
    fadt = t[b"FACP"]
    assert len(fadt) == 244 and fadt[8] == 3
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert struct.unpack_from("<H", fadt, 46)[0] == 9          # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0          # SMI_CMD: none
    assert struct.unpack_from("<I", fadt, 56)[0] == 0x600      # PM1a_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == 0x604      # PM1a_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608      # PM_TMR_BLK
    assert struct.unpack_from("<BBBB", fadt, 88) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_RESET_REG_SUP and flags & acpi.FADT_TMR_VAL_EXT
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64) and fadt[128] == 0xFE
    x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert (x_facs, x_dsdt) == (0, dsdt_addr)     # one FACS pointer only
    assert struct.unpack_from("<II", fadt, 80) == (0x60C, 0)   # GPE0_BLK, GPE1_BLK
    assert struct.unpack_from("<BB", fadt, 92) == (4, 0)         # GPE0_BLK_LEN, GPE1_BLK_LEN
    for off, port, length in ((148, 0x600, 4), (172, 0x604, 2), (208, 0x608, 4), (220, 0x60C, 4)):
        space, bits, _o, _a, addr = struct.unpack_from("<BBBBQ", fadt, off)
        assert (space, bits, addr) == (1, length * 8, port)
    assert facs_addr % 64 == 0
    facs = mem.read(facs_addr, 64)
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    sig, dsdt = table(mem, dsdt_addr)
    assert sig == b"DSDT"
    # Name(_S5_, Package(){5, 5, 0, 0}) in AML.
    assert bytes.fromhex("085f53355f1208040a050a050000") in dsdt[36:]


def test_too_many_cpus(mem):
    with pytest.raises(ConfigError):
        acpi.write_acpi_tables(mem, 255)


# ---------------------------------------------------------------- PM device
class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pm_bus(**kw) -> tuple[AcpiPm, Bus]:
    dev = AcpiPm(**kw)
    bus = Bus("io")
    bus.insert(acpi.PM_BASE, REGISTER_RANGE, dev, "acpi-pm")
    assert REGISTER_RANGE == acpi.PM_BLOCK_LEN
    return dev, bus


def test_pm_timer_counts_and_wraps():
    clock = FakeClock()
    _, bus = pm_bus(clock=clock)
    assert bus.read(acpi.PM_TMR_BLK, 4) == 0
    values = []
    for _ in range(5):
        clock.t += 0.25
        values.append(bus.read(acpi.PM_TMR_BLK, 4))
    assert values == sorted(values) and len(set(values)) == 5
    assert values[-1] == int(1.25 * PM_TIMER_HZ)
    clock.t = 100.0 + (1 << 32) / PM_TIMER_HZ + 1.0  # one full period plus a second
    assert bus.read(acpi.PM_TMR_BLK, 4) in range(PM_TIMER_HZ - 2, PM_TIMER_HZ + 2)
    # Byte reads see the same lanes.
    clock.t = 100.0 + 0x123456 / PM_TIMER_HZ + 1e-9
    assert bus.read(acpi.PM_TMR_BLK + 1, 1) == 0x34
    # Writes to the timer are ignored.
    bus.write(acpi.PM_TMR_BLK, 4, 0)
    assert bus.read(acpi.PM_TMR_BLK, 4) == 0x123456


def test_pm_timer_state_round_trip():
    clock = FakeClock()
    dev, _ = pm_bus(clock=clock)
    clock.t += 2.0
    state = dev.save()
    other = AcpiPm(clock=clock)
    other.restore(state)
    assert other.timer() == dev.timer() == 2 * PM_TIMER_HZ


def test_sci_en_set_and_sticky():
    _, bus = pm_bus()
    assert bus.read(acpi.PM1A_CNT_BLK, 2) & SCI_EN
    bus.write(acpi.PM1A_CNT_BLK, 2, 0)
    assert bus.read(acpi.PM1A_CNT_BLK, 2) & SCI_EN


def test_poweroff_on_s5():
    calls = []
    _, bus = pm_bus(on_poweroff=lambda: calls.append("off"))
    bus.write(acpi.PM1A_CNT_BLK, 2, (5 << 10) | SCI_EN)   # SLP_TYP alone: nothing
    assert calls == []
    bus.write(acpi.PM1A_CNT_BLK, 2, (5 << 10) | (1 << 13) | SCI_EN)
    assert calls == ["off"]
    # SLP_EN reads back as 0; SLP_TYP is kept.
    assert bus.read(acpi.PM1A_CNT_BLK, 2) == (5 << 10) | SCI_EN


def test_poweroff_by_byte_write_and_other_sleep_states():
    calls, sleeps = [], []
    _, bus = pm_bus(on_poweroff=lambda: calls.append(1), on_sleep=sleeps.append)
    bus.write(acpi.PM1A_CNT_BLK + 1, 1, ((5 << 10) | (1 << 13)) >> 8)
    assert calls == [1]
    bus.write(acpi.PM1A_CNT_BLK, 2, (3 << 10) | (1 << 13))
    assert sleeps == [3] and calls == [1]


def test_status_write_one_to_clear_and_sci():
    sci = IrqLine(9)
    dev, bus = pm_bus(sci=sci)
    dev.press_power_button()
    assert bus.read(acpi.PM1A_EVT_BLK, 2) & PWRBTN_STS
    assert sci.level == 0                       # not enabled yet
    bus.write(acpi.PM1A_EVT_BLK + 2, 2, PWRBTN_STS)
    assert bus.read(acpi.PM1A_EVT_BLK + 2, 2) == PWRBTN_STS
    assert sci.level == 1
    bus.write(acpi.PM1A_EVT_BLK, 2, 0)          # writing 0 clears nothing
    assert bus.read(acpi.PM1A_EVT_BLK, 2) & PWRBTN_STS
    bus.write(acpi.PM1A_EVT_BLK, 2, PWRBTN_STS)
    assert bus.read(acpi.PM1A_EVT_BLK, 2) == 0
    assert sci.level == 0
    # A 32-bit access covers STS and EN together.
    dev.press_power_button()
    assert bus.read(acpi.PM1A_EVT_BLK, 4) == PWRBTN_STS | (PWRBTN_STS << 16)


# ---------------------------------------------------------------- GPE0 block
def test_gpe0_status_enable_and_sci():
    sci = IrqLine(9)
    dev, bus = pm_bus(sci=sci)
    dev.raise_gpe(1)
    assert bus.read(acpi.GPE0_BLK, 2) == 0x2 and sci.level == 0     # pending, not enabled
    assert not dev.gpe_handled(1)
    bus.write(acpi.GPE0_BLK + 2, 1, 0x2)                            # GPE0_EN, byte-wide as ACPICA writes it
    assert dev.gpe_handled(1) and sci.level == 1
    bus.write(acpi.GPE0_BLK, 1, 0x1)                                # clearing another bit: still pending
    assert sci.level == 1
    bus.write(acpi.GPE0_BLK, 1, 0x2)                                # write 1 to clear
    assert bus.read(acpi.GPE0_BLK, 4) == 0x2 << 16 and sci.level == 0
    bus.write(acpi.GPE0_BLK + 2, 1, 0)                              # masked while its method runs ...
    assert dev.gpe_handled(1)                                       # ... still handled
    bus.write(acpi.GPE0_BLK + 2, 1, 0x2)
    dev.raise_gpe(9)                                                # the second status byte
    assert bus.read(acpi.GPE0_BLK + 1, 1) == 0x2 and sci.level == 0
    state = dev.save()
    other = AcpiPm()
    other.restore(state)
    assert (other.gpe_sts, other.gpe_en, other.gpe_used) == (1 << 9, 0x2, 0x2)
    other.reset()
    assert not other.gpe_handled(1)


def test_a_pm_state_saved_before_gpe0_loads_with_gpe0_at_power_on():
    """A version-1 envelope (what pyvmm saved before the GPE0 block, as
    that version's save() wrote it) loads: PM1 as saved, GPE0 cleared.
    Versions no upgrade leads from are one-line errors."""
    sci = IrqLine(9)
    dev, bus = pm_bus(sci=sci)
    dev.raise_gpe(1)
    bus.write(acpi.GPE0_BLK + 2, 1, 0x2)
    assert sci.level == 1
    v1 = {"version": 1, "sts": PWRBTN_STS, "en": 0, "cnt": 1, "timer": 0x1234}
    dev.restore(v1)
    assert (dev.gpe_sts, dev.gpe_en, dev.gpe_used) == (0, 0, 0) and sci.level == 0
    assert dev.sts == PWRBTN_STS and dev.timer() >= 0x1234
    assert dev.save()["version"] == 2
    bus.write(acpi.PM1A_EVT_BLK + 2, 2, PWRBTN_STS)                    # PM1 enable: the saved status fires
    assert sci.level == 1
    for version in (0, 3):
        with pytest.raises(DeviceStateError, match=f"AcpiPm state: version {version} is not supported "
                                                   r"\(this pyvmm restores versions 1 to 2\)$"):
            dev.restore({**v1, "version": version})
    with pytest.raises(DeviceStateError, match="AcpiPm state: missing 'timer'"):
        dev.restore({k: v for k, v in v1.items() if k != "timer"})
    assert dev.sts == PWRBTN_STS                                        # the refused ones changed nothing


# ---------------------------------------------------------------- PCI hotplug registers
def hotplug_bus():
    from pyvmm.devices.pcihotplug import HOTPLUG_BASE, HOTPLUG_GPE, HOTPLUG_LENGTH, PciHotplug
    sci = IrqLine(9)
    pm, bus = pm_bus(sci=sci)
    hp = PciHotplug(raise_gpe=lambda: pm.raise_gpe(HOTPLUG_GPE))
    bus.insert(HOTPLUG_BASE, HOTPLUG_LENGTH, hp, "pci-hotplug")
    bus.write(acpi.GPE0_BLK + 2, 1, 1 << HOTPLUG_GPE)                # the guest's ACPI enables GPE 1
    return hp, bus, sci


def test_hotplug_plug_raises_gpe_and_up_reads_once():
    hp, bus, sci = hotplug_bus()
    assert bus.read(0xAE00, 4) == 0 and sci.level == 0
    hp.plug(5)
    assert sci.level == 1 and bus.read(acpi.GPE0_BLK, 1) == 0x2
    bus.write(acpi.GPE0_BLK, 1, 0x2)                  # ACPICA clears an edge GPE before _E01 runs
    assert sci.level == 0
    assert bus.read(0xAE0C, 4) == 1 << 5              # removable
    assert bus.read(0xAE04, 4) == 0                   # reading PCI_DOWN leaves PCI_UP alone
    assert bus.read(0xAE00, 4) == 1 << 5
    assert bus.read(0xAE00, 4) == 0                   # announced once
    with pytest.raises(ValueError):
        hp.plug(0)


def test_hotplug_unplug_waits_for_the_guests_eject():
    hp, bus, sci = hotplug_bus()
    ejected = []
    hp.plug(3)
    hp.plug(7)
    bus.read(0xAE00, 4)
    bus.write(acpi.GPE0_BLK, 1, 0x2)
    hp.on_eject = ejected.append
    hp.request_unplug(7)
    assert sci.level == 1 and bus.read(0xAE04, 4) == 1 << 7 and hp.pending_unplug(7)
    bus.write(0xAE08, 4, 1 << 3)                      # a slot the host did not ask for: kept
    bus.write(0xAE08, 2, 1 << 7)                      # not a dword write: ignored
    assert ejected == [] and bus.read(0xAE0C, 4) == (1 << 3) | (1 << 7)
    bus.write(0xAE08, 4, 1 << 7)                      # _EJ0 of slot 7
    assert ejected == [7]
    assert bus.read(0xAE04, 4) == 0 and bus.read(0xAE0C, 4) == 1 << 3 and bus.read(0xAE08, 4) == 0
    bus.write(0xAE08, 4, 1 << 7)                      # a second eject calls nothing
    assert ejected == [7]


def test_hotplug_state_round_trip():
    from pyvmm.devices.pcihotplug import PciHotplug
    hp, _, _ = hotplug_bus()
    hp.plug(4)
    other = PciHotplug()
    other.restore(hp.save())
    assert (other.up, other.removable, other.down) == (1 << 4, 1 << 4, 0)
    other.reset()
    assert (other.up, other.removable) == (0, 0)


def test_a_pending_unplug_survives_save_and_restore():
    """device_del's request (PCI_DOWN) is in the saved state: a fresh block
    restored from it still reports the slot to the guest's _E01, and the
    guest's _EJ0 calls the new block's handler. A version-1 state (saved
    before pending removals were) loads with none pending."""
    hp, bus, _ = hotplug_bus()
    hp.plug(3)
    hp.plug(6)
    bus.read(0xAE00, 4)
    hp.request_unplug(6)
    state = json.loads(json.dumps(hp.save()))

    other, other_bus, sci = hotplug_bus()
    ejected = []
    other.on_eject = ejected.append
    other.restore(state)
    assert other.pending_unplug(6) and other_bus.read(0xAE04, 4) == 1 << 6
    assert other_bus.read(0xAE0C, 4) == (1 << 3) | (1 << 6)
    other_bus.write(0xAE08, 4, 1 << 3)                # not asked for: kept
    assert ejected == []
    other_bus.write(0xAE08, 4, 1 << 6)                # the guest's _EJ0 after the restore
    assert ejected == [6] and other_bus.read(0xAE04, 4) == 0 and other_bus.read(0xAE0C, 4) == 1 << 3

    old = {"version": 1, "up": 0, "removable": 1 << 6}
    other.restore(old)
    assert not other.pending_unplug(6) and other.removable == 1 << 6 and other.save()["version"] == 2
    with pytest.raises(DeviceStateError, match=r"PciHotplug state: version 3 is not supported"):
        other.restore({**state, "version": 3})
