"""VEX plumbing shared by the AVX families: the AVX-state check, YMM and
256-bit memory operand access, and the VEX forms of the legacy SSE
instructions the SSE families already implement.

YMMn is `c.xmm[n]` (bits 127:0) plus `c.ymmh[n]` (bits 255:128).  A VEX.128
form that writes an XMM register zeroes its ymmh; legacy SSE forms leave
ymmh alone.

The VEX form of a legacy SSE instruction is emitted by the legacy emitter
itself, run on a view (`_View`) of the instruction with its operands
renumbered to slots of a local list `V`: slot 1 is the destination
(preloaded with VEX.vvvv's register for the three-operand forms), slot 0 the
implicit xmm0 (the /is4 mask of VBLENDV*, the mask PCMPxSTRM writes), further
slots the other XMM sources.  A VEX.256 form runs the legacy code twice, on
the low and then the high 128-bit lanes.  The legacy code's CPU `c` is
renamed `_cv`, a LaneCpu whose `xmm` is V (so register numbers, inline or
passed to helpers, address slots) and whose other state is the CPU's.

Raises (from generated code): GuestFault #UD when CR4.OSXSAVE is clear or
XCR0 lacks SSE|AVX, #NM when CR0.TS is set, #GP(0) for a misaligned operand
of VMOVAPS/VMOVDQA/VMOVNT*."""

from __future__ import annotations

import re

import iced_x86 as X

from . import sse, sse4, sse42str, sseapprox, ssefp, ssse3
from .faults import GP, NM, UD, GuestFault
from .gen import Gen, Unsupported
from .simd import M128

M = X.Mnemonic
OK = X.OpKind
Rg = X.Register
OCK = X.OpCodeOperandKind
M64 = 0xFFFFFFFFFFFFFFFF
M256 = (1 << 256) - 1
CR4_OSXSAVE = 1 << 18
CR4_OSXMMEXCPT = 1 << 10
XM = 19
CR0_TS = 8
XCR0_SSE_AVX = 6
_VVVV = frozenset({OCK.XMM_VVVV, OCK.YMM_VVVV})

# VEX forms whose memory operand must be aligned (16 or 32 bytes).
ALIGNED = frozenset({M.VMOVAPS, M.VMOVAPD, M.VMOVDQA, M.VMOVNTPS, M.VMOVNTPD, M.VMOVNTDQ, M.VMOVNTDQA})


def avx_trap(c) -> None:
    """Called when the AVX state is not enabled or CR0.TS is set."""
    if not c.cr4 & CR4_OSXSAVE or (getattr(c, "xcr0", 1) & XCR0_SSE_AVX) != XCR0_SSE_AVX:
        raise GuestFault(UD)
    raise GuestFault(NM)


def rd32(m, a: int) -> int:
    return m.rd8(a) | m.rd8((a + 8) & M64) << 64 | m.rd8((a + 16) & M64) << 128 | m.rd8((a + 24) & M64) << 192


def wr32(m, a: int, v: int) -> None:
    """32-byte store that faults before writing anything."""
    if a & 0xFFF <= 0xFE0:
        for k in range(4):
            m.wr8(a + 8 * k, v >> (64 * k) & M64)
    else:
        m.write_slow(a, 32, v)


def misaligned(a: int) -> None:
    raise GuestFault(GP, 0)


def simd_fault(c, flags: int) -> None:
    """An unmasked SIMD floating-point exception: the flags are set, the
    destination is left alone, and #XM (#UD without CR4.OSXMMEXCPT) raised."""
    c.mxcsr |= flags
    raise GuestFault(XM if c.cr4 & CR4_OSXMMEXCPT else UD)


HELPERS = {"AVX_TRAP": avx_trap, "RD32": rd32, "WR32": wr32, "MISALIGNED32": misaligned,
           "SIMD_FAULT": simd_fault}


# -- emitter helpers ----------------------------------------------------------
def check_avx(g: Gen) -> None:
    """Emits the CR4.OSXSAVE / XCR0 / CR0.TS test of a VEX instruction."""
    g.fault()
    g.bind("c")
    g.emit(f"if c.cr0 & {CR0_TS} or not c.cr4 & {CR4_OSXSAVE:#x} or c.xcr0 & 6 != 6: AVX_TRAP(c)")


def unmasked_fault(g: Gen) -> None:
    """After `_r, _f = HELPER(...)` (result, exception flags): raises for an
    unmasked flag, else adds the flags to MXCSR (the caller stores _r)."""
    g.emit("if _f & ~(c.mxcsr >> 7): SIMD_FAULT(c, _f)")
    g.emit("c.mxcsr |= _f")


