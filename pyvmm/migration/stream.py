"""The migration stream: a versioned sequence of checked records.

    header  8s magic "PYVMMIG\\0", u32 version
    record  u8 type, u32 payload length, u32 CRC-32 of the payload, payload

Record types, in the order a sender writes them:

    CONFIG  JSON: the source's VmConfig, RAM layout, vCPU count, device names
    PAGES   (many, interleaved passes) u32 run count, then per run u64 guest
            address, u32 page count, u8 kind (0: all zero, no bytes follow;
            1: the pages' bytes follow)
    BLOCKS  (block migration only, before STATE) drive contents: see blocks.py
    SYNC    empty, after each pass: the destination answers "SYNC\n" once it
            has loaded everything before it (the sender's bandwidth figure
            then counts the destination's work, and the final stop does not
            wait for a destination still catching up)
    STATE   JSON: {"cpus": [CpuState...], "devices": {name: save()}}
    END     empty

The destination answers "OK\n" after END, or "ERR reason\n" and hangs up.

Every length is bounded before anything is allocated, so a corrupt or
hostile stream costs at most MAX_RECORD bytes and gives a one-line
StreamError."""

from __future__ import annotations

import json
import struct
import zlib
from typing import BinaryIO, Iterator

from ..errors import VmmError

MAGIC = b"PYVMMIG\0"
VERSION = 1
HEADER = struct.Struct(">8sI")
RECORD = struct.Struct(">BII")
RUN = struct.Struct(">QIB")

CONFIG, PAGES, STATE, END, SYNC, BLOCKS = 1, 2, 3, 4, 5, 6
NAMES = {CONFIG: "config", PAGES: "pages", STATE: "state", END: "end", SYNC: "sync", BLOCKS: "blocks"}

PAGE = 4096
MAX_RUN_PAGES = 256                    # 1 MiB of page data per run
MAX_RUNS = 1024
MAX_JSON = 16 << 20                    # config and device state
MAX_PAGES_BYTES = 4 << 20             # page data in one PAGES record
ZERO, DATA = 0, 1


class StreamError(VmmError):
    """A migration stream that is not ours, corrupt, truncated or out of order."""


# -- writing ------------------------------------------------------------------------------
def header() -> bytes:
    return HEADER.pack(MAGIC, VERSION)


def record(kind: int, parts: list) -> list:
    """A record as buffers: its head, then `parts` (bytes or memoryviews)."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return [RECORD.pack(kind, sum(len(p) for p in parts), crc), *parts]


def json_record(kind: int, doc) -> list:
    return record(kind, [json.dumps(doc).encode()])


def pages_record(runs: list[tuple[int, int, object]]) -> list:
    """runs: (guest address, page count, None for zero pages or their bytes)."""
    head = [struct.pack(">I", len(runs))]
    data = []
    for gpa, count, payload in runs:
        head.append(RUN.pack(gpa, count, ZERO if payload is None else DATA))
        if payload is not None:
            data.append(payload)
    return record(PAGES, [b"".join(head), *data])


def end_record() -> list:
    return record(END, [])


def sync_record() -> list:
    return record(SYNC, [])


# -- reading ------------------------------------------------------------------------------
def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            raise StreamError(f"migration stream truncated ({what})")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_header(f: BinaryIO) -> None:
    magic, version = HEADER.unpack(_read_exact(f, HEADER.size, "header"))
    if magic != MAGIC:
        raise StreamError("not a pyvmm migration stream (bad magic)")
    if version != VERSION:
        raise StreamError(f"migration stream version {version} is not supported (this pyvmm reads {VERSION})")


def read_record(f: BinaryIO) -> tuple[int, bytes]:
    """One record's type and checked payload."""
    kind, length, crc = RECORD.unpack(_read_exact(f, RECORD.size, "record header"))
    if kind not in NAMES:
        raise StreamError(f"migration stream has an unknown record type {kind}")
    limit = MAX_JSON if kind in (CONFIG, STATE) else 4 + MAX_RUNS * RUN.size + MAX_PAGES_BYTES
    if kind in (END, SYNC):
        limit = 0
    elif kind == BLOCKS:
        limit = 4 + 1024 * 15 + MAX_PAGES_BYTES      # blocks.py: MAX_BLOCK_RUNS runs of 15 bytes, 4 MiB
    if length > limit:
        raise StreamError(f"migration stream {NAMES[kind]} record of {length} bytes is over its limit of {limit}")
    payload = _read_exact(f, length, NAMES[kind])
    if zlib.crc32(payload) != crc:
        raise StreamError(f"migration stream {NAMES[kind]} record is corrupt (checksum)")
    return kind, payload


def parse_json(kind: int, payload: bytes) -> dict:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise StreamError(f"migration stream {NAMES[kind]} record is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StreamError(f"migration stream {NAMES[kind]} record is not an object")
    return doc


def parse_pages(payload: bytes) -> Iterator[tuple[int, int, memoryview | None]]:
    """(guest address, page count, bytes or None for zero pages) of a PAGES
    record, every run checked for size (the caller checks the address)."""
    if len(payload) < 4:
        raise StreamError("migration stream pages record is truncated")
    (count,) = struct.unpack_from(">I", payload)
    if count > MAX_RUNS:
        raise StreamError(f"migration stream pages record has {count} runs (at most {MAX_RUNS})")
    pos = 4 + count * RUN.size
    if pos > len(payload):
        raise StreamError("migration stream pages record is truncated")
    view = memoryview(payload)
    runs = []
    for i in range(count):
        gpa, pages, kind = RUN.unpack_from(payload, 4 + i * RUN.size)
        if not 0 < pages <= MAX_RUN_PAGES or gpa % PAGE or kind not in (ZERO, DATA):
            raise StreamError(f"migration stream has a bad page run (0x{gpa:x}, {pages} pages, kind {kind})")
        if kind == DATA:
            n = pages * PAGE
            if pos + n > len(payload):
                raise StreamError("migration stream pages record is truncated")
            runs.append((gpa, pages, view[pos:pos + n]))
            pos += n
        else:
            runs.append((gpa, pages, None))
    if pos != len(payload):
        raise StreamError("migration stream pages record has trailing bytes")
    return iter(runs)
