"""PAM write protection: a guest's writes to 0xC0000-0xFFFFF land only
where the i440FX's PAM registers say writes go to RAM; elsewhere they go
to ROM, i.e. nowhere, as SeaBIOS expects once it has made its shadow copy
read-only.  A small real-mode guest under bt (and hybrid, which runs
real mode in bt as well) and under hw (KVM, where the shadow area's
memory slots turn read-only, engines/kvm/shadowslots.py) flips the registers through
0xCF8/0xCFC and writes around them; the host reads RAM afterwards."""

from __future__ import annotations

import pytest

from pyvmm.bus import Bus
from pyvmm.config import VmConfig
from pyvmm.devices.pci.host import attach_host_bridge
from pyvmm.devices.pci.pam import enable_pam, write_ignored_pages
from pyvmm.machine import StopReason
from pyvmm.memory import GuestMemory
from tests.rawguest import build_guest, raw_boot, run_machine

EXIT_PORT = 0xF4

# 0x5A bits 1:0 and 5:4: 0xC0000-0xC3FFF and 0xC4000-0xC7FFF; 0x59 bits 5:4:
# 0xF0000-0xFFFFF.  In each 2-bit field bit 0 is read enable, bit 1 write.
GUEST = """
    cli
    xor %ax, %ax
    mov %ax, %ss
    mov $0x7000, %sp
    mov $0xC000, %ax
    mov %ax, %ds
    mov %ax, %es
    movb $0x11, 0                 # PAM 0 (reset): ROM, dropped
    mov 0, %al
    mov %al, %fs:0                # what the guest reads back (fs = 0x50 below)
    mov $0xCF8, %dx
    mov $0x80000058, %eax
    out %eax, %dx
    mov $0xCFE, %dx               # 0x5A
    mov $0x33, %al                # both 16 KiB ranges read-write
    out %al, %dx
    movb $0x22, 0                 # lands (and maps the page for fast writes)
    movb $0x23, 0x4000            # lands
    mov $0x31, %al                # low range read-only, high still read-write
    out %al, %dx
    movb $0x44, 0                 # dropped, though the page was writable a moment ago
    movw $0x4444, 0x100           # dropped
    movb $0x45, 0x4000            # lands
    mov 0, %al
    mov %al, %fs:1
    mov $0x10, %di                # a string store takes its own path: dropped
    mov $16, %cx
    mov $0x66, %al
    cld
    rep stosb
    mov $0xF000, %ax
    mov %ax, %es
    mov $0xCFD, %dx               # 0x59 bits 5:4
    mov $0x10, %al                # 0xF0000 read-only
    out %al, %dx
    movb $0x77, %es:0             # dropped
    mov $0x30, %al                # read-write
    out %al, %dx
    movb $0x78, %es:1             # lands
    xor %al, %al
    out %al, $0xF4
    hlt
"""


def _setup_pam(machine) -> None:
    bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
    machine.devices["pci_host"] = bridge
    enable_pam(bridge.host, machine.memory)


@pytest.mark.parametrize("engine", ["bt", pytest.param("hybrid", marks=pytest.mark.kvm),
                                    pytest.param("hw", marks=pytest.mark.kvm)])
def test_guest_writes_follow_the_pam_write_bits(engine):
    code = build_guest("mov $0x50, %ax\nmov %ax, %fs\n" + GUEST, "real")
    cfg = VmConfig(mem_mib=64, engine=engine, debug_exit=(EXIT_PORT, 1), no_reboot=True)
    machine, _ = run_machine(cfg, raw_boot(code, "real"), timeout=30, setup=_setup_pam,
                             inspect=lambda m: {a: m.memory.read(a, n) for a, n in
                                                ((0xC0000, 1), (0xC0100, 2), (0xC0010, 16), (0xC4000, 1),
                                                 (0xF0000, 2), (0x500, 2))})
    assert machine.stop_status.reason is StopReason.DEBUG_EXIT, machine.stop_status
    got = machine.inspected
    assert got[0xC0000] == b"\x22"           # the PAM-0 write and the read-only one dropped
    assert got[0xC0100] == b"\0\0"
    assert got[0xC0010] == bytes(16)
    assert got[0xC4000] == b"\x45"           # the other half of the register stayed writable
    assert got[0xF0000] == b"\x00\x78"
    assert got[0x500] == b"\x00\x22"         # the guest read RAM: its dropped writes left no trace


