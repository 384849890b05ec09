"""The hybrid engine: guest kernel code in bt, user code under KVM.

bt is the oracle: the same guests run on both engines and must end in the
same state; the hybrid run must also show that user code really ran under
KVM (its user-mode exit counters) and that each kind of user-mode event
(system call, exception, software interrupt, page fault, timer interrupt,
a page-table change KVM had cached) went through bt."""

from __future__ import annotations


import pytest

from pyvmm.builder import build_machine
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError
from pyvmm.machine import StopReason
from pyvmm.engines.hybrid.ptwatch import PageTableWatch
from pyvmm.engines.kvm import abi, hostfit
from pyvmm.memory import GuestMemory

from . import hybridguest as hg
from .modeguests import boot_for, expected_user_result, user_guest, user_result
from .rawguest import require_kvm, run_machine


def _run(engine: str, code: bytes, timeout: float = 120.0):
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    m, state = run_machine(cfg, boot_for(code), timeout=timeout)
    return m.stop_status, state, m.engine.stats()


@pytest.mark.kvm
@pytest.mark.parametrize("syscalls", [True, False])
def test_user_loop_with_syscalls_matches_bt_and_python(syscalls):
    require_kvm()
    code = user_guest(40, 5000, 7, syscalls=syscalls)
    want = expected_user_result(40, 5000, 7, syscalls)
    status, st, stats = _run("hybrid", code)
    assert status.reason is StopReason.HALTED, status
    assert user_result(st.regs) == want
    assert stats["user_exits"].get("syscall", 0) == (41 if syscalls else 1)
    _, bt_st, _ = _run("bt", code)
    assert user_result(bt_st.regs) == want


@pytest.mark.kvm
def test_every_user_event_goes_through_bt():
    require_kvm()
    code = hg.hybrid_guest()
    results = {}
    for engine in ("bt", "hybrid"):
        status, st, stats = _run(engine, code)
        assert status.reason is StopReason.HALTED, (engine, status, hex(st.rip), st.regs["rax"])
        r = st.regs
        results[engine] = (r["r8"], r["r9"], r["r10"], r["rbx"], r["r12"])
        assert r["r13"] >= hg.TICKS_WANTED and r["r15"] > 0
        if engine == "hybrid":
            ex = stats["user_exits"]
            assert ex.get("syscall") == 2                       # remap + exit
            assert ex.get("trap") == 3 + 5 + 1                  # ud2 x3, int 0x80 x5, #PF
            assert ex.get("kick", 0) >= 1                       # the timer ended a KVM run
            assert stats["kvm_mmu_drops"] == 1                  # the remap (not the demand-paged #PF)
    assert results["bt"] == results["hybrid"] == (3, 15, 1, hg.VALUE_A, hg.VALUE_B)


@pytest.mark.kvm
def test_deterministic_time_is_refused():
    require_kvm()
    cfg = VmConfig(mem_mib=64, engine="hybrid", irqchip=False, no_reboot=True, deterministic=True)
    with pytest.raises(ConfigError, match="deterministic"):
        build_machine(cfg, lambda b: None, boot=boot_for(user_guest(1, 1)))


# -- the page-table watch, on hand-built tables ---------------------------------------

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000


@pytest.fixture
def tables():
    mem = GuestMemory(2 << 20)
    mem.write_u64(PML4, PDPT | 7)
    mem.write_u64(PDPT, PD | 7)
    mem.write_u64(PD, PT | 7)
    mem.write_u64(PT, 0x100000 | 7)
    yield mem
    mem.close()


def test_watch_keeps_kvm_cache_for_new_entries_and_ad_bits(tables):
    w = PageTableWatch(tables)
    assert not w.needs_drop(PML4, True)           # first sight: watched, nothing to drop
    assert len(w.pages) == 4
    tables.write_u64(PT + 8, 0x101000 | 7)         # demand paging: not-present -> present
    tables.write_u64(PT, 0x100000 | 7 | 0x60)      # accessed + dirty set (as KVM does)
    assert not w.needs_drop(PML4, True)
    tables.write_u64(PD + 8, 0x14000 | 7)           # a new page table linked in is watched too
    assert not w.needs_drop(PML4, True)
    assert 0x14000 in w.pages


