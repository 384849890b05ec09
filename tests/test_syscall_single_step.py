"""`syscall` and `sysretq` under RFLAGS.TF, under bt and hybrid (kernel in
bt, user code under KVM).  Both instructions test TF when they complete
(QEMU's TCG does the same; Linux's 64-bit entry code avoids SYSRET when
the user's RFLAGS has TF, as SYSRET would trap at once in user mode), so:
- a syscall with TF set and TF in IA32_FMASK (as Linux sets it) gives no #DB
  at the kernel entry;
- with TF left out of IA32_FMASK the #DB comes at the entry's first
  instruction (RIP = LSTAR, CPL0, DR6.BS), before it runs;
- a sysretq whose R11 has TF traps at once, at the user instruction it
  returns to, before that runs.
No real-CPU oracle: on kvm_pvm the guest's kernel mode is emulated, and
these cases all cross into it."""

from __future__ import annotations

import pytest

from .modeguests import CODE
from .rawguest import require_kvm
from .syscallstep import syscall_step_guest
from .userharness import read_labels, read_log, run_to_halt

BS, TF, IF = 1 << 14, 0x100, 0x200
KERNEL_CS, USER_CS = 0x08, 0x23

# case: (IA32_FMASK, TF ORed into R11 by the kernel, user sets TF, wanted #DBs as (label, CS))
CASES = {
    "fmask-clears-tf": (TF | IF, 0, True, [("u_ret", USER_CS)]),
    "fmask-keeps-tf": (IF, 0, True, [("sys_entry", KERNEL_CS), ("u_ret", USER_CS)]),
    "sysret-sets-tf": (IF, TF, False, [("u_ret", USER_CS)]),
}


def _run(engine: str, fmask: int, r11_or: int, user_tf: bool):
    def inspect(m):
        return read_labels(m.memory, "sys_entry", "u_ret"), read_log(m.memory, 4, fields=3)
    m, st = run_to_halt(engine, syscall_step_guest(fmask, r11_or, user_tf), inspect)
    labels, log = m.inspected
    return st, labels, log, m.engine.stats()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_syscall_and_sysret_single_step_after_they_complete(engine, case):
    if engine == "hybrid":
        require_kvm()
    fmask, r11_or, user_tf, want = CASES[case]
    st, labels, log, stats = _run(engine, fmask, r11_or, user_tf)
    if engine == "hybrid":      # both syscalls left KVM at the sentinel: bt ran them
        assert stats["user_exits"].get("syscall", 0) == 2
    assert st.regs["rax"] == 60                       # halted at sys_entry, not on another vector
    n = st.regs["r8"]
    got = [(rip, cs & 0xFFFF, bool(dr6 & BS)) for rip, cs, dr6 in log[:n]]
    assert got == [(labels[name], cs, True) for name, cs in want]


# SYSENTER clears IF, VM and RF but not TF, and SYSEXIT changes no flag, so
# there the two readings (TF before or after) agree: a SYSENTER with TF set
# traps at the entry's first instruction, at CPL0 (64-bit and compatibility-
# mode user code; tests/vendorguest.py, SYSENTER_ESP moved to a mapped stack
# for the #DB frame).
SYSENTER_CASES = {
    "64": (0x2B, "user64", "pushfq\n    or qword ptr [rsp], 0x100\n    popfq\nfault:\n    sysenter\nafter:"),
    "compat": (0x1B, "user32", "pushfd\n    or dword ptr [esp], 0x100\n    popfd\nfault:\n    sysenter\nafter:"),
}


@pytest.mark.parametrize("mode", sorted(SYSENTER_CASES))
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_sysenter_with_tf_traps_at_the_entry(engine, mode):
    from . import vendorguest as vg
    if engine == "hybrid":
        require_kvm()
    cs, label, user = SYSENTER_CASES[mode]
    kernel = vg.wrmsr(0x175, "0x150800") + vg.enter_user(cs, label)
    code = vg.vendor_guest(kernel, **{label: user})
    m, _ = run_to_halt(engine, code, lambda m: m.memory.read(vg.RESULT, vg.RECORD_SIZE))
    r = vg.record(m.inspected)
    assert (r["entry"], r["vector"], r["frame_cs"]) == (vg.ENTRY_IDT, 1, KERNEL_CS)
    # SYSENTER_EIP: the entry's first instruction (`mov qword ptr [RESULT], 4`), before it ran
    first = b"\x48\xc7\x04\x25" + vg.RESULT.to_bytes(4, "little") + (vg.ENTRY_SYSENTER).to_bytes(4, "little")
    assert r["frame_rip"] == vg.HIGH_ALIAS + CODE + code.index(first)
    assert r["frame_rsp"] == 0x150800 and not r["frame_rflags"] & IF
