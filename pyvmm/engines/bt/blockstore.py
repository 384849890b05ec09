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
Rows: 8 bytes of the key's digest as SQLite's integer row id, the page
digest (the first block wanted from a page fetches all of that page's
rows in one query), the whole key (compared on load) and the marshalled
(next-page bytes or None, crosses, module code object).

The store is one SQLite file per translator version (a digest of the bt
package's sources, Python's bytecode tag and iced-x86's version), so any
change to the translator starts an empty store; files of other versions
are removed once they are an hour old.  New rows go to SQLite from a
thread of their own.  Everything here is best effort: an unreadable or
locked store only costs speed, never correctness."""

from __future__ import annotations

import hashlib
import logging
import marshal
import queue
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path

from ...cachedir import pyvmm_cache

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30          # a store past this size is started afresh
_BATCH = 256                 # new blocks written per transaction
_STALE_S = 3600              # other versions' files older than this are removed
_KEY = struct.Struct("<QBBBB")


def default_dir() -> Path:
    """$PYVMM_BT_CACHE when set (a directory), else ~/.cache/pyvmm/bt
    ($XDG_CACHE_HOME honoured)."""
    return pyvmm_cache("bt", "PYVMM_BT_CACHE")


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
    (it ends with the page's 16-byte digest, which BlockStore groups rows by)."""
    bits, sbits, cpl = mode
    return _KEY.pack(la, bits, sbits, cpl, single) + hashlib.blake2b(page, digest_size=16).digest()


def _row_id(key: bytes) -> int:
    """The key's row id: 8 bytes of its digest, signed as SQLite wants."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


class _Writer(threading.Thread):
    """Writes batches of rows with its own connection, so SQLite's work
    (which releases the GIL) overlaps the vCPU thread's."""

    def __init__(self, path: Path):
        super().__init__(name="bt-block-store", daemon=True)
        self.path = path
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.written = 0

    def run(self) -> None:
        try:
            db = sqlite3.connect(str(self.path), timeout=2.0, isolation_level=None)
            db.execute("PRAGMA synchronous=OFF")
        except sqlite3.Error as e:
            log.debug("bt block store: no writer: %s", e)
            db = None
        while True:
            batch = self.queue.get()
            if batch is None:
                break
            if db is None:
                continue
            try:
                db.execute("BEGIN")
                db.executemany("INSERT OR IGNORE INTO blocks (id, page, k, v) VALUES (?, ?, ?, ?)", batch)
                db.execute("COMMIT")
                self.written += len(batch)
            except sqlite3.Error as e:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                log.debug("bt block store: %d blocks not written: %s", len(batch), e)
        if db is not None:
            db.close()


class BlockStore:
    """One version's store file.  get/put never raise: a failing store turns
    itself off and logs why once.  Rows are written by a thread of their
    own (close() waits for it); the ids present when the store was opened
    are read at once, so a block that is not there costs no query."""

    def __init__(self, directory: Path | str, tag: str | None = None, max_bytes: int = MAX_BYTES):
        self.directory = Path(directory)
        self.tag = tag or version_tag()
        self.path = self.directory / f"blocks-{self.tag}.sqlite"
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._ids: set[int] = set()
        self._pending: list[tuple[int, bytes, bytes, bytes]] = []
        self._pages: dict[bytes, dict] = {}   # page digest -> rows of it not loaded yet
        self._db: sqlite3.Connection | None = None
        self._writer: _Writer | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            if self.path.exists() and self.path.stat().st_size > max_bytes:
                log.info("bt block store %s is over %d MiB; starting afresh", self.path, max_bytes >> 20)
                self._unlink(self.path)
            self._db = sqlite3.connect(str(self.path), timeout=2.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")       # the writer thread and readers side by side
            self._db.execute(f"PRAGMA mmap_size={max_bytes}")     # reads without a copy per page
            self._db.execute("CREATE TABLE IF NOT EXISTS blocks (id INTEGER PRIMARY KEY, page BLOB, k BLOB, v BLOB)")
            self._db.execute("CREATE INDEX IF NOT EXISTS blocks_by_page ON blocks (page)")
            self._ids = {row[0] for row in self._db.execute("SELECT id FROM blocks")}
        except (OSError, sqlite3.Error) as e:
            self._disable(f"cannot open {self.path}: {e}")
            return
        self._writer = _Writer(self.path)
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
        if self._db is None or rid not in self._ids:
            self.misses += 1
            return None
        try:
            page = key[-16:]
            rows = self._pages.get(page)
            if rows is None:        # the first block of a code page: its page's rows in one query
                rows = self._pages[page] = {r[0]: (r[1], r[2]) for r in self._db.execute(
                    "SELECT id, k, v FROM blocks WHERE page = ?", (page,))}
            row = rows.pop(rid, None)
            if row is None:         # loaded before (its block was dropped since) or written later
                row = self._db.execute("SELECT k, v FROM blocks WHERE id = ?", (rid,)).fetchone()
            if row is None or row[0] != key:
                self.misses += 1
                return None
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
        self._ids.add(rid)
        self._pending.append((rid, key[-16:], key, marshal.dumps((ext, crosses, code))))
        if len(self._pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Hands the blocks put since the last flush to the writer."""
        if self._writer is None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._writer.queue.put(batch)

    def close(self) -> None:
        """Writes what is pending and waits (a while) for the writer."""
        self.flush()
        self._shut(wait=True)

    def stats(self) -> dict:
        return {"path": str(self.path), "hits": self.hits, "misses": self.misses, "written": self.written}

    # -- housekeeping --------------------------------------------------------
    def _disable(self, why: str) -> None:
        log.warning("bt block store off: %s", why)
        self._pending = []
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
        now = time.time()
        for path in self.directory.glob("blocks-*.sqlite*"):
            if self.tag in path.name:
                continue
            try:
                if now - path.stat().st_mtime > _STALE_S:
                    self._unlink(path)
            except OSError:
                pass

    @staticmethod
    def _unlink(path: Path) -> None:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
