"""Translated blocks kept on disk between runs: what .pyc files are to
Python modules, this is to guest code.

Booting the same kernel twice translates the same ~36k blocks twice, and
compile() is half of a fitted-kernel boot under bt.  A block's Python code
is a pure function of its guest bytes, its linear start and the CPU mode
(translator.generate), so the compiled code object can be stored under
that key and loaded back with marshal instead of being generated and
compiled again.  Rosetta 2 and Windows on Arm's XTA cache keep x86
translations on disk the same way.

Keys: linear start, mode (bits, stack bits, CPL), single-instruction flag
and a digest of the whole 4 KiB code page the decoder read.  A block whose
trace read into the next page also stores those bytes, compared on load.
Rows: an SQLite integer row id whose high 32 bits name the block's group
(its linear page and that page's digest) and whose low 32 bits come from
the key's digest, so a group's rows sit side by side in the table and the
first block wanted from a group fetches them all with one range query;
the whole key (compared on load) and the marshalled (next-page bytes or
None, crosses, module code object).

Size: the store is capped (PYVMM_BT_CACHE_MAX, default 1 GiB) and the
least recently used groups go first.  Last use is kept per group, not per
row, and written by the writer thread in batches, so a lookup never writes.
The file is never memory-mapped and never read whole at open: only the
small table of groups is, so a big store costs the process almost nothing
(a mapped store showed up as hundreds of MiB of RSS, all of the file that
had ever been read).

The store is one SQLite file per translator version (a digest of the bt
package's sources, Python's bytecode tag and iced-x86's version), so any
change to the translator starts an empty store; files of other versions
are removed once they are an hour old.  New rows go to SQLite from a
thread of their own, which also evicts.  Everything here is best effort:
an unreadable or locked store only costs speed, never correctness."""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import queue
import re
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path

from ...cachedir import pyvmm_cache
from ...errors import ConfigError

log = logging.getLogger(__name__)

# The cap when PYVMM_BT_CACHE_MAX is not set.  One boot of Debian's stock
# kernel to a shell under bt stores ~42k blocks, ~180 MiB (measured); at
# 256 MiB that kernel, the fitted one and the firmware did not fit together,
# and each boot of one evicted the other's blocks, to translate them again.
DEFAULT_MAX_BYTES = 1 << 30
MAX_ENV = "PYVMM_BT_CACHE_MAX"
_LOW_WATER = 0.75            # eviction frees down to this share of the cap, so it runs seldom
_BATCH = 256                 # new blocks written per transaction
_TOUCH_BATCH = 512           # group uses handed to the writer at a time
_STALE_S = 3600              # other versions' files older than this are removed
_JOURNAL_LIMIT = 8 << 20     # the WAL file is cut back to this after a checkpoint
_KEY = struct.Struct("<QBBBB")
_LOW = 0xFFFF_FFFF           # the in-group bits of a row id
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SHIFT = {"": 20, "k": 10, "m": 20, "g": 30, "t": 40}   # a bare number is MiB, as for --mem


def default_dir() -> Path:
    """$PYVMM_BT_CACHE when set (a directory), else ~/.cache/pyvmm/bt
    ($XDG_CACHE_HOME honoured)."""
    return pyvmm_cache("bt", "PYVMM_BT_CACHE")


