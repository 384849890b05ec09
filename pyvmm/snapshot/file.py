"""Snapshot files: the whole VM in one file, full or diff, restored with
guest RAM mapped lazily from the file (lazymap.py), so a restore costs
the same for 512 MiB as for 2 GiB.

Format version 2 (vmstate.py's framing: header, then sections of 4s name,
u64 length, u32 CRC-32, payload; integers big-endian):

    META  JSON: vmstate.py's fields, plus kind "full"|"diff", id (hex),
          for a diff parent {"path": absolute path, "id": its id}, and
          disks: the writable drives as saved (filedisks.py; absent in
          files saved before it, which restore with the disks as they are)
    CPUS  JSON: one CpuState per vCPU
    DEVS  JSON: {device name: its save() envelope}
    PLAT  JSON: the interrupt platform in engine-neutral terms, or null, so
          that a file loads across the hw line (crossengine.py)
    RAMT  u32 run count, then per run u64 guest address, u64 length,
          u64 file offset of its bytes (page-aligned, inside RAMD)
    RAMD  zero padding up to a page boundary of the file, then the runs'
          bytes back to back (every run is whole pages)

A full file holds every 64 KiB piece of RAM that is not zero; RAM outside
its runs is zero. A diff holds the pages written since the snapshot its
parent names was saved or loaded, and RAM outside its runs is its
parent's; a chain of diffs ends at a full file.

Which pages were written comes from the host kernel, not a dirty log: after
every save and load guest RAM is a private mapping of the files just
written or read, and a page that anything wrote since (a vCPU under any
engine, a device) is one the kernel copied on write (lazymap.written_pages).
So diffs cost nothing while the guest runs and leave the dirty log to
migrations.

Every section's checksum is checked on load except RAMD's: checking it
would read all of RAM, which a lazy restore exists to avoid (Firecracker
does not check its memory file either). load_file(verify=True) and
`check_file` read it. A file that is truncated, corrupt, of another
version, whose parent changed, or whose machine differs is refused with a
one-line error before the machine is touched."""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import hotplugged
from ..device import DeviceStateError
from . import crossengine, filedisks, lazymap, vmstate
from .vmstate import HEADER, MAGIC, SECTION, VmStateError

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

FILE_VERSION = 2
PAGE = lazymap.PAGE
RUN = struct.Struct(">QQQ")
MAX_CHAIN = 64
SMALL_SECTIONS = (b"META", b"CPUS", b"DEVS", b"RAMT")


@dataclass
class SnapshotFile:
    """One file's checked header: its META, vCPU/device JSON and RAM runs."""
    path: str
    meta: dict
    sections: dict[bytes, bytes]
    runs: list[tuple[int, int, int]]         # (gpa, length, file offset)
    ramd: tuple[int, int, int]               # (payload offset, length, CRC)

    @property
    def id(self) -> str:
        return str(self.meta.get("id", ""))

    @property
    def parent(self) -> dict | None:
        return self.meta.get("parent")


