"""The XSAVE feature set of the bt engine (Intel SDM Vol. 1, chapter 13):
XSAVE, XSAVEOPT, XSAVEC, XRSTOR (standard and compacted forms), XGETBV
(XCR0 and, with ECX=1, XINUSE) and XSETBV.

Three state components: x87 (0) and SSE (1) in the 512-byte legacy region
(fxsave.py's layout) and AVX (2): bits 255:128 of YMM0-15, kept in
`c.ymmh`, 16 bytes each at offset 576 (the same offset in the compacted
form, since nothing lies between the header and component 2).  Outside
64-bit mode only XMM0-7/YMM0-7 are saved and restored.

XINUSE (the init tracking) is computed from the registers: a component is
"in use" unless it holds its initial values.  XSAVEOPT behaves as XSAVE
(skipping unmodified components is an optimisation software cannot rely on).

Every helper raises GuestFault: #UD when CR4.OSXSAVE is clear, #NM for
CR0.TS, #GP(0) for a misaligned area, a bad header, an illegal MXCSR, a
bad XCR0 or XSETBV outside CPL0; a page fault on the area changes nothing."""

from __future__ import annotations

import struct

import iced_x86 as X

from .faults import GP, NM, UD, GuestFault
from .fxsave import (
    MXCSR_MASK,
    ST_OFF,
    XMM_OFF,
    _bytes_in,
    _nregs,
    _probe,
    _store,
    load_pointers,
    x87_from_image,
)
from .gen import Gen
from .sysregs import check_xcr0
from .x87state import fpu_of, pointers_fxsave
from .xstate import AVX, AVX_OFF, AVX_SIZE, LEGACY_AND_HEADER, SSE, X87, area_size  # noqa: F401

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
CR0_TS, CR4_OSXSAVE = 8, 1 << 18
HEADER_OFF, HEADER_SIZE = 512, 64
COMPACTED = 1 << 63
MXCSR_INIT, FCW_INIT = 0x1F80, 0x37F
# x87 legacy image in its initial configuration: FCW 0x37F, all else 0 (tags empty).
X87_INIT_IMAGE = struct.pack("<H", FCW_INIT).ljust(160, b"\0")


def _x87_image(c, wide: bool = False) -> bytes:
    """The x87 part of the legacy region (wide: the REX.W form's 64-bit FIP/FDP)."""
    f = getattr(c, "fpu", None)
    if f is None:
        return X87_INIT_IMAGE
    out = bytearray(160)
    struct.pack_into("<HHBxHQQ", out, 0, f.cw, f.status(), f.tag_abridged(), *pointers_fxsave(f, wide))
    for i in range(8):
        out[ST_OFF + 16 * i:ST_OFF + 16 * i + 10] = f.image(i).to_bytes(10, "little")
    return bytes(out)


def xinuse(c) -> int:
    """The components not in their initial configuration (SDM 13.6)."""
    used = 0
    if _x87_image(c) != X87_INIT_IMAGE:
        used |= X87
    if c.mxcsr != MXCSR_INIT or any(c.xmm[:16]):
        used |= SSE
    if any(c.ymmh):
        used |= AVX
    return used & c.xcr0


def _xcheck(c, a: int) -> None:
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    if c.cr0 & CR0_TS:
        raise GuestFault(NM)
    if a & 63:
        raise GuestFault(GP, 0)


def _rfbm(c) -> int:
    return ((c.R[2] & 0xFFFFFFFF) << 32 | (c.R[0] & 0xFFFFFFFF)) & c.xcr0


def _save_components(c, a: int, which: int, mxcsr: bool, wide: bool) -> None:
    if which & X87:
        image = _x87_image(c, wide)
        _store(c, a, 0, image[:24])
        _store(c, a, ST_OFF, image[ST_OFF:160])
    if mxcsr:
        _store(c, a, 24, struct.pack("<II", c.mxcsr, MXCSR_MASK))
    n = _nregs(c)
    if which & SSE:
        _store(c, a, XMM_OFF, b"".join(c.xmm[i].to_bytes(16, "little") for i in range(n)))
    if which & AVX:
        _store(c, a, AVX_OFF, b"".join(c.ymmh[i].to_bytes(16, "little") for i in range(n)))


def xsave(c, a: int, wide: bool = False) -> None:
    """XSAVE/XSAVEOPT: every component in RFBM = EDX:EAX & XCR0, MXCSR when
    SSE or AVX is requested; XSTATE_BV[i] = XINUSE[i] for i in RFBM, the
    other bits and the rest of the header unchanged."""
    _xcheck(c, a)
    rfbm = _rfbm(c)
    _probe(c, a, area_size(rfbm))
    bv = c.rd((a + HEADER_OFF) & M64, 8)
    _save_components(c, a, rfbm, bool(rfbm & (SSE | AVX)), wide)
    c.wr((a + HEADER_OFF) & M64, 8, (bv & ~rfbm) | (xinuse(c) & rfbm))


def xsavec(c, a: int, wide: bool = False) -> None:
    """XSAVEC: the compacted form; only the components in use are written,
    XSTATE_BV = XINUSE & RFBM, XCOMP_BV = RFBM | bit 63."""
    _xcheck(c, a)
    rfbm = _rfbm(c)
    _probe(c, a, area_size(rfbm))
    used = xinuse(c) & rfbm
    _save_components(c, a, used, bool(used & SSE), wide)
    c.wr((a + HEADER_OFF) & M64, 8, used)
    c.wr((a + HEADER_OFF + 8) & M64, 8, COMPACTED | rfbm)


