"""The cold path (cold.py): template code objects, literal relocation and
promotion give the same results as compiled blocks.  The differential
tests (test_diff_unicorn.py, test_diff_kvm.py) also run every sequence
on the cold path; these cover what random sequences rarely reach."""

from __future__ import annotations

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

import harness  # noqa: E402

from pyvmm.engines.bt import cold  # noqa: E402


def _regs() -> list[int]:
    regs = [0x1111 * (i + 1) for i in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    return regs


def _both(src: str, hot_after: int = harness.COLD):
    code = harness.assemble(src)
    data = bytes(range(256)) * 16
    want = harness.BtOracle(harness.COMPILED).run(code, _regs(), 0x2, data)
    got = harness.BtOracle(hot_after).run(code, _regs(), 0x2, data)
    return want, got


def _same(want, got) -> None:
    assert got.vector == want.vector
    assert got.regs == want.regs
    assert got.rflags & 0x8D5 == want.rflags & 0x8D5
    assert got.data == want.data
    assert got.rip == want.rip
    assert got.cpu.icount == want.cpu.icount


def test_template_keeps_literals_apart():
    ns = {}
    src = ("def blk(c):\n    x = (0x10, 3, 0x10)[c[0]]\n    y = -1 + ~0xff\n"
           "    c.append((x, y, 2 ** 3, (1, 2)[c[0] - 1]))\n")
    code, vals, t = cold._template(src, ns)
    assert t is not None and vals == (0x10, 3, 0x10, 0, 1, 0xff, 2, 3, 1, 2, 0, 1)
    out = [2]
    types.FunctionType(code, ns)(out)
    assert out[1] == (0x10, -257, 8, 2)
    # the same shape with other literals shares the template
    code2, vals2, t2 = cold._template(src.replace("0xff", "0xf0"), ns)
    assert t2 is t and code2 is not code
    out = [0]
    types.FunctionType(code2, ns)(out)
    assert out[1] == (0x10, -242, 8, 2)


@pytest.mark.parametrize("body", ["    if 0:\n        c.append(1)\n", "    c.append(not 0)\n",
                                  "    c.append('a1')\n", "    c.append(1.5)\n"])
def test_sources_the_compiler_would_fold_are_compiled_whole(body):
    src = "def blk(c):\n" + body
    code, vals, t = cold._template(src, {})
    assert t is None and vals is None
    out, ref = [], []
    types.FunctionType(code, {})(out)
    ns: dict = {}
    exec(src, ns)
    ns["blk"](ref)
    assert out == ref


def test_relocated_copies_match_compiled():
    """The same bytes at several addresses: the third and later copies are
    relocated from the first two (RIP-relative lea, a short jump, a call)."""
    unit = "lea rax, [rip + 0x40]\n add rbx, rax\n jmp 1f\n ud2\n1: call 2f\n2: pop rdx\n add rsi, rdx\n"
    before = cold.stats["relocated"]
    want, got = _both(unit * 6)
    _same(want, got)
    assert cold.stats["relocated"] - before >= 4 * 6


def test_promotion_mid_loop_matches_compiled():
    src = "mov ecx, 50\n1: add rax, rcx\n imul rbx, rax, 3\n mov [rbp + 8], rbx\n dec ecx\n jnz 1b\n"
    want, got = _both(src, hot_after=5)
    _same(want, got)
    assert got.cpu.translator.compiled >= 1        # the loop body got hot


def test_fault_mid_block_on_cold_path():
    """A page fault inside a cold block: rip and the registers written so
    far are the compiled path's."""
    want, got = _both("mov rax, 5\n add rbx, rax\n movabs rdi, 0x100000000000\n mov rcx, [rdi]\n add rdx, 1\n")
    assert want.vector is not None
    _same(want, got)
