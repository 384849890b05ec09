"""Data breakpoints that user code (CPL3) hits, around `mov ss`, under bt,
hybrid and hw.  The guest kernel arms DR0/DR1 and DR7; the #DB handler logs
the pushed RIP and DR6.B0-B3/BS of each #DB (count in R8) and returns with
RF set.  SDM Vol. 3, 6.8.3: the #DB for a read breakpoint that `mov ss`
itself hits is held to the end of the next instruction, and then reports
that instruction's breakpoints too, in one #DB.

Under hybrid, user code runs in bt while DR7 arms a breakpoint (KVM is not
given the guest's debug registers)."""

from __future__ import annotations

import pytest

from .modeguests import USTACK, enter_user
from .rawguest import build_guest, require_kvm
from .userharness import KERNEL_START, LOG, one_vector_handler, read_labels, read_log, run_to_halt, store_labels

VAR = 0x340000


def dr7(n: int, rw: int, length_code: int) -> int:
    return (1 << (2 * n)) | rw << (16 + 4 * n) | length_code << (18 + 4 * n)


SOURCE = KERNEL_START + store_labels("u_mid", "u_end") + """    mov qword ptr [{var}], 0x1b
    mov eax, {var}
    mov dr0, rax
    add eax, 8
    mov dr1, rax
    mov eax, {dr7:#x}
    mov dr7, rax
    xor r8, r8
""" + enter_user() + """
sys_entry:
""" + one_vector_handler(1, f"""    mov rax, dr6
    and eax, 0x400f
    mov [{LOG + 8:#x} + rcx], rax
    mov eax, 0xffff0ff0
    mov dr6, rax
""", after_count="    or qword ptr [rsp + 48], 0x10000\n") + """
user:
    {first}
u_mid:
    {second}
u_end:
    ud2                       /* the end: #UD halts with 6 in RAX */
"""

# case: (DR7, first, second, wanted #DBs as (label, DR6 bits))
CASES = {
    # sanity: a write breakpoint traps after the write
    "write": (dr7(0, 1, 3), f"mov dword ptr [{VAR}], 0x1b", "nop", [("u_mid", 1)]),
    # a read/write breakpoint hit by mov ss: held to the end of the next instruction
    "mov-ss": (dr7(0, 3, 1), f"mov ss, [{VAR}]", "nop", [("u_end", 1)]),
    # ... and reported with the write breakpoint that instruction hits, in one #DB
    "mov-ss-then-write": (dr7(0, 3, 1) | dr7(1, 1, 3), f"mov ss, [{VAR}]", f"mov dword ptr [{VAR + 8}], 1",
                          [("u_end", 3)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_user_data_breakpoints_around_mov_ss(engine, case):
    if engine != "bt":
        require_kvm()
    dr7_value, first, second, want = CASES[case]

    def inspect(m):
        return read_labels(m.memory, "u_mid", "u_end"), read_log(m.memory, 3)
    code = build_guest(SOURCE.format(var=VAR, dr7=dr7_value, ustack=USTACK, first=first, second=second), "long")
    m, st = run_to_halt(engine, code, inspect)
    labels, log = m.inspected
    assert st.regs["rax"] == 6                       # ended at the ud2, not on another vector
    assert log[:st.regs["r8"]] == [(labels[name], bits) for name, bits in want]
