"""KVM's in-kernel PIC, IOAPIC, PIT, local APICs and clock under the device
contract (engines/kvm/platform_state.py): a real-mode guest programs the
PIC and the PIT and stops at a checkpoint; the platform is saved (through
JSON), reset to power-on, restored, and the guest, run on, reads back from
the devices what it programmed.  Without the restore it reads the
power-on values, so the test sees the difference."""

from __future__ import annotations

import json

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.device import DeviceStateError, Stateful
from pyvmm.errors import EngineError
from pyvmm.machine import StopReason

from .rawguest import build_guest, raw_boot, require_kvm

CHECKPOINT = 0xE0
IMR = 0xB5
PIT_CONTROL = 0x34        # counter 0, lo/hi, mode 2, binary

GUEST = f"""
    cli
    mov $0x11, %al
    out %al, $0x20
    mov $0x30, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov ${IMR}, %al
    out %al, $0x21
    mov ${PIT_CONTROL}, %al
    out %al, $0x43
    xor %al, %al
    out %al, $0x40
    mov $0x80, %al
    out %al, $0x40
    out %al, ${CHECKPOINT}
    in $0x21, %al
    mov %al, %bl
    mov $0xE2, %al
    out %al, $0x43
    in $0x40, %al
    mov %al, %bh
    out %al, ${CHECKPOINT}
    hlt
"""


class Checkpoint:
    """Stops the machine at every write (the guest's checkpoints)."""

    def __init__(self, machine):
        self.machine = machine

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.machine.request_stop(StopReason.USER, "checkpoint")


def _run(machine) -> None:
    machine.clear_stop()
    machine.engine.run()
    assert machine.stop_status.detail == "checkpoint", machine.stop_status


@pytest.mark.parametrize("restored", [True, False])
def test_guest_reads_back_its_programming_after_restore(restored):
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=raw_boot(build_guest(GUEST, "real"), "real"))
    try:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        platform = m.devices["kvm_platform"]          # the builder's, from power-on
        assert isinstance(platform, Stateful)
        _run(m)
        state = json.loads(json.dumps(platform.save()))
        assert bytes.fromhex(state["pic_master"])[2] == IMR      # kvm_pic_state.imr
        platform.reset()
        assert bytes.fromhex(platform.save()["pic_master"])[2] != IMR
        if restored:
            platform.restore(state)
            again = platform.save()
            assert [again[k] for k in ("pic_master", "pic_slave", "ioapic", "lapics")] == \
                   [state[k] for k in ("pic_master", "pic_slave", "ioapic", "lapics")]
            assert again["clock_ns"] >= state["clock_ns"]
        _run(m)
        rbx = m.engine.save_state(0).regs["rbx"]
        imr, status = rbx & 0xFF, (rbx >> 8) & 0xFF
        if restored:
            assert (imr, status & 0x3F) == (IMR, PIT_CONTROL)
        else:
            assert imr != IMR and status & 0x3F != PIT_CONTROL
    finally:
        destroy_machine(m)


def test_bad_state_is_refused_and_changes_nothing():
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=raw_boot(b"\xf4", "real"))
    try:
        platform = m.devices["kvm_platform"]
        good = platform.save()
        for bad in ({**good, "version": 2}, {**good, "pic_master": "00"}, {**good, "lapics": []},
                    {**good, "ioapic": "zz"}, {k: v for k, v in good.items() if k != "pit"}, "x"):
            with pytest.raises(DeviceStateError) as err:
                platform.restore(bad)
            assert "\n" not in str(err.value) and "KvmPlatformState" in str(err.value)
        after = platform.save()
        assert [after[k] for k in ("pic_master", "pic_slave", "ioapic", "lapics")] == \
               [good[k] for k in ("pic_master", "pic_slave", "ioapic", "lapics")]
    finally:
        destroy_machine(m)


def test_no_kvm_platform_without_the_in_kernel_irqchip():
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=False, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=raw_boot(b"\xf4", "real"))
    try:
        assert "kvm_platform" not in m.devices
        from pyvmm.engines.kvm.platform_state import KvmPlatformState
        with pytest.raises(EngineError, match="in-kernel irqchip"):
            KvmPlatformState(m.engine)
    finally:
        destroy_machine(m)
