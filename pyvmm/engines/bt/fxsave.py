"""fxsave/fxrstor, and the legacy-region helpers the XSAVE family
(xsave.py) shares.

The 512-byte legacy area (Intel SDM Vol. 1, 10.5.1): FCW, FSW, abridged
FTW, FOP, FIP, FDP, MXCSR, MXCSR_MASK, ST0-7 (16-byte slots, 10 bytes used),
XMM0-15 (XMM0-7 outside 64-bit mode). FOP/FIP/FDP (with FCS/FDS in the
32-bit form) are the last non-control x87 instruction's (x87state.py);
reserved bytes are left untouched.

Helpers raise GuestFault: #NM (CR0.TS/EM), #GP(0) for a misaligned area
or reserved MXCSR bits."""

from __future__ import annotations

import struct

import iced_x86 as X

from .faults import GP, NM, GuestFault
from .gen import Gen
from .mmu import WRITE
from .x87state import from80, fpu_of, pointers_fxsave

M = X.Mnemonic
M64 = 0xFFFFFFFFFFFFFFFF
CR0_EM, CR0_TS = 4, 8
CR4_OSFXSR = 1 << 9
MXCSR_MASK = 0xFFFF
# Header: fcw, fsw, ftw, reserved, fop, fip(8), fdp(8), mxcsr, mxcsr_mask
LEGACY_HDR = struct.Struct("<HHBBHQQII")
ST_OFF, XMM_OFF = 32, 160


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
    """Touches the whole area for writing first, so a fault changes nothing
    (and CR2 is the first byte missing: each page from its first byte used)."""
    at, end = a, a + n
    while at < end:
        c.mmu.translate(at & M64, WRITE)
        at = (at | 0xFFF) + 1


def save_legacy(c, a: int, x87: bool = True, sse: bool = True, wide: bool = False) -> None:
    f = fpu_of(c)
    if x87:
        hdr = LEGACY_HDR.pack(f.cw, f.status(), f.tag_abridged(), 0, *pointers_fxsave(f, wide), 0, 0)
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


def load_pointers(f, data: bytes, wide: bool) -> None:
    """FOP, FIP and FDP (with FCS/FDS in the 32-bit form) from a legacy image."""
    fop, fip, fdp = struct.unpack_from("<HQQ", data, 6)
    f.fop = fop & 0x7FF
    if wide:
        f.fip, f.fdp, f.fcs, f.fds = fip, fdp, 0, 0
    else:
        f.fip, f.fcs = fip & 0xFFFFFFFF, fip >> 32 & 0xFFFF
        f.fdp, f.fds = fdp & 0xFFFFFFFF, fdp >> 32 & 0xFFFF


def load_legacy(c, a: int, x87: bool = True, sse: bool = True, wide: bool = False) -> None:
    data = _bytes_in(c, a, 512 if sse else 160)
    if sse:
        mxcsr = struct.unpack_from("<I", data, 24)[0]
        if mxcsr & ~MXCSR_MASK:
            raise GuestFault(GP, 0)
    if x87:
        x87_from_image(fpu_of(c), data)
        load_pointers(fpu_of(c), data, wide)
    if sse:
        c.mxcsr = mxcsr
        for i in range(_nregs(c)):
            c.xmm[i] = int.from_bytes(data[XMM_OFF + 16 * i:XMM_OFF + 16 * i + 16], "little")


def fxsave(c, a: int, wide: bool = False) -> None:
    """FXSAVE (wide: FXSAVE64, 64-bit FIP/FDP)."""
    _check(c)
    if a & 15:
        raise GuestFault(GP, 0)
    _probe(c, a, 512)
    save_legacy(c, a, True, bool(c.cr4 & CR4_OSFXSR), wide)


def fxrstor(c, a: int, wide: bool = False) -> None:
    """FXRSTOR (wide: FXRSTOR64, 64-bit FIP/FDP)."""
    _check(c)
    if a & 15:
        raise GuestFault(GP, 0)
    load_legacy(c, a, True, bool(c.cr4 & CR4_OSFXSR), wide)


EXPORTS = {"FXSAVE": fxsave, "FXRSTOR": fxrstor}


def _fx(g: Gen) -> None:
    m = g.ins.mnemonic
    g.addr()
    if m in (M.FXSAVE, M.FXSAVE64):
        g.helper(f"FXSAVE(c, a, {m == M.FXSAVE64})")
    else:
        g.helper(f"FXRSTOR(c, a, {m == M.FXRSTOR64})")


EMITTERS = {m: _fx for m in (M.FXSAVE, M.FXSAVE64, M.FXRSTOR, M.FXRSTOR64)}
