"""fxsave/fxrstor and a minimal xsave family (x87 + SSE components only,
XCR0 <= 3), xgetbv/xsetbv.

The 512-byte legacy area (Intel SDM Vol. 1, 10.5.1): FCW, FSW, abridged
FTW, FOP, FIP, FDP, MXCSR, MXCSR_MASK, ST0-7 (16-byte slots, 10 bytes used),
XMM0-15 (XMM0-7 outside 64-bit mode). FOP/FIP/FDP are saved as 0 (not
tracked); reserved bytes are left untouched. XCR0 lives in `c.xcr0`
(created on first use, reset value 1).

Helpers raise GuestFault: #NM (CR0.TS/EM), #GP(0) for a misaligned area,
reserved MXCSR bits or a bad XCR0, #UD when CR4.OSXSAVE is clear (xgetbv,
xsetbv, xsave*)."""

from __future__ import annotations

import struct

import iced_x86 as X

from .faults import GP, NM, UD, GuestFault
from .gen import Gen
from .mmu import WRITE
from .sysregs import check_xcr0
from .x87state import from80, fpu_of

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
CR0_EM, CR0_TS = 4, 8
CR4_OSFXSR, CR4_OSXSAVE = 1 << 9, 1 << 18
MXCSR_MASK = 0xFFFF
XCR0_SUPPORTED = 3
# Header: fcw, fsw, ftw, reserved, fop, fip(8), fdp(8), mxcsr, mxcsr_mask
LEGACY_HDR = struct.Struct("<HHBBHQQII")
ST_OFF, XMM_OFF, XSAVE_HDR = 32, 160, 512


def _check(c) -> None:
    if c.cr0 & (CR0_EM | CR0_TS):
        raise GuestFault(NM)


def _bytes_in(c, a: int, n: int) -> bytes:
    out = bytearray()
    for i in range(0, n, 8):
        out += c.rd((a + i) & M64, 8).to_bytes(8, "little")
    return bytes(out)


def _store(c, a: int, off: int, data: bytes) -> None:
    for i in range(0, len(data) - len(data) % 8, 8):
        c.wr((a + off + i) & M64, 8, int.from_bytes(data[i:i + 8], "little"))
    for i in range(len(data) - len(data) % 8, len(data), 2):
        c.wr((a + off + i) & M64, 2, int.from_bytes(data[i:i + 2], "little"))


def _nregs(c) -> int:
    return 16 if c.mode[0] == 64 else 8


def _probe(c, a: int, n: int) -> None:
    """Touches the whole area for writing first, so a fault changes nothing."""
    for off in range(0, n, 0x1000):
        c.mmu.translate((a + off) & M64, WRITE)
    c.mmu.translate((a + n - 1) & M64, WRITE)


def save_legacy(c, a: int, x87: bool = True, sse: bool = True) -> None:
    f = fpu_of(c)
    if x87:
        hdr = LEGACY_HDR.pack(f.cw, f.status(), f.tag_abridged(), 0, 0, 0, 0, 0, 0)
        _store(c, a, 0, hdr[:24])
        for i in range(8):
            _store(c, a, ST_OFF + 16 * i, f.image(i).to_bytes(10, "little"))
    if sse:
        _store(c, a, 24, struct.pack("<II", c.mxcsr, MXCSR_MASK))
        for i in range(_nregs(c)):
            _store(c, a, XMM_OFF + 16 * i, c.xmm[i].to_bytes(16, "little"))


def x87_from_image(f, data: bytes) -> None:
    """Loads FCW, FSW, the abridged tag word and ST0-7 from a legacy-area image."""
    fcw, fsw, ftw = struct.unpack_from("<HHB", data, 0)
    f.cw, f.sw, f.top = fcw, fsw & 0x477F, fsw >> 11 & 7   # ES and B are derived (status())
    f.set_tag_abridged(ftw)
    for i in range(8):
        raw = int.from_bytes(data[ST_OFF + 16 * i:ST_OFF + 16 * i + 10], "little")
        p = (f.top + i) & 7
        f.regs[p], f.raw[p] = from80(raw), raw


def load_legacy(c, a: int, x87: bool = True, sse: bool = True) -> None:
    data = _bytes_in(c, a, 512 if sse else 160)
    if sse:
        mxcsr = struct.unpack_from("<I", data, 24)[0]
        if mxcsr & ~MXCSR_MASK:
            raise GuestFault(GP, 0)
    if x87:
        x87_from_image(fpu_of(c), data)
    if sse:
        c.mxcsr = mxcsr
        for i in range(_nregs(c)):
            c.xmm[i] = int.from_bytes(data[XMM_OFF + 16 * i:XMM_OFF + 16 * i + 16], "little")


