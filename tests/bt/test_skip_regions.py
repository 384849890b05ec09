"""A jcc whose target lies further on in the same trace compiles to
`if not taken: <the instructions it jumps over>` (Translator._skip_target)
instead of a side exit, so a loop with an `if` inside stays in one block;
one whose taken path goes back to the block start within a few
instructions gets a copy of that path (Translator._loop_tail).
What could go wrong: flags after the join come from either path, a push
in the skipped part must not be forwarded, a fault inside it must point
at the right instruction, and the retired-instruction count must not
include what was skipped.  Checked against the real CPU (KVM, CPL3) where
it can run (/dev/kvm usable), else Unicorn; the counts against Unicorn's code hook."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
harness.needs_unicorn_and_as()
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

CASES = [
    # the flags after the join come from the cmp (taken) or the add (not taken)
    "cmp rax, rbx\n je 1f\n add rcx, rdx\n1: adc rsi, 0\n setc dil",
    "test rax, rax\n jz 1f\n sub rcx, rdx\n1: setb al\n sete bl\n sets dl",
    "cmp rax, rax\n je 1f\n add rcx, rdx\n1: adc rsi, 0",         # always taken
    "cmp rax, rbx\n jb 1f\n inc rcx\n1: adc rsi, 7",                # inc keeps CF: from the cmp either way
    "cmp rax, rbx\n jb 1f\n test rcx, rcx\n1: setb dl\n adc rsi, 0",  # CF=1 (cmp) or 0 (test)
    # a body that compiles to nothing, and one whose flags die in it
    "cmp rax, rbx\n je 1f\n nop\n1: inc rdx",
    "cmp rax, rbx\n je 1f\n cmp rcx, rdx\n test rsi, rsi\n1: add rax, 1\n setz bl",
    # loops with ifs inside (the back edge goes to the loop head)
    "mov ecx, 100\n2: test ecx, 1\n jz 1f\n add rax, rcx\n1: dec ecx\n jnz 2b",
    "mov ecx, 64\n2: test ecx, 1\n jz 1f\n test ecx, 2\n jz 3f\n add rax, rcx\n3: add rbx, 1\n1: dec ecx\n jnz 2b",
    # crossing regions: the second jcc's target is beyond the first's join
    "test rcx, 1\n jz 1f\n test rcx, 2\n jz 3f\n nop\n1: add rax, 1\n3: add rbx, 1",
    "test rcx, 1\n jz 1f\n test rdx, 1\n jz 1f\n inc rax\n1: inc rbx",   # two jccs to one target
    # a push in the skipped part: the pop after the join must read memory
    "push rax\n test rcx, 1\n jz 1f\n push rbx\n pop rsi\n push rdx\n add rsp, 8\n1: pop rdi",
    "push rax\n test rcx, 1\n jz 1f\n pop rsi\n push rbx\n1: pop rdi",    # rdi: rax or rbx
    "push rax\n push rdx\n test rcx, 1\n jz 1f\n push rbx\n1: pop rdi\n pop rsi",   # two or three pushed
    # a store in the body, a load after
    "test rcx, 1\n jnz 1f\n mov qword ptr [rbp + 8], rbx\n1: mov rsi, qword ptr [rbp + 8]",
    # the taken arm of a loop's jcc, copied into the block (Translator._loop_tail):
    # the other arm leaves through an indirect jmp
    "mov ecx, 50\n2: test ecx, 1\n jnz 3f\n add rax, rcx\n lea rdx, [rip + 3f]\n jmp rdx\n3: dec ecx\n jnz 2b",
    "mov ecx, 50\n2: test ecx, 3\n jz 3f\n lea rdx, [rip + 3f]\n jmp rdx\n"
    "3: add rbx, rcx\n cmp ebx, 0x800\n ja 4f\n dec ecx\n jnz 2b\n4: inc rsi",     # a side exit in the copy
    "mov ecx, 50\n2: sub ecx, 1\n jb 5f\n test ecx, 1\n je 2b\n lea rdx, [rip + 2b]\n jmp rdx\n5: nop",
    # setb reads the cmp's flags, not those of the copy's test
    "mov ecx, 50\n lea rdx, [rip + 2f]\n jmp rdx\n2: cmp ecx, 30\n je 3f\n setb al\n add rbx, rax\n"
    " sub ecx, 1\n jnz 2b\n lea rdx, [rip + 4f]\n jmp rdx\n3: sub ecx, 1\n test ecx, ecx\n jnz 2b\n4: nop",
    # a call inlined into the body
    "test rcx, 1\n jz 1f\n call 2f\n jmp 1f\n2: add rax, 3\n ret\n1: inc rbx",
]
FAULTS = [
    # a load in the copied taken arm faults on the first odd count
    "mov ecx, 9\n2: test ecx, 1\n jnz 3f\n lea rdx, [rip + 3f]\n jmp rdx\n"
    "3: inc rdi\n mov rsi, qword ptr [rbx]\n dec ecx\n jnz 2b",
    # the body's load faults (rbx is not canonical): rip is the load
    "test rax, rax\n jz 1f\n inc rsi\n mov rcx, qword ptr [rbx]\n inc rdx\n1: inc rdi",
]


def _regs(rax: int, rcx: int) -> list[int]:
    regs = [0x0123456789ABCDEF * (i + 1) & (2**64 - 1) for i in range(16)]
    regs[0], regs[1] = rax, rcx
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    return regs


def _oracle():
    """The real CPU where /dev/kvm is usable (an oracle that then fails to
    start fails the test), Unicorn only where the host has no KVM."""
    if kvm_usable() is None:
        return KvmOracle()
    return harness.UnicornOracle()


ORACLE = None


def _check(src: str, regs: list[int]) -> None:
    global ORACLE
    ORACLE = ORACLE or _oracle()
    code = harness.assemble(src)
    data = bytes(range(256)) * (harness.DATA_SIZE // 256)
    want = ORACLE.run(code, regs, 2, data)
    got = harness.BtOracle().run(code, regs, 2, data)
    srcs = "\n".join(getattr(fn, "src", "") for fn in got.cpu.translator.cache.values())
    assert got.vector == want.vector, f"{src}\n{srcs}"
    if want.vector is not None:     # (without a fault bt's block may have run the hlt after the code)
        assert got.rip == want.rip, f"rip bt {got.rip:#x} != cpu {want.rip:#x}\n{src}\n{srcs}"
    for i, (a, b) in enumerate(zip(got.regs, want.regs)):
        assert a == b, f"{harness.GPR_NAMES[i]}: bt {a:#x} != cpu {b:#x}\n{src}\n{srcs}"
    assert got.rflags & harness.ARITH == want.rflags & harness.ARITH, f"{src}\n{srcs}"
    assert got.data == want.data, src


@pytest.mark.parametrize("src", CASES)
@pytest.mark.parametrize("rax, rcx", [(0, 0), (5, 5), (1, 2), (2**64 - 1, 3), (7, 2**63)])
def test_against_the_cpu(src, rax, rcx):
    _check(src, _regs(rax, rcx))


@pytest.mark.parametrize("src", FAULTS)
@pytest.mark.parametrize("rax", [0, 1])
def test_fault_inside_the_skipped_part(src, rax):
    regs = _regs(rax, 0)
    regs[3] = 0x8000000000000000    # not canonical: #GP on both
    _check(src, regs)


def _retired(code: bytes, regs: list[int]) -> int:
    """Instructions Unicorn runs from CODE_ADDR to the end of `code`."""
    import unicorn as U
    import unicorn.x86_const as UX
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(harness.CODE_ADDR, 0x1000)
    uc.mem_map(harness.DATA_ADDR, 0x100000)
    uc.mem_write(harness.CODE_ADDR, code)
    for name, v in zip(harness.GPR_NAMES, regs):
        uc.reg_write(getattr(UX, f"UC_X86_REG_{name.upper()}"), v)
    n = [0]
    uc.hook_add(U.UC_HOOK_CODE, lambda *a: n.__setitem__(0, n[0] + 1))
    uc.emu_start(harness.CODE_ADDR, harness.CODE_ADDR + len(code))
    return n[0]


@pytest.mark.parametrize("src", CASES)
@pytest.mark.parametrize("rcx", [0, 1, 2, 3])
def test_retired_instruction_count(src, rcx):
    """--deterministic time is counted in retired instructions: the taken
    path must not count the ones it jumped over."""
    code = harness.assemble(src)
    regs = _regs(rcx * 3, rcx)
    got = harness.BtOracle().run(code, regs, 2, bytes(harness.DATA_SIZE))
    ran_hlt = 1 if got.cpu.halted else 0    # the harness's hlt after the code, when a block took it in
    assert got.cpu.icount - ran_hlt == _retired(code, regs), src


def test_a_loop_with_an_if_is_one_block():
    code = harness.assemble("mov ecx, 100\n2: test ecx, 1\n jz 1f\n add rax, rcx\n1: dec ecx\n jnz 2b")
    got = harness.BtOracle().run(code, _regs(0, 0), 2, bytes(64))
    assert got.regs[0] == sum(range(1, 101, 2))
    srcs = [getattr(fn, "src", "") for fn in got.cpu.translator.cache.values()]
    loop = [s for s in srcs if "continue" in s]
    assert loop and "ic -= 1" in loop[0], srcs       # the if's taken path skips the add
    assert len(got.cpu.translator.cache) <= 3, srcs  # start, loop, end: no block per iteration


def test_a_loop_whose_jcc_arm_returns_to_the_start_keeps_it_in_the_block():
    code = harness.assemble("mov ecx, 50\n2: test ecx, 1\n jnz 3f\n add rax, rcx\n lea rdx, [rip + 3f]\n"
                            " jmp rdx\n3: dec ecx\n jnz 2b")
    got = harness.BtOracle().run(code, _regs(0, 0), 2, bytes(64))
    assert got.regs[0] == sum(range(2, 51, 2))
    srcs = [getattr(fn, "src", "") for fn in got.cpu.translator.cache.values()]
    assert any("ic += -" in s and "continue" in s for s in srcs), srcs   # the copied arm loops