def _header_ok(c, bv: int, comp: int, rest: bytes) -> bool:
    if comp & COMPACTED:
        # Compacted form (SDM 13.8.1): XCOMP_BV within XCR0, XSTATE_BV within XCOMP_BV.
        return not (comp & ~COMPACTED & ~c.xcr0 or bv & ~comp & ~COMPACTED or any(rest))
    return not (bv & ~c.xcr0 or comp or any(rest[:8]))


def xrstor(c, a: int, wide: bool = False) -> None:
    """XRSTOR: for i in RFBM, component i is loaded when XSTATE_BV[i] is set
    and initialised when it is clear.  The standard form loads MXCSR when
    SSE or AVX is requested; the compacted form only with SSE's XSTATE_BV
    bit (else MXCSR = 0x1F80).  Raises #GP(0) for a bad header or MXCSR."""
    _xcheck(c, a)
    rfbm = _rfbm(c)
    data = _bytes_in(c, a, LEGACY_AND_HEADER)     # in order: a #PF reports the first byte missing
    bv, comp = struct.unpack_from("<QQ", data, HEADER_OFF)
    if not _header_ok(c, bv, comp, data[HEADER_OFF + 16:]):
        raise GuestFault(GP, 0)
    compacted = bool(comp & COMPACTED)
    load = rfbm & bv
    # A component missing from a compacted area's XCOMP_BV is never read.
    avx_in_area = (comp & AVX) if compacted else True
    if load & AVX and avx_in_area:
        data += _bytes_in(c, (a + AVX_OFF) & M64, AVX_SIZE)   # every fault before any change
    mxcsr = struct.unpack_from("<I", data, 24)[0]
    if compacted:
        mx = mxcsr if load & SSE else (MXCSR_INIT if rfbm & SSE else None)
    else:
        mx = mxcsr if rfbm & (SSE | AVX) else None
    if mx is not None and mx & ~MXCSR_MASK:
        raise GuestFault(GP, 0)
    n = _nregs(c)
    if rfbm & X87:
        image = data[:160] if load & X87 else X87_INIT_IMAGE
        x87_from_image(fpu_of(c), image)
        load_pointers(fpu_of(c), image, wide)
    if rfbm & SSE:
        for i in range(n):
            c.xmm[i] = int.from_bytes(data[XMM_OFF + 16 * i:XMM_OFF + 16 * i + 16], "little") if load & SSE else 0
    if rfbm & AVX:
        for i in range(n):
            c.ymmh[i] = (int.from_bytes(data[AVX_OFF + 16 * i:AVX_OFF + 16 * i + 16], "little")
                         if load & AVX and avx_in_area else 0)
    if mx is not None:
        c.mxcsr = mx


def xgetbv(c) -> int:
    """XGETBV: ECX=0 reads XCR0, ECX=1 XINUSE & XCR0 (when CPUID offers
    XGETBV1); any other index is #GP(0)."""
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    idx = c.R[1] & 0xFFFFFFFF
    if idx == 0:
        return c.xcr0
    if idx == 1 and _offers_xgetbv1(c):
        return xinuse(c)
    raise GuestFault(GP, 0)


def _offers_xgetbv1(c) -> bool:
    from .sysregs import _table
    return bool(_table(c).lookup(0xD, 1)[0] & 4)


def xsetbv(c) -> None:
    """XSETBV: CPL0 only, ECX=0 only, and a value check_xcr0 accepts."""
    if not c.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    if c.cpl > 0 or c.R[1] & 0xFFFFFFFF:
        raise GuestFault(GP, 0)
    v = (c.R[0] & 0xFFFFFFFF) | (c.R[2] & 0xFFFFFFFF) << 32
    check_xcr0(c, v)            # reserved, unsupported or inconsistent bits: #GP(0)
    c.xcr0 = v


EXPORTS = {"XSAVE": xsave, "XSAVEC": xsavec, "XRSTOR": xrstor, "XGETBV": xgetbv, "XSETBV": xsetbv}


def _area(g: Gen) -> None:
    m = g.ins.mnemonic
    g.addr()
    wide = m in (M.XSAVE64, M.XSAVEOPT64, M.XSAVEC64)      # REX.W: 64-bit FIP/FDP
    if m in (M.XSAVE, M.XSAVE64, M.XSAVEOPT, M.XSAVEOPT64):
        g.helper(f"XSAVE(c, a, {wide})")
    elif m in (M.XSAVEC, M.XSAVEC64):
        g.helper(f"XSAVEC(c, a, {wide})")
    else:
        g.helper(f"XRSTOR(c, a, {m == M.XRSTOR64})")


def _xcr(g: Gen) -> None:
    if g.ins.mnemonic == M.XGETBV:
        g.helper("t = XGETBV(c); R[0] = t & 0xFFFFFFFF; R[2] = t >> 32")
    else:
        g.helper("XSETBV(c)")


EMITTERS = {m: _area for m in (M.XSAVE, M.XSAVE64, M.XSAVEOPT, M.XSAVEOPT64, M.XSAVEC, M.XSAVEC64,
                                M.XRSTOR, M.XRSTOR64)}
EMITTERS.update({M.XGETBV: _xcr, M.XSETBV: _xcr})
