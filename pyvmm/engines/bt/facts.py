"""What the translator must know about an instruction besides its emitter.

Each family module (alu.py, ctrl.py, sysem.py, string.py ...) declares the
facts of its own mnemonics in a FACTS dict (mnemonic -> Fact); sem.py
merges them with the emitters into one table and derives the sets the
translator tests on its hot paths."""

from __future__ import annotations

import enum


class Fact(enum.Flag):
    NONE = 0
    # The block ends after it: it changes the mode, CPL, interrupt flag or
    # segment state that the translation depends on.
    ENDS_BLOCK = enum.auto()
    # ... but at CPL0 it is inlined and leaves the block only when needed.
    CPL0_GOES_ON = enum.auto()
    # Implemented through a helper that sees the whole CPU state (flag
    # liveness treats it as reading the flags).
    HELPER = enum.auto()
    # Its emitter reads the lazy flags although the architecture may not
    # (a shift by zero leaves the flags alone; bsf/bsr keep them for a zero source).
    READS_LAZY = enum.auto()
    # Its memory-operand form never accesses memory (so never faults on it).
    NO_ACCESS = enum.auto()
    # A pushed value may stay forwardable across it (ctrl.push): its
    # register/immediate forms store nothing and leave RSP alone.
    FWD_KEEP = enum.auto()


def merge(table: dict, facts: dict) -> None:
    """Adds a family's FACTS rows to `table` (mnemonic -> Fact)."""
    for m, f in facts.items():
        table[m] = table.get(m, Fact.NONE) | f


def having(table: dict, fact: Fact) -> frozenset:
    """The mnemonics whose row has `fact`."""
    return frozenset(m for m, f in table.items() if f & fact)
