"""Moving a running guest between engines (pyvmm/migrate.py): an SSE
checksum guest moved hw -> bt -> hw at checkpoints ends with the same
registers (GPRs and XMM through the FXSAVE image) as unmigrated runs."""

from __future__ import annotations

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.cpu import CpuState
from pyvmm.machine import StopReason
from pyvmm.migrate import MigrationError, switch_engine

from .modeguests import CHECKPOINT_PORT, boot_for, sse_guest
from .rawguest import require_kvm, run_until_stop

ROUNDS, BLOCKS = 3, 48


class Checkpoint:
    """Port device: counts the guest's checkpoints; stops the machine at
    those listed in `stop_at`."""

    def __init__(self, machine, stop_at=()):
        self.machine, self.stop_at, self.seen = machine, set(stop_at), 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen += 1
        if self.seen in self.stop_at:
            self.machine.request_stop(StopReason.USER, f"checkpoint {self.seen}")


def _machine(engine: str, stop_at=()):
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    m = build_machine(cfg, lambda b: None, boot=boot_for(sse_guest(ROUNDS, BLOCKS)))
    cp = Checkpoint(m, stop_at)
    m.io_bus.insert(CHECKPOINT_PORT, 1, cp, "checkpoint")
    return m, cp


def _run(m, timeout: float = 120.0) -> None:
    run_until_stop(m, timeout)


def _result(st: CpuState) -> tuple:
    return (st.regs["rbx"], st.regs["rsi"], st.rip, st.fxsave[160:192], st.fxsave[24:28])


def _plain(engine: str) -> tuple:
    m, cp = _machine(engine)
    try:
        _run(m)
        assert m.stop_status.reason is StopReason.HALTED
        assert cp.seen == ROUNDS
        return _result(m.engine.save_state(0))
    finally:
        destroy_machine(m)


def test_bt_state_round_trips_fxsave():
    m, _ = _machine("bt")
    try:
        st = m.engine.save_state(0)
        assert len(st.fxsave) == 512
        img = bytearray(st.fxsave)
        img[160:176] = bytes(range(16))
        img[24:28] = (0x1F80 | 0x40).to_bytes(4, "little")
        st.fxsave = bytes(img)
        m.engine.load_state(0, st)
        back = m.engine.save_state(0)
        assert back.fxsave[160:176] == bytes(range(16))
        assert back.fxsave[24:28] == img[24:28]
    finally:
        destroy_machine(m)


YMMH = [(0xA5A5 + i) << 100 | i for i in range(16)]


def test_avx_state_round_trips_bt_hw_bt():
    """XCR0 and the upper YMM halves move with CpuState: bt -> KVM (KVM_SET_XCRS,
    KVM_SET_XSAVE) -> bt."""
    require_kvm()
    bt, _ = _machine("bt")
    cfg = VmConfig(mem_mib=64, engine="hw", irqchip=False, no_reboot=True, fit_guest_to_host=False)
    hw = build_machine(cfg, lambda b: None, boot=boot_for(sse_guest(ROUNDS, BLOCKS)))
    try:
        st = bt.engine.save_state(0)
        assert (st.xcr0, st.ymmh) == (1, [0] * 16)
        st.cr4 |= 1 << 18
        st.xcr0, st.ymmh = 7, list(YMMH)
        hw.engine.load_state(0, st)
        moved = hw.engine.save_state(0)
        assert (moved.xcr0, moved.ymmh) == (7, YMMH)
        bt.engine.load_state(0, moved)
        assert (bt.engine.cpus[0].xcr0, bt.engine.cpus[0].ymmh) == (7, YMMH)
    finally:
        destroy_machine(hw)
        destroy_machine(bt)


def test_sse_guest_migrated_hw_bt_hw_matches_unmigrated_runs():
    require_kvm()
    expected = _plain("bt")
    assert _plain("hw") == expected          # the two engines agree to begin with
    m, cp = _machine("hw", stop_at=(1, 2))
    try:
        _run(m)
        assert m.stop_status.detail == "checkpoint 1"
        switch_engine(m, "bt")
        assert m.engine.name == "bt" and m.config.engine == "bt"
        _run(m)
        assert m.stop_status.detail == "checkpoint 2"
        assert m.engine.save_state(0).regs["rsi"] == 2
        switch_engine(m, "hw")
        assert m.engine.name == "hw"
        _run(m)
        assert m.stop_status.reason is StopReason.HALTED
        assert cp.seen == ROUNDS
        assert _result(m.engine.save_state(0)) == expected
    finally:
        destroy_machine(m)


def test_refuses_unknown_engines():
    m, _ = _machine("bt")
    try:
        with pytest.raises(MigrationError, match="engine"):
            switch_engine(m, "vmware")
        assert m.engine.name == "bt"
    finally:
        destroy_machine(m)