def vreg(g: Gen, i: int) -> tuple[int, int]:
    """(register number, width in bytes) of XMM/YMM operand i."""
    r = g.ins.op_register(i)
    if Rg.XMM0 <= r <= Rg.XMM15:
        return r - Rg.XMM0, 16
    if Rg.YMM0 <= r <= Rg.YMM15:
        return r - Rg.YMM0, 32
    raise Unsupported(f"register {r}")


def is_vec(g: Gen, i: int) -> bool:
    if not g.is_reg(i):
        return False
    r = g.ins.op_register(i)
    return Rg.XMM0 <= r <= Rg.XMM15 or Rg.YMM0 <= r <= Rg.YMM15


def opsize(g: Gen, i: int) -> int:
    if g.is_mem(i):
        return X.MemorySizeInfo(g.ins.memory_size).size
    return vreg(g, i)[1]


def address(g: Gen, size: int) -> None:
    """Emits `a = ...` and, for the aligned forms, the alignment check."""
    g.addr()
    g.fault()
    if g.ins.mnemonic in ALIGNED and size >= 16:
        g.emit(f"if a & {size - 1}: MISALIGNED32(a)")


def vread(g: Gen, i: int, size: int | None = None) -> str:
    """Expression for the whole XMM/YMM/memory operand i (up to 256 bits);
    memory is loaded into m{i} first."""
    if g.is_reg(i):
        n, w = vreg(g, i)
        return f"c.xmm[{n}]" if w == 16 else f"(c.xmm[{n}] | c.ymmh[{n}] << 128)"
    if not g.is_mem(i):
        raise Unsupported("operand kind")
    size = size or opsize(g, i)
    address(g, size)
    if size in (16, 32):    # the soft-TLB fast path (Gen.rmem), else the MMU's
        g.bind("TR")
        g.emit(f"m{i} = (int.from_bytes(_e[0][(_o := _e[1] + (a & 0xFFF)):_o + {size}], 'little') "
               f"if (_e := TR.get(a >> 12)) and a & 0xFFF <= {0x1000 - size:#x} "
               f"else RD{size}(c.mmu, a))")
    else:
        g.emit(f"m{i} = {g.rmem(size)}")
    return f"m{i}"


def vwrite(g: Gen, i: int, v: str, size: int | None = None) -> None:
    """Stores v into XMM/YMM/memory operand i; an XMM destination has its
    upper half zeroed (VEX.128)."""
    if g.is_reg(i):
        n, w = vreg(g, i)
        if w == 16:
            g.emit(f"c.xmm[{n}] = {v}; c.ymmh[{n}] = 0")
        else:
            g.emit(f"_y = {v}; c.xmm[{n}] = _y & {M128:#x}; c.ymmh[{n}] = _y >> 128")
        return
    size = size or opsize(g, i)
    address(g, size)
    if size in (16, 32):    # the soft-TLB fast path (Gen.wmem), else the MMU's
        g.bind("TW")
        g.emit(f"if (_e := TW.get(a >> 12)) and a & 0xFFF <= {0x1000 - size:#x}: "
               f"_e[0][(_o := _e[1] + (a & 0xFFF)):_o + {size}] = ({v}).to_bytes({size}, 'little')")
        g.emit(f"else: WR{size}(c.mmu, a, {v})")
    else:
        g.wmem(size, v)


# -- VEX forms of legacy SSE instructions ------------------------------------------
LEGACY: dict = {}
for _family in (sse, ssefp, sseapprox, ssse3, sse4, sse42str):
    LEGACY.update(_family.EMITTERS)
LEGACY.update(ssefp.SSE_STRING_TWINS)
_BLENDV = frozenset({M.VBLENDVPS, M.VBLENDVPD, M.VPBLENDVB})
_WRITES_XMM0 = frozenset({M.VPCMPESTRM, M.VPCMPESTRM64, M.VPCMPISTRM})
# Legacy forms whose first XMM operand is only read.
_READS_DEST = frozenset({M.PCMPESTRI, M.PCMPESTRI64, M.PCMPESTRM, M.PCMPESTRM64, M.PCMPISTRI, M.PCMPISTRM,
                         M.PTEST, M.COMISS, M.COMISD, M.UCOMISS, M.UCOMISD})
