"""The bt vCPU's x87/SSE registers to and from a 512-byte FXSAVE image,
without guest memory: how CpuState.fxsave carries them between engines.

The layout is the one fxsave.py stores in guest memory (SDM vol. 1, 10.5.1).
Raises nothing; a short image is padded with zeros."""

from __future__ import annotations

import struct

from .fxsave import MXCSR_MASK, ST_OFF, XMM_OFF, x87_from_image
from .x87state import fpu_of

_HDR = struct.Struct("<HHB")
DEFAULT_FCW = 0x37F


def to_fxsave(c) -> bytes:
    """The vCPU's x87 stack, control/status/tag words, MXCSR and XMM0-15."""
    buf = bytearray(512)
    f = getattr(c, "fpu", None)
    if f is None:
        _HDR.pack_into(buf, 0, DEFAULT_FCW, 0, 0)
    else:
        _HDR.pack_into(buf, 0, f.cw, f.status(), f.tag_abridged())
        for i in range(8):
            buf[ST_OFF + 16 * i:ST_OFF + 16 * i + 10] = f.image(i).to_bytes(10, "little")
    struct.pack_into("<II", buf, 24, c.mxcsr, MXCSR_MASK)
    for i in range(16):
        buf[XMM_OFF + 16 * i:XMM_OFF + 16 * i + 16] = (c.xmm[i] & ((1 << 128) - 1)).to_bytes(16, "little")
    return bytes(buf)


def from_fxsave(c, image: bytes) -> None:
    """Loads an FXSAVE image into the vCPU (MXCSR reserved bits are dropped)."""
    data = bytes(image).ljust(512, b"\0")
    c.mxcsr = struct.unpack_from("<I", data, 24)[0] & MXCSR_MASK
    for i in range(16):
        c.xmm[i] = int.from_bytes(data[XMM_OFF + 16 * i:XMM_OFF + 16 * i + 16], "little")
    fcw, fsw, ftw = _HDR.unpack_from(data, 0)
    if getattr(c, "fpu", None) is None and fcw == DEFAULT_FCW and not fsw and not ftw:
        return   # x87 untouched: leave it to be created on first use
    x87_from_image(fpu_of(c), data)
