"""A small AML writer: the terms pyvmm's DSDT needs, as functions that
return encoded bytes, nested the way ASL nests them:

    scope("\\_GPE", method("_E01", 0, call("\\_SB_.PCI0.PCNT")))

Each function is one production of the AML grammar (ACPI 6.4, chapter 20);
operands are already-encoded terms (bytes), plain ints (encoded as the
shortest integer constant) or, where the grammar wants a name, strings.
Only what the DSDT uses is here: Scope, Device, Name, Method, method calls,
OperationRegion, Field, Notify, If, And, ShiftLeft, Store, Local0-7 and
Arg0-6.  Bad input (a name segment longer than four characters, a package
too long for PkgLength) raises ValueError.
"""

from __future__ import annotations

import struct

# Opcodes (ACPI 6.4, 20.3).
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E
NAME_OP, SCOPE_OP, METHOD_OP = 0x08, 0x10, 0x14
EXT_OP_PREFIX = 0x5B
OP_REGION_OP, FIELD_OP, DEVICE_OP = 0x80, 0x81, 0x82   # each after EXT_OP_PREFIX
LOCAL0_OP, ARG0_OP = 0x60, 0x68
STORE_OP, SHIFT_LEFT_OP, AND_OP, NOTIFY_OP, IF_OP = 0x70, 0x79, 0x7B, 0x86, 0xA0
NULL_NAME = 0x00               # "no target" in a Target position
ROOT_CHAR, PARENT_PREFIX = 0x5C, 0x5E
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x2E, 0x2F

# OperationRegion spaces and Field flags (ACPI 6.4, 19.6.100 and 19.6.48).
SYSTEM_MEMORY, SYSTEM_IO = 0x00, 0x01
ANY_ACC, BYTE_ACC, WORD_ACC, DWORD_ACC = 0, 1, 2, 3
NO_LOCK, LOCK = 0, 1 << 4
PRESERVE, WRITE_AS_ONES, WRITE_AS_ZEROS = 0 << 5, 1 << 5, 2 << 5

# Notify values (ACPI 6.4, 5.6.6).
DEVICE_CHECK = 1
EJECT_REQUEST = 3

Term = bytes | int


def _length_bytes(value: int, n: int) -> bytes:
    """`value` in PkgLength's n-byte form: one byte holds 6 bits; longer
    forms put the byte count in bits 6-7 and the low nibble in the lead
    byte, then whole bytes."""
    if n == 1:
        return bytes([value])
    return bytes([((n - 1) << 6) | (value & 0xF)]) + (value >> 4).to_bytes(n - 1, "little")


def _length_fits(value: int, n: int) -> bool:
    return value < (0x40 if n == 1 else 1 << (4 + 8 * (n - 1)))


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of `body_len` bytes: the encoded length counts
    its own bytes too."""
    for n in range(1, 5):
        if _length_fits(body_len + n, n):
            return _length_bytes(body_len + n, n)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def field_length(bits: int) -> bytes:
    """A field unit's bit count, in PkgLength's encoding but not counting itself."""
    for n in range(1, 5):
        if _length_fits(bits, n):
            return _length_bytes(bits, n)
    raise ValueError(f"AML field of {bits} bits is too long")


def integer(value: int) -> bytes:
    """The shortest integer constant for `value` (Zero, One, Byte..QWord)."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value:#x} does not fit in 64 bits")


def dword(value: int) -> bytes:
    """A DWordConst, whatever the value (iasl writes a register mask this way)."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def _term(value: Term) -> bytes:
    return integer(value) if isinstance(value, int) else value


def name_seg(seg: str) -> bytes:
    """A four-character NameSeg, padded with '_' ("S1" -> "S1__")."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") \
            or not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """"\\_SB_.PCI0.S08_" -> RootChar, MultiNamePrefix, 3, the segments;
    leading '^' go up a scope; one or two segments use the short forms."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    while path.startswith("^"):
        prefix, path = prefix + bytes([PARENT_PREFIX]), path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def local(n: int) -> bytes:
    return bytes([LOCAL0_OP + n])


def arg(n: int) -> bytes:
    return bytes([ARG0_OP + n])


def _with_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


# -- namespace -------------------------------------------------------------------
def scope(path: str, *terms: bytes) -> bytes:
    return _with_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _with_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def name(path: str, value: Term) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + _term(value)


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise ValueError(f"an AML method takes 0..7 arguments, not {args}")
    flags = args | (0x08 if serialized else 0)
    return _with_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def call(path: str, *args: Term) -> bytes:
    """A method invocation: the name followed by its arguments."""
    return name_string(path) + b"".join(_term(a) for a in args)


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    return (bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_string(path) + bytes([space])
            + integer(offset) + integer(length))


def field(region: str, flags: int, *units: tuple[str, int]) -> bytes:
    """Field(region, flags) { NAME, bits, ... }."""
    body = name_string(region) + bytes([flags])
    for unit, bits in units:
        body += name_seg(unit) + field_length(bits)
    return _with_length(bytes([EXT_OP_PREFIX, FIELD_OP]), body)


# -- statements and expressions ----------------------------------------------------
def store(source: Term, target: Term) -> bytes:
    return bytes([STORE_OP]) + _term(source) + _term(target)


def and_(a: Term, b: Term, target: bytes = bytes([NULL_NAME])) -> bytes:
    return bytes([AND_OP]) + _term(a) + _term(b) + target


def shift_left(a: Term, count: Term, target: bytes = bytes([NULL_NAME])) -> bytes:
    return bytes([SHIFT_LEFT_OP]) + _term(a) + _term(count) + target


def notify(path: str, value: Term) -> bytes:
    return bytes([NOTIFY_OP]) + name_string(path) + _term(value)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return _with_length(bytes([IF_OP]), predicate + b"".join(terms))


__all__ = [
    "BYTE_ACC",
    "DEVICE_CHECK",
    "DWORD_ACC",
    "EJECT_REQUEST",
    "NO_LOCK",
    "PRESERVE",
    "SYSTEM_IO",
    "WRITE_AS_ZEROS",
    "and_",
    "arg",
    "call",
    "device",
    "dword",
    "field",
    "field_length",
    "if_",
    "integer",
    "local",
    "method",
    "name",
    "name_seg",
    "name_string",
    "notify",
    "operation_region",
    "pkg_length",
    "scope",
    "shift_left",
    "store",
]
