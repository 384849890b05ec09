"""x87 FPU state for the bt vCPU, kept in `c.fpu` (created on first use).

A register's value is its 80-bit image (`raw`, an int; None only for a
register nothing has written yet, which reads as the image of `regs`).
`regs` keeps the nearest binary64 value of each image as a cache. The
arithmetic works on the images in exact 80-bit precision under FCW.RC and
FCW.PC (x87arith.py, x87math.py). FIP/FCS/FOP/FDP/FDS record the last
non-control instruction (x87.py) as an Intel CPU does.
An unmasked exception stays pending in FSW (ES) and raises #MF at the
next waiting x87 instruction when CR0.NE is set (x87_mf).
"""

from __future__ import annotations

import math

from .faults import MF, NM, GuestFault

CR0_MP, CR0_EM, CR0_TS, CR0_NE = 2, 4, 8, 0x20
C0, C1, C2, C3 = 0x100, 0x200, 0x400, 0x4000
IE, SF_ = 0x1, 0x40
ES_B = 0x8080
CW_WRITABLE, CW_ONE = 0x1F3F, 0x40   # FCW bit 6 reads as 1, bits 7 and 13-15 as 0


def control_word(v: int) -> int:
    """The FCW the CPU keeps when v is loaded."""
    return (v & CW_WRITABLE) | CW_ONE
INDEFINITE80 = 0xFFFFC000000000000000


def to80(x: float) -> int:
    """binary64 value -> 80-bit extended image (exact)."""
    sign = 1 << 79 if math.copysign(1.0, x) < 0 else 0
    if x != x:
        return sign | 0x7FFF << 64 | 0xC000000000000000
    if math.isinf(x):
        return sign | 0x7FFF << 64 | 1 << 63
    if x == 0:
        return sign
    m, e = math.frexp(abs(x))
    return sign | (e - 1 + 16383) << 64 | int(m * (1 << 64))


def from80(b: int) -> float:
    """80-bit extended image -> nearest binary64 value."""
    sign = -1.0 if b >> 79 & 1 else 1.0
    exp = b >> 64 & 0x7FFF
    mant = b & 0xFFFFFFFFFFFFFFFF
    if exp == 0x7FFF:
        return sign * math.inf if mant << 1 & 0xFFFFFFFFFFFFFFFF == 0 else math.nan
    if mant == 0:
        return sign * 0.0
    try:
        return sign * math.ldexp(float(mant), exp - 16383 - 63)
    except OverflowError:
        return sign * math.inf


class Fpu:
    """x87 register stack, control/status/tag words."""

    def __init__(self) -> None:
        self.regs = [0.0] * 8          # physical registers
        self.raw: list[int | None] = [None] * 8
        self.src_denormal = False      # the last binary32/64 memory operand was a denormal
        self.init()

    def init(self) -> None:
        """fninit: control/status/tags and the last-instruction pointers
        reset; register contents are kept."""
        self.empty = [True] * 8
        self.top = 0
        self.cw = 0x37F
        self.sw = 0
        # The last non-control instruction: its CS:IP, opcode (11 bits) and
        # memory operand (DS:offset), as an Intel CPU records them (the
        # vendor bt presents; CPUID 7.EBX bits 6/13 clear: always updated,
        # FCS/FDS kept).  AMD saves them in FXSAVE only while FSW.ES is set,
        # unless CPUID 0x80000008.EBX[2] (XSaveErPtr) says otherwise.
        self.fip = self.fcs = self.fop = self.fdp = self.fds = 0

    def __repr__(self) -> str:
        return f"Fpu(top={self.top}, cw={self.cw:#x}, sw={self.status():#x}, st={self.stack()})"

    def stack(self) -> list[float]:
        return [self.regs[(self.top + i) & 7] for i in range(8) if not self.empty[(self.top + i) & 7]]

    def status(self) -> int:
        """FSW with TOP; ES and B say whether an unmasked exception is pending
        (`sw` itself never holds them: loads drop them)."""
        sw = self.sw
        if sw & 0x3F and sw & ~self.cw & 0x3F:
            sw |= ES_B
        return (sw & ~0x3800) | self.top << 11

    def tag_abridged(self) -> int:
        return sum(1 << i for i in range(8) if not self.empty[i])

    def set_tag_abridged(self, t: int) -> None:
        self.empty = [not t >> i & 1 for i in range(8)]

    def get(self, i: int) -> float:
        """ST(i); an empty register gives the indefinite NaN (stack underflow)."""
        p = (self.top + i) & 7
        if self.empty[p]:
            self.sw |= IE | SF_
            self.sw &= ~C1
            return math.nan
        return self.regs[p]

    def put(self, i: int, v: float, raw: int | None = None) -> None:
        p = (self.top + i) & 7
        self.regs[p], self.raw[p], self.empty[p] = v, raw, False

    def raw80(self, i: int) -> int:
        p = (self.top + i) & 7
        if self.empty[p]:
            return INDEFINITE80
        r = self.raw[p]
        return r if r is not None else to80(self.regs[p])

    def image(self, i: int) -> int:
        """80-bit contents of ST(i) whatever its tag (what fxsave stores)."""
        p = (self.top + i) & 7
        r = self.raw[p]
        return r if r is not None else to80(self.regs[p])

    def push(self, v: float, raw: int | None = None) -> None:
        top = (self.top - 1) & 7
        if not self.empty[top]:
            self.sw |= IE | SF_ | C1
            v, raw = math.nan, INDEFINITE80
        else:
            self.sw &= ~C1
        self.top = top
        self.regs[top], self.raw[top], self.empty[top] = v, raw, False

    def pop(self) -> None:
        self.empty[self.top] = True
        self.top = (self.top + 1) & 7

    def set_cc(self, bits: int) -> None:
        self.sw = (self.sw & ~(C0 | C1 | C2 | C3)) | bits


def fpu_of(c) -> Fpu:
    """The FPU state of vCPU c, created at reset values on first use."""
    f = getattr(c, "fpu", None)
    if f is None:
        f = Fpu()
        c.fpu = f
    return f


def x87_mf(c) -> None:
    """A waiting x87 instruction (all but FNINIT, FNCLEX, FNSTCW, FNSTSW,
    FNSTENV, FNSAVE) finds an unmasked exception pending (FSW.ES): with
    CR0.NE it raises #MF before it runs (SDM Vol. 1, 8.7).  With NE clear
    the PC's FERR#/IRQ13 route is not modelled: the instruction goes on.
    Raises GuestFault."""
    f = getattr(c, "fpu", None)
    if f is not None and f.sw & ~f.cw & 0x3F and c.cr0 & CR0_NE:
        raise GuestFault(MF)


def x87_trap(c, wait: bool = False) -> None:
    """#NM for CR0.EM or CR0.TS (fwait: TS and MP). Raises GuestFault."""
    if wait:
        if c.cr0 & (CR0_TS | CR0_MP) == CR0_TS | CR0_MP:
            raise GuestFault(NM)
    elif c.cr0 & (CR0_EM | CR0_TS):
        raise GuestFault(NM)


def pointers_fxsave(f, wide: bool) -> tuple[int, int, int]:
    """(FOP, bytes 8-15, bytes 16-23) of an FXSAVE image: FXSAVE64 stores
    64-bit FIP and FDP; FXSAVE stores 32-bit offsets with FCS and FDS."""
    if wide:
        return f.fop, f.fip, f.fdp
    return f.fop, (f.fip & 0xFFFFFFFF) | f.fcs << 32, (f.fdp & 0xFFFFFFFF) | f.fds << 32
