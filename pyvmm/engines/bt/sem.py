"""The instruction table: mnemonic -> emitter, from the semantic families."""

from __future__ import annotations

import iced_x86 as X

from . import alu, ctrl, string, sysem

M = X.Mnemonic

EMITTERS: dict = {}
for _family in (alu, ctrl, string, sysem):
    EMITTERS.update(_family.EMITTERS)

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
       M.ENTER, M.DIV, M.IDIV})
