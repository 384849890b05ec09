"""A pop that takes the value of a push of the same trace (ctrl.push with
fwd) instead of reading it back: the sequences where that would be wrong
(a store, an RSP change, a helper or a narrower access in between) must
still read memory.  Checked against Unicorn on the compiled path."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
harness.needs_unicorn_and_as()

CASES = [
    "push rax\n pop rcx",
    "push rax\n push rbx\n pop rcx\n pop rdx",
    "push 0x12345678\n pop rcx",
    "push rax\n mov qword ptr [rsp], rbx\n pop rcx",                 # store to the slot
    "push rax\n mov byte ptr [rsp], bl\n pop rcx",                   # a partial store
    "push rax\n push rbx\n lea rsp, [rsp + 8]\n pop rcx",            # RSP moved
    "push rax\n push rbx\n add rsp, 8\n pop rcx",
    "mov rax, rsp\n sub rax, 64\n push rax\n pop rsp\n push rbx\n pop rcx",
    "push rax\n push bx\n pop cx\n pop rdx",                         # narrower push between
    "push rax\n pushfq\n popfq\n pop rcx",                           # pushf is not forwarded
    "push rax\n xchg rax, rbx\n pop rcx",
    "push rax\n mov rcx, rax\n add rcx, 5\n pop rax\n sub rax, rcx",
    # a callee that edits its return address: ret must read it back
    "call 1f\n inc rax\n inc rbx\n jmp 2f\n1: add qword ptr [rsp], 3\n ret\n2: nop",
    "call 1f\n inc rax\n jmp 2f\n1: push rbx\n lea rbx, [rax + 1]\n pop rbx\n ret\n2: nop",
    "call 1f\n jmp 2f\n1: call 3f\n ret\n3: add rax, rcx\n ret\n2: nop",
]


@pytest.mark.parametrize("src", CASES)
def test_against_unicorn(src):
    code = harness.assemble(src)
    regs = [0x0123456789ABCDEF * (i + 1) & (2**64 - 1) for i in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    data = bytes(range(256)) * (harness.DATA_SIZE // 256)
    want = harness.UnicornOracle().run(code, regs, 2, data)
    got = harness.BtOracle().run(code, regs, 2, data)
    assert got.vector == want.vector
    for i, (a, b) in enumerate(zip(got.regs, want.regs)):
        assert a == b, f"{harness.GPR_NAMES[i]}: bt {a:#x} != unicorn {b:#x}\n{src}"


def test_pop_reads_no_memory():
    """The plain pair is forwarded: the block reads nothing through the TLB."""
    got = harness.BtOracle().run(harness.assemble("push rax\n pop rcx"), [7] * 4 + [harness.STACK_TOP] + [0] * 11,
                                 2, bytes(64))
    assert got.regs[1] == 7
    srcs = [getattr(fn, "src", "") for fn in got.cpu.translator.cache.values()]
    assert any("p = _q0" in s for s in srcs), srcs
    assert not any("TR[" in s for s in srcs)