def parse_size(text: str) -> int:
    """"256M", "1G", "512" (MiB) -> bytes.  Raises ConfigError for anything
    else or for less than 1 MiB."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"bad cache size {text!r} (e.g. 256M, 1G)")
    size = int(m.group(1)) << _SHIFT[m.group(2).lower()]
    if size < 1 << 20:
        raise ConfigError(f"cache size {text!r} is below 1 MiB")
    return size


def default_max_bytes() -> int:
    """$PYVMM_BT_CACHE_MAX as bytes, else DEFAULT_MAX_BYTES.  Raises
    ConfigError for a bad value."""
    text = os.environ.get(MAX_ENV, "")
    return parse_size(text) if text else DEFAULT_MAX_BYTES


def version_tag() -> str:
    """Changes whenever the generated code could: any bt source file, the
    bytecode format, the decoder."""
    import iced_x86
    h = hashlib.blake2b(digest_size=12)
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(sys.implementation.cache_tag.encode())
    h.update(str(marshal.version).encode())
    h.update(getattr(iced_x86, "__version__", "?").encode())
    return h.hexdigest()


def block_key(la: int, mode: tuple[int, int, int], single: bool, page: bytes) -> bytes:
    """The store key of the block at linear la decoded from code page `page`
    (it ends with the page's 16-byte digest)."""
    bits, sbits, cpl = mode
    return _KEY.pack(la, bits, sbits, cpl, single) + hashlib.blake2b(page, digest_size=16).digest()


def _row_id(key: bytes) -> int:
    """The key's row id: its group (linear page and page digest) in the high
    32 bits, so a group's rows are one id range; the key's digest below."""
    page = (int.from_bytes(key[:8], "little") >> 12).to_bytes(8, "little")
    group = hashlib.blake2b(page, digest_size=4, key=key[-16:]).digest()
    return int.from_bytes(group + hashlib.blake2b(key, digest_size=4).digest(), "big", signed=True)


def used_bytes(db: sqlite3.Connection) -> int:
    """Bytes of the store file holding data (free pages not counted)."""
    (pages,), = db.execute("PRAGMA page_count")
    (free,), = db.execute("PRAGMA freelist_count")
    (size,), = db.execute("PRAGMA page_size")
    return (pages - free) * size


def create_schema(db: sqlite3.Connection) -> None:
    """Tables of an empty or existing store.  auto_vacuum must be chosen
    before the first table, so freed pages can be given back to the file
    system after eviction."""
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")       # the writer thread and readers side by side
    db.execute("CREATE TABLE IF NOT EXISTS blocks (id INTEGER PRIMARY KEY, k BLOB, v BLOB)")
    # One row per group: last use (ns since the epoch) and bytes of its rows
    # (an estimate: duplicate inserts count too), what eviction orders by.
    db.execute("CREATE TABLE IF NOT EXISTS groups (grp INTEGER PRIMARY KEY, used INTEGER, bytes INTEGER)")


def evict(db: sqlite3.Connection, max_bytes: int) -> int:
    """Deletes least recently used groups until the store holds at most
    _LOW_WATER of max_bytes, when it holds more than max_bytes; gives the
    freed pages back to the file system.  Returns the rows deleted."""
    over = used_bytes(db)
    if over <= max_bytes:
        return 0
    target, deleted = int(max_bytes * _LOW_WATER), 0
    for _ in range(64):                         # each round re-measures; a bound, not an expectation
        need = over - target
        victims, freed = [], 0
        for grp, nbytes in db.execute("SELECT grp, bytes FROM groups ORDER BY used LIMIT 4096").fetchall():
            victims.append(grp)
            freed += nbytes
            if freed >= need:
                break
        db.execute("BEGIN IMMEDIATE")
        if victims:
            for grp in victims:
                deleted += db.execute("DELETE FROM blocks WHERE id BETWEEN ? AND ?",
                                      (grp << 32, (grp << 32) | _LOW)).rowcount
            db.executemany("DELETE FROM groups WHERE grp = ?", [(g,) for g in victims])
        else:                                   # rows no group accounts for: start afresh
            deleted += db.execute("DELETE FROM blocks").rowcount
        db.execute("COMMIT")
        db.executescript("PRAGMA incremental_vacuum")   # execute() steps it once: one page freed
        over = used_bytes(db)
        if over <= target or not victims:
            break
    log.info("bt block store: evicted %d blocks, %d MiB kept", deleted, over >> 20)
    return deleted


class _Writer(threading.Thread):
    """Writes batches of rows and group uses with its own connection, and
    evicts when the store is over its cap, so SQLite's work (which releases
    the GIL) overlaps the vCPU thread's and never holds it up."""

    def __init__(self, path: Path, max_bytes: int):
        super().__init__(name="bt-block-store", daemon=True)
        self.path = path
        self.max_bytes = max_bytes
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.written = 0
        self.evicted = 0

    def run(self) -> None:
        try:
            db = sqlite3.connect(str(self.path), timeout=2.0, isolation_level=None)
            db.execute("PRAGMA synchronous=OFF")
            db.execute("PRAGMA mmap_size=0")
            db.execute(f"PRAGMA journal_size_limit={_JOURNAL_LIMIT}")
            self._evict(db)                     # a store left over its cap (or a lowered cap)
        except sqlite3.Error as e:
            log.debug("bt block store: no writer: %s", e)
            db = None
        while True:
            item = self.queue.get()
            if item is None:
                break
            if db is not None:
                self._write(db, *item)
        if db is not None:
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            db.close()

    def _write(self, db: sqlite3.Connection, rows: list, uses: list) -> None:
        """rows: (id, k, v); uses: (group, ns) of groups read or written."""
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO blocks (id, k, v) VALUES (?, ?, ?)", rows)
            db.executemany("INSERT INTO groups (grp, used, bytes) VALUES (?, ?, ?) ON CONFLICT (grp) "
                           "DO UPDATE SET used = max(used, excluded.used), bytes = bytes + excluded.bytes",
                           [(rid >> 32, 0, len(k) + len(v)) for rid, k, v in rows]
                           + [(grp, ns, 0) for grp, ns in uses])
            db.execute("COMMIT")
            self.written += len(rows)
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.debug("bt block store: %d blocks not written: %s", len(rows), e)
            return
        if rows:
            self._evict(db)

    def _evict(self, db: sqlite3.Connection) -> None:
        try:
            self.evicted += evict(db, self.max_bytes)
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.debug("bt block store: eviction failed: %s", e)


class BlockStore:
    """One version's store file.  get/put never raise: a failing store turns
    itself off and logs why once.  Rows are written by a thread of their
    own (close() waits for it).  Only the groups present at open are read
    then, so a block of a group that is not there costs no query."""

    def __init__(self, directory: Path | str, tag: str | None = None, max_bytes: int | None = None):
        self.directory = Path(directory)
        self.tag = tag or version_tag()
        self.path = self.directory / f"blocks-{self.tag}.sqlite"
        self.hits = 0
        self.misses = 0
        self._groups: set[int] = set()        # groups in the store or put since
        self._loaded: dict[int, dict] = {}    # group -> its rows not handed out yet
        self._seen: set[int] = set()          # row ids handed out or put in this run
        self._pending: list[tuple[int, bytes, bytes]] = []
        self._uses: list[tuple[int, int]] = []  # (group, ns) not yet handed to the writer
        self._db: sqlite3.Connection | None = None
        self._writer: _Writer | None = None
        try:
            self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        except ConfigError as e:
            log.warning("bt block store: %s; using %d MiB", e, DEFAULT_MAX_BYTES >> 20)
            self.max_bytes = DEFAULT_MAX_BYTES
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self._db = sqlite3.connect(str(self.path), timeout=2.0, isolation_level=None)
            # Never mapped: every page read through a mapping stays in the
            # process's RSS for as long as the store is open.
            self._db.execute("PRAGMA mmap_size=0")
            create_schema(self._db)
            self._groups = {row[0] for row in self._db.execute("SELECT grp FROM groups")}
        except (OSError, sqlite3.Error) as e:
            self._disable(f"cannot open {self.path}: {e}")
            return
        self._writer = _Writer(self.path, self.max_bytes)
        self._writer.start()

    @property
    def enabled(self) -> bool:
        return self._db is not None

    @property
    def written(self) -> int:
        return self._writer.written if self._writer is not None else 0

    def get(self, key: bytes):
        """(next-page bytes or None, crosses, code object) or None."""
        rid = _row_id(key)
        grp = rid >> 32
        if self._db is None or grp not in self._groups:
            self.misses += 1
            return None
        try:
            rows = self._loaded.get(grp)
            if rows is None:        # the first block of a group: all its rows in one range query
                lo = grp << 32
                rows = self._loaded[grp] = {r[0]: (r[1], r[2]) for r in self._db.execute(
                    "SELECT id, k, v FROM blocks WHERE id BETWEEN ? AND ?", (lo, lo | _LOW))}
                self._used(grp)
            row = rows.pop(rid, None)
            if row is None and rid in self._seen:   # handed out before (its block was dropped since) or put
                row = self._db.execute("SELECT k, v FROM blocks WHERE id = ?", (rid,)).fetchone()
            if row is None or row[0] != key:
                self.misses += 1
                return None
            self._seen.add(rid)
            value = marshal.loads(row[1])
        except (sqlite3.Error, ValueError, EOFError, TypeError) as e:
            self._disable(f"cannot read {self.path}: {e}")
            return None
        self.hits += 1
        return value

    def put(self, key: bytes, ext: bytes | None, crosses: bool, code) -> None:
        if self._db is None:
            return
        rid = _row_id(key)
        self._seen.add(rid)
        if rid >> 32 not in self._groups:
            self._groups.add(rid >> 32)
            self._used(rid >> 32)
        self._pending.append((rid, key, marshal.dumps((ext, crosses, code))))
        if len(self._pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Hands the blocks put and the groups used since the last flush to
        the writer."""
        if self._writer is None or not (self._pending or self._uses):
            return
        batch, self._pending = self._pending, []
        uses, self._uses = self._uses, []
        self._writer.queue.put((batch, uses))

    def close(self) -> None:
        """Writes what is pending and waits (a while) for the writer."""
        self.flush()
        self._shut(wait=True)

    def stats(self) -> dict:
        return {"path": str(self.path), "hits": self.hits, "misses": self.misses, "written": self.written,
                "max_bytes": self.max_bytes,
                "evicted": self._writer.evicted if self._writer is not None else 0}

    def _used(self, grp: int) -> None:
        """Notes a group's use; the writer records it with the next batch."""
        self._uses.append((grp, time.time_ns()))
        if len(self._uses) >= _TOUCH_BATCH:
            self.flush()

    # -- housekeeping --------------------------------------------------------
    def _disable(self, why: str) -> None:
        log.warning("bt block store off: %s", why)
        self._pending = []
        self._uses = []
        self._shut(wait=False)

    def _shut(self, wait: bool) -> None:
        """Stops the writer (after what it holds, if `wait`) and closes the store."""
        if self._writer is not None:
            self._writer.queue.put(None)
            if wait:
                self._writer.join(timeout=60)
            else:
                self._writer = None
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _remove_stale(self) -> None:
        """Removes other versions' files an hour old, and younger ones too,
        oldest first, while the directory holds more than the cap: the cap
        is on the disk the store takes, whatever versions made it."""
        now = time.time()
        others = []
        for path in self.directory.glob("blocks-*.sqlite"):
            if path == self.path:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if now - mtime > _STALE_S:
                remove_store(path)
            else:
                others.append((mtime, path))
        total = sum(_size(p) for p in store_files(self.directory))
        for _, path in sorted(others):
            if total <= self.max_bytes:
                break
            total -= sum(_size(Path(f"{path}{s}")) for s in ("", "-wal", "-shm"))
            remove_store(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def store_files(directory: Path) -> list[Path]:
    """Every store file in `directory` (any version, with WAL and shm files)."""
    return sorted(directory.glob("blocks-*.sqlite*"))


def remove_store(path: Path) -> None:
    """Removes a store file with its WAL and shared-memory files."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
