"""Guest exceptions raised inside translated code and the helpers it calls."""

from __future__ import annotations

DE, DB, NMI, BP, OF_, BR, UD, NM, DF_, TS, NP, SS, GP, PF, MF, AC, MC, XM = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19)
# Vectors that push an error code in protected mode.
WITH_ERROR_CODE = frozenset({DF_, TS, NP, SS, GP, PF, AC})
# Fault-class exceptions: their RFLAGS image has RF set (SDM Vol. 3, 17.3.1.1),
# so the IRET back re-runs the instruction past an instruction breakpoint.
# #DB (an instruction breakpoint is the one fault that leaves RF alone),
# #BP/#OF (traps) and the aborts (#DF, #MC) are not in it.
FAULT_CLASS = frozenset({DE, BR, UD, NM, TS, NP, SS, GP, PF, MF, AC, XM, 20, 21})


class GuestFault(Exception):
    """An x86 exception to deliver to the guest (not a pyvmm error).

    Raised before the faulting instruction changes any state."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(vector, error_code, cr2)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2

    def __repr__(self) -> str:
        return f"GuestFault(vector={self.vector}, error={self.error_code}, cr2={self.cr2})"


class NonCanonical(GuestFault):
    """#GP(0) for a data access at a non-canonical linear address.  The MMU
    does not know the segment: where the reference uses SS the CPU raises
    #SS(0) instead, which delivery works out (stackfault.py)."""

    def __init__(self, linear: int):
        super().__init__(GP, 0)
        self.linear = linear


class SmcRestart(Exception):
    """Translated code tried to write a page holding translated code: the
    instruction is restarted on the single-instruction path."""


class ApicRestart(SmcRestart):
    """Translated code tried to write the local APIC page (an ICR self-IPI,
    a TPR or EOI write can make an interrupt deliverable at once): the
    instruction is run alone, then the dispatcher takes what is pending
    before the next instruction (SDM Vol. 3, 6.6)."""


class BlockExit(Exception):
    """An instruction changed state the translation depends on (mode, CPL,
    segment, interrupt flag): leave the block after it."""
