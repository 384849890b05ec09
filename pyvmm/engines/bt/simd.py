"""Shared plumbing for the SSE and x87 families: XMM operand access, 16-byte
memory access, the CR0/CR4 checks, and lane packing.

XMM registers live in `c.xmm` (16 Python ints, 128 bits each), MXCSR in
`c.mxcsr`. Generated code touches them as `c.xmm[n]`, so the list must only
ever be mutated in place.

Raises (from generated code): GuestFault #UD (CR0.EM=1 or CR4.OSFXSR=0),
#NM (CR0.TS=1), #GP(0) for a misaligned 16-byte operand."""

from __future__ import annotations

import struct

import iced_x86 as X

from .faults import GP, NM, UD, GuestFault
from .gen import Gen, Unsupported

M = X.Mnemonic
OK = X.OpKind
Rg = X.Register
M64 = 0xFFFFFFFFFFFFFFFF
M128 = (1 << 128) - 1
CR0_EM, CR0_TS, CR0_MP = 4, 8, 2
CR4_OSFXSR = 1 << 9

# Legacy-SSE instructions whose 16-byte memory operand may be misaligned.
UNALIGNED_OK = frozenset({M.MOVUPS, M.MOVUPD, M.MOVDQU, M.LDDQU, M.PCMPESTRI, M.PCMPESTRI64,
                          M.PCMPESTRM, M.PCMPESTRM64, M.PCMPISTRI, M.PCMPISTRM})

_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SFMT = {1: "b", 2: "h", 4: "i", 8: "q"}
STRUCTS = {(w, s): struct.Struct(f"<{16 // w}{(_SFMT if s else _FMT)[w]}")
           for w in (1, 2, 4, 8) for s in (False, True)}


def lanes(v: int, w: int, signed: bool = False) -> tuple:
    """The 16/w lanes of a 128-bit value, lowest first."""
    return STRUCTS[w, signed].unpack(v.to_bytes(16, "little"))


def unlanes(vals, w: int) -> int:
    """Packs lanes (masked to w bytes each) back into a 128-bit value."""
    m = (1 << (8 * w)) - 1
    return int.from_bytes(STRUCTS[w, False].pack(*[x & m for x in vals]), "little")


def sse_trap(c) -> None:
    """Called when CR0.EM/TS is set or CR4.OSFXSR is clear. Raises #UD or #NM."""
    if c.cr0 & CR0_EM or not c.cr4 & CR4_OSFXSR:
        raise GuestFault(UD)
    if c.cr0 & CR0_TS:
        raise GuestFault(NM)


def rd16(m, a: int) -> int:
    return m.rd8(a) | m.rd8((a + 8) & M64) << 64


def wr16(m, a: int, v: int) -> None:
    """16-byte store that faults before writing anything."""
    if a & 0xFFF <= 0xFF0:
        m.wr8(a, v & M64)
        m.wr8(a + 8, v >> 64)
    else:
        m.write_slow(a, 16, v)


def misaligned(a: int) -> None:
    raise GuestFault(GP, 0)


HELPERS = {"SSE_TRAP": sse_trap, "RD16": rd16, "WR16": wr16, "MISALIGNED": misaligned}


# -- emitter helpers ----------------------------------------------------------
def check_sse(g: Gen) -> None:
    """Emits the CR0.EM/TS, CR4.OSFXSR test for an SSE instruction."""
    g.fault()
    g.bind("c")
    g.emit(f"if c.cr0 & {CR0_EM | CR0_TS:#x} or not c.cr4 & {CR4_OSFXSR:#x}: SSE_TRAP(c)")


def xreg(g: Gen, i: int) -> int:
    """XMM register number of operand i. Raises Unsupported for MMX/other."""
    r = g.ins.op_register(i)
    if not Rg.XMM0 <= r <= Rg.XMM15:
        raise Unsupported(f"non-XMM register operand {r}")
    return r - Rg.XMM0


def is_xmm(g: Gen, i: int) -> bool:
    return g.is_reg(i) and Rg.XMM0 <= g.ins.op_register(i) <= Rg.XMM15


def memsize(g: Gen) -> int:
    return X.MemorySizeInfo(g.ins.memory_size).size


def _address(g: Gen, size: int) -> None:
    """Emits the operand's address into `a`, with the #GP check that a
    16-byte access needs unless the instruction is exempt."""
    g.addr()
    g.fault()
    if size == 16 and g.ins.mnemonic not in UNALIGNED_OK:
        g.emit("if a & 15: MISALIGNED(a)")


def xread(g: Gen, i: int, size: int | None = None) -> str:
    """Expression for XMM/memory operand i (memory loaded into m{i}); a
    16-byte memory operand is checked for alignment unless exempt."""
    if g.is_reg(i):
        return f"c.xmm[{xreg(g, i)}]"
    if not g.is_mem(i):
        raise Unsupported("operand kind")
    size = size or memsize(g)
    _address(g, size)
    if size == 16:
        g.emit(f"m{i} = RD16(c.mmu, a)")
    else:
        g.emit(f"m{i} = {g.rmem(size)}")
    return f"m{i}"


def xwrite(g: Gen, i: int, v: str, size: int | None = None) -> None:
    """Stores v into XMM/memory operand i (v must fit the size)."""
    if g.is_reg(i):
        g.emit(f"c.xmm[{xreg(g, i)}] = {v}")
        return
    size = size or memsize(g)
    _address(g, size)
    if size == 16:
        g.emit(f"WR16(c.mmu, a, {v})")
    else:
        g.wmem(size, v)


def string_or_sse(string_em, sse_em):
    """Emitter for a mnemonic shared by a string instruction and an SSE one
    (movsd, cmpsd)."""
    def em(g: Gen) -> None:
        (string_em if g.ins.is_string_instruction else sse_em)(g)
    return em