# -- reading -------------------------------------------------------------------------------
def read_header(path: str, verify: bool = False) -> SnapshotFile:
    """Reads and checks everything but the RAM pages (and those too with
    verify). Raises VmStateError with the path in the message."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read(f, path, size, verify)
    except OSError as e:
        raise VmStateError(f"{path}: {e.strerror or e}") from None


def _read(f, path: str, size: int, verify: bool) -> SnapshotFile:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise VmStateError(f"{path}: truncated (no header)")
    magic, version, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise VmStateError(f"{path}: not a pyvmm snapshot file")
    if version != FILE_VERSION:
        raise VmStateError(f"{path}: snapshot format version {version} is not supported "
                           f"(this pyvmm reads version {FILE_VERSION})")
    sections: dict[bytes, bytes] = {}
    ramd = None
    for _ in range(count):
        raw = f.read(SECTION.size)
        if len(raw) < SECTION.size:
            raise VmStateError(f"{path}: truncated (section header)")
        name, length, crc = SECTION.unpack(raw)
        label = name.decode(errors="replace").strip()
        where = f.tell()
        if where + length > size:
            raise VmStateError(f"{path}: truncated (section {label})")
        if name == b"RAMD":
            ramd = (where, length, crc)
            if verify and _crc_of(f, where, length) != crc:
                raise VmStateError(f"{path}: section RAMD is corrupt (checksum)")
            f.seek(where + length)
            continue
        payload = f.read(length)
        if zlib.crc32(payload) != crc:
            raise VmStateError(f"{path}: section {label} is corrupt (checksum)")
        sections[name] = payload
    for need in SMALL_SECTIONS:
        if need not in sections:
            raise VmStateError(f"{path}: section {need.decode().strip()} is missing")
    if ramd is None:
        raise VmStateError(f"{path}: section RAMD is missing")
    try:
        meta = json.loads(sections[b"META"])
    except ValueError as e:
        raise VmStateError(f"{path}: the META section is malformed ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in ("full", "diff"):
        raise VmStateError(f"{path}: the META section is malformed (no kind)")
    return SnapshotFile(path, meta, sections, _runs(path, sections[b"RAMT"], ramd), ramd)


def _crc_of(f, start: int, length: int) -> int:
    f.seek(start)
    crc, left = 0, length
    while left:
        chunk = f.read(min(left, 8 << 20))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def _runs(path: str, table: bytes, ramd: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    start, length, _ = ramd
    try:
        (count,) = struct.unpack_from(">I", table)
        if len(table) != 4 + count * RUN.size:
            raise VmStateError(f"{path}: the RAMT section has the wrong length")
        runs = [RUN.unpack_from(table, 4 + i * RUN.size) for i in range(count)]
    except struct.error:
        raise VmStateError(f"{path}: the RAMT section is truncated") from None
    for gpa, n, off in runs:
        if gpa % PAGE or n % PAGE or off % PAGE or not n or off < start or off + n > start + length:
            raise VmStateError(f"{path}: RAM run 0x{gpa:x}+0x{n:x} at 0x{off:x} is misplaced")
    return runs


def chain_of(path: str, verify: bool = False) -> list[SnapshotFile]:
    """The files a restore of `path` maps, full file first. Raises
    VmStateError for a missing or changed parent, or a loop."""
    chain = [read_header(path, verify)]
    while chain[-1].meta["kind"] == "diff":
        parent = chain[-1].parent
        if not isinstance(parent, dict) or not isinstance(parent.get("path"), str):
            raise VmStateError(f"{chain[-1].path}: a diff snapshot without its parent")
        if len(chain) >= MAX_CHAIN:
            raise VmStateError(f"{path}: a chain of more than {MAX_CHAIN} snapshots")
        try:
            up = read_header(parent["path"], verify)
        except VmStateError as e:
            raise VmStateError(f"{chain[-1].path}: its parent: {e}") from None
        if up.id != parent.get("id"):
            raise VmStateError(f"{chain[-1].path}: its parent {parent['path']} was replaced by another snapshot")
        chain.append(up)
    chain.reverse()
    return chain


def check_file(path: str) -> list[SnapshotFile]:
    """chain_of with every checksum read, RAM pages included."""
    return chain_of(path, verify=True)


# -- writing ---------------------------------------------------------------------------------
def _chunk_runs(machine: "Machine") -> list[tuple[int, int, object, int]]:
    """(gpa, length, region, offset in region) of the RAM a full file holds."""
    out = []
    for r in machine.memory.regions:
        out += [(gpa, n, r, gpa - r.gpa) for gpa, n in vmstate._ram_runs(r.mm, r.gpa, r.size)]
    return out


def _written_runs(machine: "Machine") -> list[tuple[int, int, object, int]]:
    """The pages written since RAM was mapped from the last file saved or
    loaded, as runs."""
    out = []
    for r in machine.memory.regions:
        out += [(r.gpa + off, n, r, off) for off, n in lazymap.written_pages(r.host_address(), r.size)]
    return out


def save_file(machine: "Machine", path: str, diff: bool = False) -> dict:
    """Writes the stopped machine to `path` (a temporary file renamed into
    place, so a failed save leaves no file). diff: only the pages written
    since the last save or load of a file, whose path it names as parent.
    Returns {"size", "runs", "kind"}. Raises VmStateError."""
    parent = getattr(machine, "snapshot_parent", None)
    if diff and parent is None:
        raise VmStateError("a diff snapshot needs a full one saved or loaded before it")
    path = os.path.abspath(path)
    if diff and path == parent["path"]:
        raise VmStateError("a diff snapshot cannot replace its own parent")
    with machine.lock:
        cpus = [vmstate.cpu_to_json(machine.engine.save_state(i)) for i in range(machine.config.cpus)]
        devices = {name: dev.save() for name, dev in machine.devices.items()}
        runs = _written_runs(machine) if diff else _chunk_runs(machine)
        meta = {**vmstate._meta(machine), "kind": "diff" if diff else "full", "id": uuid.uuid4().hex,
                "parent": parent if diff else None, "saved": time.time()}
        meta["disks"] = filedisks.capture(machine, meta["id"])     # memory and disks agree on restore
        small = [(b"META", json.dumps(meta).encode()), (b"CPUS", json.dumps(cpus).encode()),
                 (b"DEVS", json.dumps(devices).encode()),
                 (b"PLAT", json.dumps(crossengine.take(machine)).encode())]
        pos = HEADER.size + sum(SECTION.size + len(p) for _, p in small)
        table_len = 4 + len(runs) * RUN.size
        data_start = pos + SECTION.size + table_len + SECTION.size
        pad = -data_start % PAGE
        offset, table = data_start + pad, [struct.pack(">I", len(runs))]
        for gpa, n, _, _ in runs:
            table.append(RUN.pack(gpa, n, offset))
            offset += n
        small.append((b"RAMT", b"".join(table)))
        views = [memoryview(r.mm)[off:off + n] for _, n, r, off in runs]
        crc = zlib.crc32(bytes(pad))
        for v in views:
            crc = zlib.crc32(v, crc)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, FILE_VERSION, len(small) + 1))
                for name, payload in small:
                    f.write(SECTION.pack(name, len(payload), zlib.crc32(payload)))
                    f.write(payload)
                f.write(SECTION.pack(b"RAMD", pad + sum(len(v) for v in views), crc))
                f.write(bytes(pad))
                for v in views:
                    f.write(v)
                size = f.tell()
            os.replace(tmp, path)
        except OSError as e:
            _unlink(tmp)
            filedisks.forget(machine, meta["disks"])
            raise VmStateError(f"{path}: cannot write the snapshot: {e.strerror or e}") from None
        finally:
            for v in views:
                v.release()
        # RAM becomes a mapping of what was just written (same bytes), so
        # that the next diff finds the pages written after this point.
        _remap_saved(machine, path, _table_runs(small[-1][1]))
        machine.snapshot_parent = {"path": path, "id": meta["id"]}
    log.info("saved %s snapshot %s: %d bytes, %d RAM run(s)", meta["kind"], path, size, len(runs))
    return {"size": size, "runs": len(runs), "kind": meta["kind"]}


def _table_runs(table: bytes) -> list[tuple[int, int, int]]:
    (count,) = struct.unpack_from(">I", table)
    return [RUN.unpack_from(table, 4 + i * RUN.size) for i in range(count)]


def _remap_saved(machine: "Machine", path: str, runs: list[tuple[int, int, int]]) -> None:
    """Maps the runs of the file just written over the RAM they came from:
    the same bytes, so translated code stays, and a failure half-way
    leaves RAM as it was. (RAM outside the runs is left alone: zero pages
    the guest wrote before stay counted as written, so the next diff
    carries them once more.) Raises VmStateError."""
    bases = [(r, r.host_address()) for r in machine.memory.regions]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise VmStateError(f"{path}: {e.strerror or e}") from None
    try:
        _map_runs(bases, runs, fd)
    except lazymap.LazyMapError as e:
        raise VmStateError(f"{path}: saved, but {e}") from None
    finally:
        os.close(fd)


def _map_runs(bases, runs: list[tuple[int, int, int]], fd: int) -> None:
    for gpa, n, off in runs:
        r, base = next((r, base) for r, base in bases if r.gpa <= gpa and gpa + n <= r.end)
        lazymap.map_file(base + gpa - r.gpa, n, fd, off)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- loading ----------------------------------------------------------------------------------
def load_file(machine: "Machine", path: str, verify: bool = False) -> float:
    """Gives the stopped machine the state of snapshot file `path` (and of
    its parents, for a diff), its RAM mapped from the files. Returns the
    seconds it took. Raises VmStateError with the machine untouched when a
    file is bad or does not fit; a device that refuses its state
    afterwards raises VmStateError too."""
    t0 = time.perf_counter()
    chain = chain_of(path, verify)
    last = chain[-1]
    for f in chain:
        if f.meta.get("ram") != last.meta.get("ram"):
            raise VmStateError(f"{f.path}: its RAM layout differs from {last.path}'s")
    sections, platform = crossengine.adapt(machine, last.sections)
    cpus, devices = vmstate.check_sections(machine, sections)
    replug = vmstate.to_replug(machine, sections)
    disks = last.meta.get("disks", [])
    for f in chain:
        for gpa, n, _ in f.runs:
            if not machine.memory.is_ram(gpa, n):
                raise VmStateError(f"{f.path}: RAM run 0x{gpa:x}+0x{n:x} is outside this machine's RAM")
    fds: list[int] = []
    spares: list[tuple[int | None, int]] = []
    try:
        for f in chain:
            fds.append(os.open(f.path, os.O_RDONLY | os.O_CLOEXEC))
        with machine.lock:
            plugged = vmstate.replug_or_refuse(machine, replug)   # device_add's devices, into their slots
            try:
                to_revert = filedisks.check(machine, disks, path)  # replugged drives included
                spares += _map_ram(machine, chain, fds)
            except BaseException:
                for ident in plugged:
                    hotplugged.unplug(machine, ident)
                raise
            try:
                vmstate.restore_devices_and_cpus(machine, devices, cpus)
            except DeviceStateError as e:
                raise VmStateError(f"{path}: {e}") from None
            filedisks.revert(to_revert, path)
            if platform is not None:                # saved under an engine on the other side of hw
                crossengine.give(machine, platform)
            machine.snapshot_parent = {"path": os.path.abspath(last.path), "id": last.id}
    except OSError as e:
        _free(spares)
        raise VmStateError(f"{path}: {e.strerror or e}") from None
    except BaseException:
        _free(spares)
        raise
    finally:
        for fd in fds:
            os.close(fd)                            # the mappings keep the files
    took = time.perf_counter() - t0
    _free(spares)                                   # the old RAM goes once the new is in place
    log.info("restored %s (%d file(s)) in %.1f ms", path, len(chain), took * 1e3)
    return took


def _free(spares: list[tuple[int | None, int]]) -> None:
    for spare, length in spares:
        lazymap.free_later(spare, length)
    spares.clear()


def _map_ram(machine: "Machine", chain: list[SnapshotFile], fds: list[int]) -> list[tuple[int | None, int]]:
    """Maps the chain's RAM; returns the old RAM's ranges, set aside, to free."""
    memory = machine.memory
    bases = [(r, r.host_address()) for r in memory.regions]
    spares = [(lazymap.set_aside(base, r.size), r.size) for r, base in bases]
    for f, fd in zip(chain, fds):
        _map_runs(bases, f.runs, fd)
    if memory.dirty is not None:
        for r in memory.regions:                    # a dirty log (a migration's) sees it all change
            memory.mark_dirty(r.gpa, r.size)
    _drop_translations(machine)
    return spares


def _drop_translations(machine: "Machine") -> None:
    """Translated code of the old RAM goes (a flush per vCPU is cheaper than
    the write listeners' page-by-page walk over all of RAM), and so does
    what the engines cached from the page tables."""
    engine = machine.engine
    bt = getattr(engine, "bt", engine)
    flushed = False
    for cpu in getattr(bt, "cpus", None) or []:
        translator = getattr(cpu, "translator", None)
        if translator is not None:
            translator.flush()
            flushed = True
    if not flushed:
        for r in machine.memory.regions:
            for fn in machine.memory.write_listeners:
                fn(r.gpa, r.size)
    vmstate._forget_translations(engine)