def fxsave(c, a: int) -> None:
    _check(c)
    if a & 15:
        raise GuestFault(GP, 0)
    _probe(c, a, 512)
    save_legacy(c, a, True, bool(c.cr4 & CR4_OSFXSR))


def fxrstor(c, a: int) -> None:
    _check(c)
    if a & 15:
        raise GuestFault(GP, 0)
    load_legacy(c, a, True, bool(c.cr4 & CR4_OSFXSR))


def _xcr0(c) -> int:
    return getattr(c, "xcr0", 1)


def _xcheck(c, a: int) -> None:
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    if c.cr0 & CR0_TS:
        raise GuestFault(NM)
    if a & 63:
        raise GuestFault(GP, 0)


def xsave(c, a: int, mask: int) -> None:
    """xsave/xsaveopt: components mask & XCR0; XSTATE_BV updated for them."""
    _xcheck(c, a)
    rfbm = mask & _xcr0(c)
    _probe(c, a, 576)
    save_legacy(c, a, bool(rfbm & 1), bool(rfbm & 2))
    bv = c.rd((a + XSAVE_HDR) & M64, 8)
    c.wr((a + XSAVE_HDR) & M64, 8, (bv & ~rfbm) | rfbm)


def xrstor(c, a: int, mask: int) -> None:
    """xrstor: components in mask & XCR0; those absent from XSTATE_BV are
    set to their initial state."""
    _xcheck(c, a)
    rfbm = mask & _xcr0(c)
    bv, comp = c.rd((a + XSAVE_HDR) & M64, 8), c.rd((a + XSAVE_HDR + 8) & M64, 8)
    if bv & ~_xcr0(c) or comp:
        raise GuestFault(GP, 0)
    if rfbm & 2 or rfbm & 1:
        mx = c.rd((a + 24) & M64, 4)
        if rfbm & 2 and mx & ~MXCSR_MASK:
            raise GuestFault(GP, 0)
    load_legacy(c, a, bool(rfbm & bv & 1), bool(rfbm & bv & 2))
    if rfbm & 1 and not bv & 1:
        fpu_of(c).init()
    if rfbm & 2 and not bv & 2:
        c.xmm[:] = [0] * 16
    if rfbm & 2:
        c.mxcsr = c.rd((a + 24) & M64, 4)


def xgetbv(c) -> int:
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    idx = c.R[1] & 0xFFFFFFFF
    if idx == 0:
        return _xcr0(c)
    if idx == 1:
        return _xcr0(c) & 3
    raise GuestFault(GP, 0)


def xsetbv(c) -> None:
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    v = (c.R[0] & 0xFFFFFFFF) | (c.R[2] & 0xFFFFFFFF) << 32
    if c.cpl > 0 or c.R[1] & 0xFFFFFFFF:
        raise GuestFault(GP, 0)
    check_xcr0(c, v)            # reserved, unsupported or inconsistent bits: #GP(0)
    c.xcr0 = v


EXPORTS = {"FXSAVE": fxsave, "FXRSTOR": fxrstor, "XSAVE": xsave, "XRSTOR": xrstor,
           "XGETBV": xgetbv, "XSETBV": xsetbv}

_MASK = "(R[0] & 0xFFFFFFFF) | (R[2] & 0xFFFFFFFF) << 32"


def _fx(g: Gen) -> None:
    m = g.ins.mnemonic
    g.addr()
    if m in (M.FXSAVE, M.FXSAVE64):
        g.helper("FXSAVE(c, a)")
    elif m in (M.FXRSTOR, M.FXRSTOR64):
        g.helper("FXRSTOR(c, a)")
    elif m in (M.XSAVE, M.XSAVE64, M.XSAVEOPT, M.XSAVEOPT64):
        g.helper(f"XSAVE(c, a, {_MASK})")
    else:
        g.helper(f"XRSTOR(c, a, {_MASK})")


def _xcr(g: Gen) -> None:
    if g.ins.mnemonic == M.XGETBV:
        g.helper("t = XGETBV(c); R[0] = t & 0xFFFFFFFF; R[2] = t >> 32")
    else:
        g.helper("XSETBV(c)")


EMITTERS = {m: _fx for m in (M.FXSAVE, M.FXSAVE64, M.FXRSTOR, M.FXRSTOR64, M.XSAVE, M.XSAVE64,
                              M.XSAVEOPT, M.XSAVEOPT64, M.XRSTOR, M.XRSTOR64)}
EMITTERS.update({M.XGETBV: _xcr, M.XSETBV: _xcr})
