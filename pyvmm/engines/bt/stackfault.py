"""#SS(0) rather than #GP(0) for a non-canonical stack reference.

In 64-bit mode a memory reference at a non-canonical address is #GP(0),
except one that uses SS (an RSP or RBP base, or a push, pop, call, ret,
enter or leave), which is #SS(0) on Intel and AMD alike (SDM vol. 2,
"64-Bit Mode Exceptions").  The MMU sees only the linear address
(faults.NonCanonical), so delivery asks here, from the instruction at
CS:RIP, which one the CPU would raise.  Cold path: only faults decode."""

from __future__ import annotations

import iced_x86 as X

from .debugregs import _decode

NEAR = 64          # how far from RSP/RBP an implicit stack access can land (enter/leave/far returns)


def _near(a: int, b: int) -> bool:
    d = (a - b) & 0xFFFFFFFFFFFFFFFF
    return d < NEAR or d > (1 << 64) - NEAR


def stack_reference(c, linear: int) -> bool:
    """True when the access at non-canonical `linear` that the instruction
    at CS:RIP made used SS."""
    ins = _decode(c, (c.sb[1] + c.rip) & c.ipmask)
    if ins is None:
        return False
    if any(ins.op_kind(i) == X.OpKind.MEMORY for i in range(ins.op_count)) \
            and ins.memory_segment == X.Register.SS:
        return True
    return ins.stack_pointer_increment != 0 and (_near(linear, c.R[4]) or _near(linear, c.R[5]))
