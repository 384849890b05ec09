"""The instruction table: mnemonic -> emitter, from the semantic families,
and the facts the translator needs about each (facts.py)."""

from __future__ import annotations

import iced_x86 as X

from . import alu, ctrl, fxsave, legacy32, simd, sse, ssefp, string, sysem, sysext, x87
from . import bmi, sse4, sse42str, sseapprox, ssse3
from . import xsave
from . import pvcall
from . import mmx
from . import avx_fp, avx_shuffle, f16c, fma, vex
from .facts import Fact, having, merge

M = X.Mnemonic

EMITTERS: dict = {}
for _family in (alu, ctrl, string, sysem, bmi):
    EMITTERS.update(_family.EMITTERS)

# SSE/x87 families: their emitters, the runtime helpers their generated code
# calls (merged into the translator's namespace), and the string/SSE twins.
_FP_FAMILIES = (sse, ssefp, sseapprox, x87, fxsave, xsave, sysext, legacy32, pvcall, ssse3, sse4, sse42str)
_FP_FAMILIES += (vex, avx_shuffle, avx_fp, fma, f16c)   # the VEX (AVX, AVX2, FMA, F16C) forms
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

# The instruction-facts table (facts.py): every family's FACTS rows, and
# HELPER for the SIMD/x87 forms (their generated code calls helpers that
# see the whole CPU state).  The sets below are what the translator tests.
FACTS: dict = {}
for _family in (alu, ctrl, string, sysem):
    merge(FACTS, _family.FACTS)
merge(FACTS, {m: Fact.HELPER for m in FP_MNEMONICS})

ENDS_BLOCK = having(FACTS, Fact.ENDS_BLOCK)
CPL0_GOES_ON = having(FACTS, Fact.CPL0_GOES_ON)
HELPER_MNEMONICS = having(FACTS, Fact.HELPER)
READS_LAZY = having(FACTS, Fact.READS_LAZY)
NO_ACCESS = having(FACTS, Fact.NO_ACCESS)
FWD_KEEP = having(FACTS, Fact.FWD_KEEP)
