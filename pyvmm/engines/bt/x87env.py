"""The x87 environment and save-area images: fnstenv/fldenv (14 or 28
bytes) and fnsave/frstor (94 or 108 bytes), SDM vol. 1, 8.1.10 and 8.1.11.

The 16-bit layouts (operand size 16) hold one word per field; the 32-bit
ones a dword whose upper word the CPU stores as 0xFFFF. Real and protected
mode differ only in how FIP/FDP/FCS/FDS/FOP are packed (stored as the
last non-control instruction left them, and loaded back). The
tag word stored is the full one, computed from the register contents as the
CPU does (valid, zero, special, empty); a load keeps only empty/not empty.

Helpers raise GuestFault (memory faults) before changing any state."""

from __future__ import annotations

import struct

from .fxsave import _probe
from .x87state import control_word, from80, to80

M64 = 0xFFFFFFFFFFFFFFFF
TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = 0, 1, 2, 3
_ENV32 = struct.Struct("<7I")
_ENV16 = struct.Struct("<7H")
RESERVED_HIGH = 0xFFFF0000


def physical80(f, p: int) -> int:
    """80-bit contents of physical register p whatever its tag."""
    r = f.raw[p]
    return r if r is not None else to80(f.regs[p])


def tag_of(b: int) -> int:
    """The 2-bit tag the CPU derives from an 80-bit value."""
    exp, mant = b >> 64 & 0x7FFF, b & M64
    if exp == 0x7FFF:
        return TAG_SPECIAL
    if exp == 0:
        return TAG_ZERO if mant == 0 else TAG_SPECIAL
    return TAG_VALID if mant >> 63 else TAG_SPECIAL   # unnormals are special


def full_tag_word(f) -> int:
    return sum((TAG_EMPTY if f.empty[p] else tag_of(physical80(f, p))) << (2 * p) for p in range(8))


def env_bytes(f, size: int, real: bool = False) -> bytes:
    """The 14- or 28-byte environment image (SDM Vol. 1, Figures 8-9 to
    8-12): protected mode stores FIP/FDP offsets with FCS/FDS (and FOP in
    the 32-bit form); real mode stores 20-bit linear pointers and FOP."""
    tw = full_tag_word(f)
    if real:
        ip, dp = (f.fcs << 4) + f.fip & 0xFFFFF, (f.fds << 4) + f.fdp & 0xFFFFF
        if size == 14:
            return _ENV16.pack(f.cw, f.status(), tw, ip & 0xFFFF, ip >> 16 << 12 | f.fop, dp & 0xFFFF,
                               dp >> 16 << 12)
        return _ENV32.pack(f.cw | RESERVED_HIGH, f.status() | RESERVED_HIGH, tw | RESERVED_HIGH,
                           ip & 0xFFFF | RESERVED_HIGH, ip >> 16 << 12 | f.fop, dp & 0xFFFF | RESERVED_HIGH,
                           dp >> 16 << 12)
    if size == 14:
        return _ENV16.pack(f.cw, f.status(), tw, f.fip & 0xFFFF, f.fcs, f.fdp & 0xFFFF, f.fds)
    return _ENV32.pack(f.cw | RESERVED_HIGH, f.status() | RESERVED_HIGH, tw | RESERVED_HIGH,
                       f.fip & 0xFFFFFFFF, f.fcs | f.fop << 16, f.fdp & 0xFFFFFFFF, f.fds | RESERVED_HIGH)


def load_env(f, data: bytes, real: bool = False) -> None:
    """FCW, FSW (with TOP), the empty bits of the tag word and the
    FIP/FCS/FOP/FDP/FDS pointers from an image (env_bytes' layouts)."""
    fmt = _ENV16 if len(data) == 14 else _ENV32
    cw, sw, tw, ip, cs_op, dp, ds = fmt.unpack(data)
    f.cw, f.sw, f.top = control_word(cw), sw & 0x477F, sw >> 11 & 7
    f.empty = [(tw >> (2 * p) & 3) == TAG_EMPTY for p in range(8)]
    if real:            # 20-bit linear pointers: kept as offsets from segment 0
        f.fip, f.fcs, f.fop = (ip & 0xFFFF) | (cs_op >> 12 & 0xF) << 16, 0, cs_op & 0x7FF
        f.fdp, f.fds = (dp & 0xFFFF) | (ds >> 12 & 0xF) << 16, 0
    elif fmt is _ENV16:
        f.fip, f.fcs, f.fdp, f.fds = ip, cs_op, dp, ds
    else:
        f.fip, f.fcs, f.fop, f.fdp, f.fds = ip, cs_op & 0xFFFF, cs_op >> 16 & 0x7FF, dp, ds & 0xFFFF


def _read(c, a: int, n: int) -> bytes:
    return b"".join(c.rd((a + i) & M64, 1).to_bytes(1, "little") for i in range(n))


def _write(c, a: int, data: bytes) -> None:
    _probe(c, a, len(data))
    i = 0
    while i + 4 <= len(data):
        c.wr((a + i) & M64, 4, int.from_bytes(data[i:i + 4], "little"))
        i += 4
    if i < len(data):
        c.wr((a + i) & M64, 2, int.from_bytes(data[i:i + 2], "little"))


def fnstenv(c, f, a: int, size: int) -> None:
    """Stores the environment, then masks all exceptions (as the CPU does)."""
    _write(c, a, env_bytes(f, size, not c.protected))
    f.cw |= 0x3F


def fldenv(c, f, a: int, size: int) -> None:
    load_env(f, _read(c, a, size), not c.protected)


def fnsave(c, f, a: int, size: int) -> None:
    """Environment, then ST(0)..ST(7) as 10-byte images; then fninit."""
    env = size - 80
    regs = b"".join(physical80(f, (f.top + i) & 7).to_bytes(10, "little") for i in range(8))
    _write(c, a, env_bytes(f, env, not c.protected) + regs)
    f.init()


def frstor(c, f, a: int, size: int) -> None:
    data = _read(c, a, size)
    env = size - 80
    load_env(f, data[:env], not c.protected)
    for i in range(8):
        b = int.from_bytes(data[env + 10 * i:env + 10 * i + 10], "little")
        p = (f.top + i) & 7
        f.regs[p], f.raw[p] = from80(b), b


EXPORTS = {"FNSTENV": fnstenv, "FLDENV": fldenv, "FNSAVE": fnsave, "FRSTOR": frstor}
