"""The FT log: checked records on the logging channel.

    header   8s magic "PYVMMFT\\0", u32 version
    record   u8 type, u32 payload length, u32 CRC-32 of the payload, payload

Primary to backup:
    HELLO     JSON {"config": the guest's options, "wall_ns": the wall clock at guest
              time 0, "seed": the RDRAND/RDSEED stream's seed}
    EVENT     u64 icount, u64 ns, u8 kind, u8 name length, name, data: an input
              the primary applied at that guest position
    PROGRESS  u64 icount, u64 ns, u64 released, then u64 per held item stream:
              every input up to that position has been sent; `released` console
              bytes (and that many frames per NIC, in device order) have
              reached the outside
    END       u64 icount, u64 ns: the primary's guest stopped there
    SEED      (re-protection, instead of HELLO) JSON {"config", "wall_ns", "seed",
              "cpus": per vCPU what the migration state leaves out, "console": the
              console stream's offset}; a migration stream (migration/stream.py)
              of the live guest follows, then the log goes on from there
    REFUSE    (instead of SEED) UTF-8 text: why the live VM cannot seed a backup
Backup to primary:
    ACK       u64 icount, u64 ns, u64 executed icount: the log up to that
              PROGRESS is held by the backup, which has itself run that far

A position is (instructions retired by all vCPUs, guest ns); both only grow,
so positions compare as tuples.  Every length is bounded before it is read,
so a corrupt stream costs at most MAX_PAYLOAD bytes and one LogError."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from ..errors import VmmError

MAGIC = b"PYVMMFT\0"
VERSION = 2
HEADER = struct.Struct(">8sI")
RECORD = struct.Struct(">BII")
POS = struct.Struct(">QQ")
PROGRESS_BODY = struct.Struct(">QQQ")
ACK_BODY = struct.Struct(">QQQ")
COUNT = struct.Struct(">Q")
EVENT_HEAD = struct.Struct(">QQBB")

HELLO, EVENT, PROGRESS, END, ACK, SEED, REFUSE = 1, 2, 3, 4, 5, 6, 7
NAMES = {HELLO: "hello", EVENT: "event", PROGRESS: "progress", END: "end", ACK: "ack", SEED: "seed",
         REFUSE: "refuse"}
MAX_PAYLOAD = 1 << 20

SERIAL_RX = 1            # event kind: bytes arriving on a UART (name: its device)
NET_RX = 2               # a frame delivered to a virtio-net (name: its device)
BLK_DATA = 3             # a piece of a virtio-blk answer's data (BLK_DONE follows)
BLK_DONE = 4             # a virtio-blk request answered: u16 head, u8 status (data: the BLK_DATA pieces)
KINDS = {SERIAL_RX: "serial-rx", NET_RX: "net-rx", BLK_DATA: "blk-data", BLK_DONE: "blk-done"}
EVENT_ROOM = MAX_PAYLOAD - EVENT_HEAD.size - 255     # the most data one event carries


class LogError(VmmError):
    """An FT log that is not ours, corrupt, truncated or out of order."""


@dataclass(frozen=True)
class Event:
    pos: tuple[int, int]
    kind: int
    name: str
    data: bytes


# -- writing ------------------------------------------------------------------------------
def header() -> bytes:
    return HEADER.pack(MAGIC, VERSION)


def record(kind: int, payload: bytes) -> bytes:
    return RECORD.pack(kind, len(payload), zlib.crc32(payload)) + payload


def hello(config: dict, wall_ns: int, seed: int) -> bytes:
    return record(HELLO, json.dumps({"config": config, "wall_ns": wall_ns, "seed": seed}).encode())


def seed(doc: dict) -> bytes:
    return record(SEED, json.dumps(doc).encode())


def refuse(why: str) -> bytes:
    return record(REFUSE, why.encode()[:4000])


def event(ev: Event) -> bytes:
    name = ev.name.encode()
    return record(EVENT, EVENT_HEAD.pack(*ev.pos, ev.kind, len(name)) + name + ev.data)


def progress(pos: tuple[int, int], released: int, items: tuple[int, ...] = ()) -> bytes:
    return record(PROGRESS, PROGRESS_BODY.pack(*pos, released) + b"".join(COUNT.pack(n) for n in items))


def end(pos: tuple[int, int]) -> bytes:
    return record(END, POS.pack(*pos))


def ack(pos: tuple[int, int], executed: int) -> bytes:
    return record(ACK, ACK_BODY.pack(*pos, executed))


# -- reading ------------------------------------------------------------------------------
def read_exact(read: Callable[[int], bytes], n: int, what: str) -> bytes:
    """n bytes from `read` (a socket's recv or a file's read). Raises LogError at EOF."""
    chunks, got = [], 0
    while got < n:
        b = read(n - got)
        if not b:
            raise LogError(f"FT log truncated ({what})")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_header(read: Callable[[int], bytes]) -> None:
    magic, version = HEADER.unpack(read_exact(read, HEADER.size, "header"))
    if magic != MAGIC:
        raise LogError("not a pyvmm FT log (bad magic)")
    if version != VERSION:
        raise LogError(f"FT log version {version} is not supported (this pyvmm reads {VERSION})")


def read_record(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """One record's type and checked payload. Raises LogError."""
    kind, length, crc = RECORD.unpack(read_exact(read, RECORD.size, "record header"))
    if kind not in NAMES:
        raise LogError(f"FT log has an unknown record type {kind}")
    if length > MAX_PAYLOAD:
        raise LogError(f"FT log {NAMES[kind]} record of {length} bytes is over its limit of {MAX_PAYLOAD}")
    payload = read_exact(read, length, NAMES[kind])
    if zlib.crc32(payload) != crc:
        raise LogError(f"FT log {NAMES[kind]} record fails its CRC check")
    return kind, payload