@pytest.mark.parametrize("change", ["remap", "write-protect", "unmap", "clear-dirty", "unlink-table"])
def test_watch_drops_kvm_cache_when_a_present_entry_changes(tables, change):
    w = PageTableWatch(tables)
    tables.write_u64(PT, 0x100000 | 7 | 0x40)
    assert not w.needs_drop(PML4, True)
    where, value = {"remap": (PT, 0x200000 | 7), "write-protect": (PT, 0x100000 | 5 | 0x40),
                    "unmap": (PT, 0), "clear-dirty": (PT, 0x100000 | 7),
                    "unlink-table": (PD, 0)}[change]
    tables.write_u64(where, value)
    assert w.needs_drop(PML4, True)
    assert not w.needs_drop(PML4, True)            # restarted from the current tree


def test_watch_ignores_the_kernel_half_and_drops_outside_long_mode(tables):
    w = PageTableWatch(tables)
    assert not w.needs_drop(PML4, True)
    tables.write_u64(PML4 + 256 * 8, 0x15000 | 3)   # a kernel-half entry appears and changes
    tables.write_u64(PML4 + 256 * 8, 0x16000 | 3)
    assert not w.needs_drop(PML4, True)
    assert w.needs_drop(PML4, False)


@pytest.mark.kvm
def test_user_rdtsc_reads_the_guest_tsc_where_kvm_honours_tsd():
    """With CR4.TSD, user rdtsc traps to bt and reads the guest's TSC. kvm_pvm
    ignores TSD for user code: there the reads are the host's TSC (measured;
    the documented limit), not the value the guest kernel wrote."""
    require_kvm()
    status, st, stats = _run("hybrid", hg.rdtsc_guest())
    assert status.reason is StopReason.HALTED, status
    first, second = st.regs["r12"], st.regs["r13"]
    assert first < second
    near_guest_tsc = hg.GUEST_TSC <= first < hg.GUEST_TSC + (1 << 40)
    if hostfit.kernel_mode_emulated():
        assert not near_guest_tsc and "trap" not in stats["user_exits"]
    else:
        assert near_guest_tsc and stats["user_exits"]["trap"] == 2


@pytest.mark.kvm
def test_an_interrupt_raised_just_before_a_kvm_run_ends_it_at_once():
    """A device thread raises IRQ 0 after the slice began but before the
    alarm is armed (fire_now then finds no vCPU to kick): the KVM run that
    follows must return at once (immediate_exit), not at the next timer
    deadline, so that bt delivers the interrupt."""
    require_kvm()
    raised, entries = [], []

    def patch(m) -> None:
        engine = m.engine
        arm, run_kvm = engine.alarm.arm, engine._run_kvm

        def arm_after_an_irq(vcpu, delay):
            if not raised and engine.bt.cpus[0].rflags & 0x200:
                engine.set_irq(0, 1)       # as a device thread would: on_wake, fire_now (no vCPU yet)
                engine.set_irq(0, 0)
                raised.append(True)
            arm(vcpu, delay)

        def record(v):
            entries.append((bool(raised), v.run_mm[abi.RUN_IMMEDIATE_EXIT]))
            return run_kvm(v)
        engine.alarm.arm, engine._run_kvm = arm_after_an_irq, record

    cfg = VmConfig(mem_mib=64, engine="hybrid", irqchip=False, no_reboot=True)
    m, _ = run_machine(cfg, boot_for(hg.hybrid_guest()), timeout=120, setup=patch)
    assert m.stop_status.reason is StopReason.HALTED, m.stop_status
    first = next(flag for was_raised, flag in entries if was_raised)
    assert first == 1, entries[:5]
