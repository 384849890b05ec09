"""The translator's bound on cached blocks (translator.MAX_BLOCKS): past it
the whole cache is dropped and blocks come back as they run again, with
the same results as with no bound."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

# A loop over several blocks (each branch target starts one), so a small
# bound is crossed many times while it runs.
LOOP = """
    mov ecx, 300
    xor eax, eax
top:
    add eax, ecx
    test ecx, 1
    jz even
    imul eax, eax, 3
    jmp next
even:
    xor eax, 0x5a5a
    test ecx, 4
    jz next
    rol eax, 7
next:
    dec ecx
    jnz top
"""


def _run(max_blocks: int | None):
    def setup(cpu) -> None:
        if max_blocks is not None:
            cpu.translator.max_blocks = max_blocks
    return harness.BtOracle().run(harness.assemble(LOOP), [0] * 4 + [harness.STACK_TOP] + [0] * 11, 2,
                                  bytes(64), limit=100000, setup=setup)


def test_a_small_bound_drops_and_refills_with_the_same_result():
    free, bounded = _run(None), _run(3)
    assert free.vector is None and bounded.vector is None
    assert bounded.regs == free.regs and bounded.rflags == free.rflags
    t = bounded.cpu.translator
    assert t.evictions >= 50 and len(t.cache) <= 3
    assert free.cpu.translator.evictions == 0 and len(free.cpu.translator.cache) > 3


def test_source_is_kept_only_when_asked():
    t = _run(None).cpu.translator
    assert all(hasattr(fn, "src") for fn in t.cache.values())      # harness asks for it
    t.keep_source = False
    fn = t._compile("def blk(c):\n    pass\n", 0x1000)
    assert not hasattr(fn, "src")