def parse_hello(payload: bytes) -> tuple[dict, int, int]:
    try:
        doc = json.loads(payload)
        return doc["config"], int(doc["wall_ns"]), int(doc["seed"])
    except (ValueError, KeyError, TypeError):
        raise LogError("FT log hello record is not valid") from None


def parse_seed(payload: bytes) -> dict:
    """A SEED record's document, its fields checked for type. Raises LogError."""
    try:
        doc = json.loads(payload)
        ok = (isinstance(doc.get("config"), dict) and isinstance(doc.get("cpus"), list)
              and all(isinstance(doc[k], int) for k in ("wall_ns", "seed", "console"))
              and all(isinstance(c, dict) for c in doc["cpus"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise LogError("FT log seed record is not valid")
    return doc


def parse_event(payload: bytes) -> Event:
    if len(payload) < EVENT_HEAD.size:
        raise LogError("FT log event record is too short")
    icount, ns, kind, nlen = EVENT_HEAD.unpack_from(payload)
    if kind not in KINDS or len(payload) < EVENT_HEAD.size + nlen:
        raise LogError(f"FT log event of unknown kind {kind} or cut short")
    name = payload[EVENT_HEAD.size:EVENT_HEAD.size + nlen].decode(errors="replace")
    return Event((icount, ns), kind, name, payload[EVENT_HEAD.size + nlen:])


def _fixed(payload: bytes, st: struct.Struct, what: str) -> tuple:
    if len(payload) != st.size:
        raise LogError(f"FT log {what} record has {len(payload)} bytes, not {st.size}")
    return st.unpack(payload)


def parse_progress(payload: bytes) -> tuple[tuple[int, int], int]:
    icount, ns, released = _fixed(payload[:PROGRESS_BODY.size], PROGRESS_BODY, "progress")
    return (icount, ns), released


def parse_progress_items(payload: bytes) -> list[int]:
    """The released counts of the item streams after a PROGRESS's console count."""
    extra = payload[PROGRESS_BODY.size:]
    if len(extra) % COUNT.size:
        raise LogError(f"FT log progress record has {len(payload)} bytes")
    return [n for (n,) in COUNT.iter_unpack(extra)]


def parse_end(payload: bytes) -> tuple[int, int]:
    return _fixed(payload, POS, "end")


def parse_ack(payload: bytes) -> tuple[tuple[int, int], int]:
    icount, ns, executed = _fixed(payload, ACK_BODY, "ack")
    return (icount, ns), executed
