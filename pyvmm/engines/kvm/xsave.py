"""XSAVE-family instructions completed against KVM's copy of the FPU state.

The x87/SSE/AVX registers of a KVM vCPU live in the kernel; KVM_GET_XSAVE
hands them out in the standard (non-compacted) XSAVE layout. XRSTOR moves
guest memory into that buffer, XSAVE moves it out, each honouring the
requested-feature bitmap RFBM = XCR0 & EDX:EAX and the compacted form."""

from __future__ import annotations

import struct
from dataclasses import dataclass

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
COMPACTED = 1 << 63
MXCSR_DEFAULT = 0x1F80
FCW_DEFAULT = 0x037F


@dataclass(frozen=True)
class Component:
    index: int
    offset: int  # in the standard form
    size: int
    align64: bool  # in the compacted form


def components_from_cpuid(entries) -> dict[int, Component]:
    """Components 2..62 from CPUID leaf 0xD sub-leaves (KVM's supported table)."""
    out = {}
    for e in entries:
        if e.function == 0xD and 2 <= e.index < 63 and e.eax:
            out[e.index] = Component(e.index, e.ebx, e.eax, bool(e.ecx & 2))
    return out


def compacted_offsets(comps: dict[int, Component], xcomp_bv: int) -> dict[int, int]:
    """Where each component sits in a compacted area with this XCOMP_BV."""
    offsets, at = {}, LEGACY_SIZE + HEADER_SIZE
    for i in sorted(comps):
        if xcomp_bv & (1 << i):
            if comps[i].align64:
                at = (at + 63) & ~63
            offsets[i] = at
            at += comps[i].size
    return offsets


def _init_legacy(buf: bytearray, x87: bool, sse: bool) -> None:
    if x87:
        buf[0:160] = bytes(160)
        struct.pack_into("<H", buf, 0, FCW_DEFAULT)
    if sse:
        buf[160:416] = bytes(256)


def xrstor(kvm_buf: bytearray, area: bytes, rfbm: int, comps: dict[int, Component]) -> bytearray:
    """The FPU state after XRSTOR/XRSTORS of `area` (standard or compacted
    form) into the state `kvm_buf` (KVM's standard layout). Returns a new buffer."""
    out = bytearray(kvm_buf)
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", area, HEADER_OFFSET)
    compacted = bool(xcomp_bv & COMPACTED)
    load = rfbm & xstate_bv
    # x87 (component 0) and SSE (component 1) live in the legacy region.
    if rfbm & 1:
        if load & 1:
            out[0:24] = area[0:24]
            out[32:160] = area[32:160]
        else:
            _init_legacy(out, True, False)
    if rfbm & 2:
        if load & 2:
            out[160:416] = area[160:416]
        else:
            _init_legacy(out, False, True)
    if rfbm & 6:  # MXCSR goes with SSE or AVX
        out[24:28] = area[24:28] if (not compacted or load & 6) else struct.pack("<I", MXCSR_DEFAULT)
    offsets = compacted_offsets(comps, xcomp_bv) if compacted else {i: c.offset for i, c in comps.items()}
    for i, c in comps.items():
        if not rfbm & (1 << i):
            continue
        dst = slice(c.offset, c.offset + c.size)
        if load & (1 << i) and i in offsets:
            out[dst] = area[offsets[i]:offsets[i] + c.size]
        else:
            out[dst] = bytes(c.size)
    kvm_bv = struct.unpack_from("<Q", out, HEADER_OFFSET)[0]
    struct.pack_into("<QQ", out, HEADER_OFFSET, (kvm_bv & ~rfbm) | load, 0)
    return out


def xsave(kvm_buf: bytes, area: bytes, rfbm: int, comps: dict[int, Component],
          compacted: bool) -> bytearray:
    """The memory image after XSAVE/XSAVEOPT (standard) or XSAVEC/XSAVES
    (compacted) of KVM's state into `area`. Returns the new area bytes."""
    out = bytearray(area)
    # x87 and SSE are always reported in use: XINUSE may be 1 for a component
    # in its initial state, and KVM_SET_FPU does not mark them in KVM's header.
    state_bv = struct.unpack_from("<Q", kvm_buf, HEADER_OFFSET)[0] | 3
    if rfbm & 1:
        out[0:24] = kvm_buf[0:24]
        out[32:160] = kvm_buf[32:160]
    if rfbm & 6:
        out[24:32] = kvm_buf[24:32]  # MXCSR and MXCSR_MASK
    if rfbm & 2:
        out[160:416] = kvm_buf[160:416]
    if compacted:
        xcomp = rfbm | COMPACTED
        offsets = compacted_offsets(comps, rfbm)
    else:
        xcomp = 0
        offsets = {i: c.offset for i, c in comps.items()}
    for i, c in comps.items():
        if rfbm & (1 << i) and i in offsets:
            end = offsets[i] + c.size
            if end > len(out):
                out.extend(bytes(end - len(out)))
            out[offsets[i]:end] = kvm_buf[c.offset:c.offset + c.size]
    old_bv = struct.unpack_from("<Q", out, HEADER_OFFSET)[0]
    new_bv = (state_bv & rfbm) | (0 if compacted else old_bv & ~rfbm)
    struct.pack_into("<QQ", out, HEADER_OFFSET, new_bv, xcomp)
    return out


def area_size(comps: dict[int, Component], rfbm: int, compacted: bool) -> int:
    """Bytes an XSAVE of `rfbm` touches."""
    if compacted:
        offsets = compacted_offsets(comps, rfbm)
        return max([LEGACY_SIZE + HEADER_SIZE] + [offsets[i] + comps[i].size for i in offsets])
    return max([LEGACY_SIZE + HEADER_SIZE] + [c.offset + c.size for i, c in comps.items() if rfbm & (1 << i)])