# VEX.256 immediates whose high lane takes other bits (shift for that lane).
_HI_IMM = {M.VSHUFPD: 2, M.VBLENDPS: 4, M.VBLENDPD: 2, M.VMPSADBW: 3}
# VEX.256 forms that widen an XMM source: the high lane reads the source shifted right.
_WIDEN = {M.VCVTPS2PD: 64, M.VCVTDQ2PD: 64}
for _s in ("ZX", "SX"):
    for _p, _ratio in (("BW", 2), ("BD", 4), ("BQ", 8), ("WD", 2), ("WQ", 4), ("DQ", 2)):
        _WIDEN[getattr(M, f"VPMOV{_s}{_p}")] = 128 // _ratio
# VEX.256 forms that narrow a YMM source into an XMM: each lane gives 64 bits.
_NARROW = frozenset({M.VCVTPD2PS, M.VCVTPD2DQ, M.VCVTTPD2DQ})


class _View:
    """A VEX instruction as its legacy twin sees it: operands renumbered,
    XMM/YMM operands turned into slot registers, immediates adjusted for
    the high lane.  Everything else reads through to the real instruction."""

    def __init__(self, ins, mnemonic: int, ops: list, imm_shift: int = 0):
        self._ins, self.mnemonic, self._ops, self._imm_shift = ins, mnemonic, ops, imm_shift
        self.op_count = len(ops)

    def __getattr__(self, name):
        return getattr(self._ins, name)

    def op_kind(self, i: int) -> int:
        kind, v = self._ops[i]
        if kind in ("x", "r"):
            return OK.REGISTER
        return OK.MEMORY if kind == "m" else self._ins.op_kind(v)

    def op_register(self, i: int) -> int:
        kind, v = self._ops[i]
        return Rg.XMM0 + v if kind == "x" else v if kind == "r" else Rg.NONE

    def immediate(self, i: int) -> int:
        return self._ins.immediate(self._ops[i][1]) >> self._imm_shift

    op0_register = property(lambda self: self.op_register(0))
    op1_register = property(lambda self: self.op_register(1))
    op2_register = property(lambda self: self.op_register(2))


class LaneCpu:
    """The CPU as the legacy code of one VEX lane sees it: `xmm` is the slot
    list V, every other attribute is the real CPU's (read and written)."""

    __slots__ = ("_c", "xmm")

    def __init__(self, c, slots: list):
        object.__setattr__(self, "_c", c)
        object.__setattr__(self, "xmm", slots)

    def __getattr__(self, name: str):
        return getattr(self._c, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._c, name, value)


HELPERS["LANE_CPU"] = LaneCpu
# The CPU's name in generated code (a whole word: `c.xmm[1]`, `HELPER(c, ...)`).
_CPU_NAME = re.compile(r"\bc\b")


def _legacy_mnemonic(m: int) -> int | None:
    name = _NAMES.get(m, "")
    return getattr(M, name[1:], None) if name.startswith("V") else None


_NAMES = {v: k for k, v in vars(M).items() if k.isupper()}


def _run_legacy(g: Gen, em, view: _View, keep_align: bool) -> None:
    """Runs the legacy emitter on the view and rewrites its lines to the
    slot list V (dropping its CR0/CR4 SSE test, and its alignment test
    where VEX allows any alignment)."""
    ins = g.ins
    mark = len(g.lines)
    g.ins = view
    g.written = lambda i: False     # its GPR/memory sources are only read
    try:
        em(g)
    finally:
        g.ins = ins
        del g.written
    out = []
    for line in g.lines[mark:]:
        if "SSE_TRAP(c)" in line or ("MISALIGNED(a)" in line and not keep_align):
            continue
        out.append(_CPU_NAME.sub("_cv", line))
    g.lines[mark:] = out


def legacy_form(g: Gen) -> None:
    """Emitter for the VEX.128/VEX.256 form of a legacy SSE instruction."""
    ins = g.ins
    vm = ins.mnemonic
    lm = _legacy_mnemonic(vm)
    em = LEGACY.get(lm)
    if em is None:
        raise Unsupported(f"VEX form {_NAMES.get(vm)}")
    n = ins.op_count
    nds = any(ins.op_code().op_kind(k) in _VVVV for k in range(n))
    idx = list(range(n))
    mask_op = None
    if vm in _BLENDV:
        mask_op = idx.pop()
    if nds:   # vvvv is the first source (or, for shift-by-immediate, the destination)
        init = 1
        idx = [0] + idx[2:]
    else:
        init = 0
    wide = any(is_vec(g, k) and vreg(g, k)[1] == 32 for k in range(n)) or (
        any(g.is_mem(k) for k in range(n)) and X.MemorySizeInfo(ins.memory_size).size == 32)
    check_avx(g)
    if not wide:
        _lane128(g, em, lm, idx, init, mask_op)
    else:
        _lane256(g, em, lm, idx, init, mask_op)


