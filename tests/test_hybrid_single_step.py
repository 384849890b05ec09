"""Single-stepping user code (RFLAGS.TF) under hybrid, bt and the real CPU.

User code sets TF with popfq; the guest kernel's #DB handler logs each
step's pushed RIP and DR6 and clears TF after hybridguest.STEPS steps
(hybridguest.single_step_guest). The SDM (Vol. 3, 18.3.1.4 and 6.8.3)
wants: no trap after the popfq that sets TF, a trap after each later
instruction with DR6.BS, and none after `mov ss` (it comes after the next
instruction). Under hybrid the first step happens under KVM, which stops
with RIP already after the stepped instruction: it must be delivered, not
run again (the steps after it run in bt, whose scheduler single-steps).

The real CPU is the oracle for the popfq rule (KVM at CPL3 runs it natively).
It is not for `mov ss` on kvm_pvm: there a user `mov ss` is emulated by the
host kernel, and it traps straight after the `mov ss` (measured), against
the SDM, which bt follows."""

from __future__ import annotations

import os
import sys

import pytest

from . import hybridguest as hg
from .rawguest import require_kvm
from .userharness import read_labels, read_log, run_to_halt

DR6_BS = 1 << 14
TF = 0x100


# The first instruction TF covers: (source, #UD count, INC RBX count, the
# labels whose addresses the #DB handler must see, in order).  Its step
# is the one KVM takes under hybrid; the rest are bt's.
FIRSTS = {
    "plain": ("inc rbx", 0, 7, (0, 1, 2, 3, 5, 6)),
    # 89 45 cc ends in 0xCC, as int3 does: still a step, not an int3 to run again
    "ends-in-cc": ("mov dword ptr [rbp - 0x34], eax", 0, 6, (0, 1, 2, 3, 5, 6)),
    # a fault: #UD is delivered, no step after it; the handler's iretq sets
    # TF again and does not trap itself, so the next step is after s0
    "faults": ("ud2", 1, 6, (1, 2, 3, 5, 6, 7)),
    # #GP under KVM where it has CPUID faulting, then run again in bt, which
    # completes it: the step after it is bt's (RBX is CPUID's, not counted)
    "runs-again-in-bt": ("cpuid", 0, None, (0, 1, 2, 3, 5, 6)),
}


def _steps(engine: str, first: str, arm: str = ""):
    def log(m):
        return read_log(m.memory, hg.STEPS + 1), list(read_labels(m.memory, *(f"s{i}" for i in range(9))).values())
    m, st = run_to_halt(engine, hg.single_step_guest(first, arm), log)
    got, labels = m.inspected
    return st, got, labels, m.engine.stats()


@pytest.mark.parametrize("first", sorted(FIRSTS))
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_user_single_step_traps_as_the_sdm_says(engine, first):
    if engine == "hybrid":
        require_kvm()
    source, uds, incs, want = FIRSTS[first]
    st, got, labels, stats = _steps(engine, source)
    assert (st.regs["r8"], st.regs["r9"]) == (hg.STEPS, uds)
    if incs is not None:
        assert st.regs["rbx"] == incs                       # every instruction ran once
    assert [rip for rip, _ in got[:hg.STEPS]] == [labels[i] for i in want]
    assert all(dr6 & DR6_BS for _, dr6 in got[:hg.STEPS])
    assert got[hg.STEPS] == (0, 0)                          # TF off: no more steps
    if engine == "hybrid":
        # the first step, or the fault, came from KVM, once
        ex = stats["user_exits"]
        assert ex.get("single_step", 0) + ex.get("trap", 0) == 1
        if first != "runs-again-in-bt":        # that one is a trap only where KVM has CPUID faulting
            assert ex.get("trap", 0) == uds


def test_bt_steps_the_same_with_a_breakpoint_armed():
    """An enabled DR7 sends bt down its per-instruction breakpoint path
    (debugregs.step), which single-steps on its own."""
    source, uds, incs, want = FIRSTS["plain"]
    st, got, labels, _ = _steps("bt", source, hg.ARM_UNUSED_BREAKPOINT)
    assert (st.regs["r8"], st.regs["r9"], st.regs["rbx"]) == (hg.STEPS, uds, incs)
    assert [rip for rip, _ in got[:hg.STEPS]] == [labels[i] for i in want]
    assert all(dr6 & DR6_BS and not dr6 & 0xF for _, dr6 in got[:hg.STEPS])


def test_popf_that_sets_tf_does_not_trap_on_the_real_cpu():
    """KVM at CPL3: the first #DB comes after the instruction after popfq."""
    require_kvm()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bt"))
    import harness
    from kvm_oracle import KvmOracle
    code = harness.assemble("pushfq\nor qword ptr [rsp], 0x100\npopfq\ninc rbx\ninc rbx\nnop")
    first_inc_end = len(harness.assemble("pushfq\nor qword ptr [rsp], 0x100\npopfq\ninc rbx"))
    regs = [0] * 16
    regs[4] = harness.STACK_TOP
    oracle = KvmOracle()
    try:
        out = oracle.run(code, regs, 0x202, bytes(16))
    finally:
        oracle.close()
    assert out.vector == 1 and out.rflags & TF
    assert out.rip - harness.CODE_ADDR == first_inc_end
