"""An int3 that an iretq with RF=1 returns to, in user mode, under bt,
hybrid (user code under KVM) and hw (the CPU runs the user code itself).
RF only suppresses instruction breakpoints, for one instruction (SDM
Vol. 3, 18.3.1.1); int3 is no instruction breakpoint, so it must trap
(#BP, RIP after it) once, and the code after it runs on.  Under hybrid a
KVM exit with RF set reads as a fault (hybrid/engine.py, _trap_length): bt
keeps RF out of the RFLAGS KVM gets, so the int3 is not mistaken for one.

The #BP handler logs the pushed RIP and RFLAGS at userharness.LOG (count
in R8); the user code then ends with ud2, whose #UD halts with 6 in RAX."""

from __future__ import annotations

import pytest

from .modeguests import USTACK, enter_user
from .rawguest import build_guest, require_kvm
from .userharness import KERNEL_START, LOG, one_vector_handler, read_labels, read_log, run_to_halt, store_labels

RF = 1 << 16

SOURCE = KERNEL_START + store_labels("u_after") + """    xor r8, r8
    xor ebx, ebx
""" + enter_user(0x2 | RF) + """
sys_entry:
""" + one_vector_handler(3, f"""    mov rax, [rsp + 48]       /* RFLAGS */
    mov [{LOG + 8:#x} + rcx], rax
""") + """
user:
    int3
u_after:
    inc ebx
    ud2                       /* the end: #UD halts in `other` */
"""


@pytest.mark.parametrize("engine", ["bt", "hybrid", "hw"])
def test_int3_under_rf_from_iretq_traps_once(engine):
    if engine != "bt":
        require_kvm()

    def inspect(m):
        return read_labels(m.memory, "u_after")["u_after"], read_log(m.memory, 2)
    m, st = run_to_halt(engine, build_guest(SOURCE.format(ustack=USTACK), "long"), inspect)
    after, log = m.inspected
    assert (st.regs["rax"], st.regs["r8"], st.regs["rbx"]) == (6, 1, 1)   # one #BP; u_after ran once
    assert log[0][0] == after