def _operands(g: Gen, idx: list, init: int, mask_op, value, mem_slot: bool) -> tuple[list, list]:
    """The view's operand list and the V slot initialisers; value(k) is the
    expression of VEX operand k in the current lane.  Memory operands stay
    memory (the legacy code loads them) unless mem_slot (preloaded)."""
    ops, vals = [], {0: value(mask_op) if mask_op is not None else "c.xmm[0]"}
    nxt = 2
    for pos, k in enumerate(idx):
        if (g.is_reg(k) and is_vec(g, k)) or (g.is_mem(k) and mem_slot):
            slot = 1 if pos == 0 else nxt
            nxt += pos > 0
            vals[slot] = value(init if pos == 0 and init else k)
            ops.append(("x", slot))
        elif g.is_reg(k):
            ops.append(("r", g.ins.op_register(k)))
        elif g.is_mem(k):
            ops.append(("m", None))
        else:
            ops.append(("i", k))
    return ops, vals


def _lane128(g: Gen, em, lm: int, idx: list, init: int, mask_op) -> None:
    ins = g.ins
    ops, vals = _operands(g, idx, init, mask_op, lambda k: f"c.xmm[{vreg(g, k)[0]}]", False)
    if init and (not ops or ops[0][0] != "x"):
        raise Unsupported("vvvv form with a non-XMM destination")
    g.emit(f"V = [{', '.join(vals.get(s, '0') for s in range(max(vals) + 1))}]; _cv = LANE_CPU(c, V)")
    _run_legacy(g, em, _View(ins, lm, ops), ins.mnemonic in ALIGNED)
    if ops and ops[0][0] == "x" and lm not in _READS_DEST:
        d = vreg(g, 0)[0]
        g.emit(f"c.xmm[{d}] = V[1]; c.ymmh[{d}] = 0")
    if ins.mnemonic in _WRITES_XMM0:
        g.emit("c.xmm[0] = V[0]; c.ymmh[0] = 0")


def _lane256(g: Gen, em, lm: int, idx: list, init: int, mask_op) -> None:
    ins = g.ins
    vm = ins.mnemonic
    if not is_vec(g, 0):
        raise Unsupported("VEX.256 form without a vector destination")
    mem, msize = "", 0
    for k in range(ins.op_count):
        if g.is_mem(k):
            msize = opsize(g, k)
            mem = vread(g, k)
    widen = _WIDEN.get(vm, 0)

    def lane_value(lane: int):
        def value(k: int) -> str:
            if g.is_mem(k):
                if msize == 32:
                    return f"({mem} & {M128:#x})" if lane == 0 else f"({mem} >> 128)"
                return f"({mem} >> {widen})" if lane and widen else mem
            n, w = vreg(g, k)
            if w == 32 and lane:
                return f"c.ymmh[{n}]"
            return f"(c.xmm[{n}] >> {widen})" if lane and widen and k != 0 else f"c.xmm[{n}]"
        return value

    for lane in (0, 1):
        ops, vals = _operands(g, idx, init, mask_op, lane_value(lane), True)
        g.emit(f"V = [{', '.join(vals.get(s, '0') for s in range(max(vals) + 1))}]; _cv = LANE_CPU(c, V)")
        _run_legacy(g, em, _View(ins, lm, ops, _HI_IMM.get(vm, 0) if lane else 0), vm in ALIGNED)
        g.emit(f"_l{lane} = V[1]")
    d = vreg(g, 0)[0]
    if vm in _NARROW:
        g.emit(f"c.xmm[{d}] = (_l0 & {M64:#x}) | (_l1 & {M64:#x}) << 64; c.ymmh[{d}] = 0")
    else:
        g.emit(f"c.xmm[{d}] = _l0; c.ymmh[{d}] = _l1")


def vex_forms() -> dict:
    """Emitters for every VEX mnemonic whose legacy twin has an emitter."""
    out = {}
    for m, name in _NAMES.items():
        if name.startswith("V") and getattr(M, name[1:], None) in LEGACY:
            out[m] = legacy_form
    return out


EMITTERS = vex_forms()
EXPORTS = dict(HELPERS)