def test_write_ignored_pages_follow_config_writes_reset_and_restore():
    io, mmio = Bus("io"), Bus("mmio")
    memory = GuestMemory(1 << 20)
    bridge = attach_host_bridge(io, mmio)
    enable_pam(bridge.host, memory)
    everything = frozenset(range(0xC0, 0x100))
    assert memory.write_ignored == everything             # reset state: all ROM
    seen = []
    memory.write_ignored_listeners.append(seen.append)
    io.write(0xCF8, 4, 0x80000058)
    io.write(0xCFC + 1, 1, 0x30)                          # 0xF0000-0xFFFFF read-write
    assert memory.write_ignored == frozenset(range(0xC0, 0xF0)) and seen[-1] == memory.write_ignored
    io.write(0xCFC + 2, 1, 0x20)                          # 0xC4000-0xC7FFF write-only
    assert memory.write_ignored == frozenset(range(0xC0, 0xC4)) | frozenset(range(0xC8, 0xF0))
    assert write_ignored_pages(bridge.host) == memory.write_ignored
    state = bridge.save()
    bridge.reset()
    assert memory.write_ignored == everything
    bridge.restore(state)
    assert memory.write_ignored == frozenset(range(0xC0, 0xC4)) | frozenset(range(0xC8, 0xF0))
    memory.write(0xC0000, b"\x99")                        # the VMM's own writes (loaders) still land
    assert memory.read(0xC0000, 1) == b"\x99"


@pytest.mark.kvm
def test_hw_without_readonly_slots_warns_and_lets_writes_land(monkeypatch, caplog):
    """Where KVM lacks KVM_CAP_READONLY_MEM the shadow slots stay plain RAM:
    the guest runs on, its write to the protected range lands, and one
    warning says that PAM write protection is not enforced."""
    from pyvmm.engines.kvm import device, shadowslots
    real_check = device.Kvm.check
    monkeypatch.setattr(device.Kvm, "check",
                        lambda self, cap: 0 if cap == shadowslots.CAP_READONLY_MEM else real_check(self, cap))
    code = build_guest("mov $0x50, %ax\nmov %ax, %fs\n" + GUEST, "real")
    cfg = VmConfig(mem_mib=64, engine="hw", debug_exit=(EXIT_PORT, 1), no_reboot=True)
    with caplog.at_level("WARNING", logger=shadowslots.__name__):
        machine, _ = run_machine(cfg, raw_boot(code, "real"), timeout=30, setup=_setup_pam,
                                 inspect=lambda m: m.memory.read(0xC0000, 1))
    assert machine.stop_status.reason is StopReason.DEBUG_EXIT, machine.stop_status
    assert machine.inspected == b"\x44"       # the last write to 0xC0000, protected or not, landed
    warnings = [r for r in caplog.records if "KVM_CAP_READONLY_MEM" in r.getMessage()]
    assert len(warnings) == 1, caplog.records


@pytest.mark.kvm
def test_hw_dirty_log_keeps_pages_written_before_a_pam_change():
    """Turning a shadow slot read-only deletes and re-adds it under KVM,
    which drops the slot's dirty bitmap: what the guest wrote there just
    before (0xC0000, then made read-only) must still be in the log, and
    the slot must go on logging (0xF0000, written after its change)."""
    def setup(machine):
        _setup_pam(machine)
        machine.memory.start_dirty_log()

    code = build_guest("mov $0x50, %ax\nmov %ax, %fs\n" + GUEST, "real")
    cfg = VmConfig(mem_mib=64, engine="hw", debug_exit=(EXIT_PORT, 1), no_reboot=True)
    machine, _ = run_machine(cfg, raw_boot(code, "real"), timeout=30, setup=setup,
                             inspect=lambda m: (set(m.memory.dirty_pages()), m.engine.shadow.changes))
    assert machine.stop_status.reason is StopReason.DEBUG_EXIT, machine.stop_status
    dirty, changes = machine.inspected
    assert changes >= 4                          # 0x33, 0x31 on 0x5A; 0x10, 0x30 on 0x59
    assert {0xC0, 0xC4, 0xF0} <= dirty, sorted(hex(p) for p in dirty)
