"""The instruction table: mnemonic -> emitter, from the semantic families."""

from __future__ import annotations

import iced_x86 as X

from . import alu, ctrl, fxsave, legacy32, simd, sse, ssefp, string, sysem, sysext, x87
from . import bmi, sse4, sse42str, ssse3
from . import pvcall
from . import mmx

M = X.Mnemonic

EMITTERS: dict = {}
for _family in (alu, ctrl, string, sysem, bmi):
    EMITTERS.update(_family.EMITTERS)

# SSE/x87 families: their emitters, the runtime helpers their generated code
# calls (merged into the translator's namespace), and the string/SSE twins.
_FP_FAMILIES = (sse, ssefp, x87, fxsave, sysext, legacy32, pvcall, ssse3, sse4, sse42str)
EXPORTS: dict = dict(simd.HELPERS, **bmi.EXPORTS)
FP_MNEMONICS: set = set()
for _family in _FP_FAMILIES:
    EMITTERS.update(_family.EMITTERS)
    EXPORTS.update(_family.EXPORTS)
    FP_MNEMONICS |= set(_family.EMITTERS) - getattr(_family, "PURE", frozenset())
for _m, _em in ssefp.SSE_STRING_TWINS.items():
    EMITTERS[_m] = simd.string_or_sse(string.EMITTERS[_m], _em)
# MMX: the MM-register forms of SSE mnemonics dispatch by operand (mmx.merge).
mmx.merge(EMITTERS)
EXPORTS.update(mmx.EXPORTS)
FP_MNEMONICS |= set(mmx.MMX_EMITTERS)

# Instructions after which the block ends (they change the mode, CPL,
# interrupt flag or segment state that the translation depends on).
ENDS_BLOCK = frozenset({
    M.HLT, M.CLI, M.STI, M.LGDT, M.LIDT, M.LTR, M.LLDT, M.LMSW, M.INVLPG, M.WRMSR,
    M.POPF, M.POPFD, M.POPFQ, M.IN, M.OUT, M.SWAPGS, M.SYSCALL, M.SYSRET, M.SYSRETQ,
})

# Instructions implemented through a helper that sees the whole CPU state
# (flag liveness treats them as reading the flags).
HELPER_MNEMONICS = frozenset(
    set(sysem.EMITTERS) | set(string.EMITTERS) - {M.MOV}
    | {M.PUSHF, M.PUSHFD, M.PUSHFQ, M.INT, M.INT3, M.INTO, M.IRET, M.IRETD, M.IRETQ,
       M.ENTER, M.DIV, M.IDIV}
    | FP_MNEMONICS)
