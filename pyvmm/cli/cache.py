"""`pyvmm cache`: shows or empties the bt translated-block store
(engines/bt/blockstore.py).

    pyvmm cache [show] [--json]   location, size on disk, rows, cap
    pyvmm cache clear             removes every store file (all versions)"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

from ..engines.bt import blockstore
from ..errors import ConfigError


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the bt translated-block store",
                       description="Show (the default) or clear the store of translated blocks that bt keeps "
                                   "between runs. Its cap is $PYVMM_BT_CACHE_MAX (default 1G); the least "
                                   "recently used blocks are evicted past it.")
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show")
    p.add_argument("--json", action="store_true", help="show: print JSON")
    p.add_argument("--bt-cache", metavar="DIR", help="the store's directory (default: $PYVMM_BT_CACHE, "
                                                     "else ~/.cache/pyvmm/bt)")


def describe(directory: Path) -> dict:
    """What `cache show` prints: location, bytes on disk, rows, cap, and
    each store file (rows None where a file cannot be read).  Raises
    ConfigError for a bad $PYVMM_BT_CACHE_MAX."""
    current = f"blocks-{blockstore.version_tag()}.sqlite"
    files = []
    for path in blockstore.store_files(directory) if directory.is_dir() else []:
        entry = {"path": str(path), "bytes": _size(path), "current": path.name.startswith(current)}
        if path.name.endswith(".sqlite"):
            entry["rows"] = _rows(path)
        files.append(entry)
    return {"location": str(directory),
            "bytes": sum(f["bytes"] for f in files),
            "rows": sum(f.get("rows") or 0 for f in files),
            "max_bytes": blockstore.default_max_bytes(),
            "files": files}


def clear(directory: Path) -> int:
    """Removes every store file in `directory`; returns the bytes freed."""
    freed = 0
    for path in blockstore.store_files(directory) if directory.is_dir() else []:
        if path.name.endswith(".sqlite"):
            freed += sum(_size(Path(f"{path}{s}")) for s in ("", "-wal", "-shm"))
            blockstore.remove_store(path)
    return freed


def cmd_cache(args: argparse.Namespace) -> int:
    directory = Path(args.bt_cache) if args.bt_cache else blockstore.default_dir()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    if args.action == "clear":
        if args.json:
            raise ConfigError("--json goes with show, not clear")
        freed = clear(directory)
        print(f"pyvmm: bt block store {directory} cleared ({_mib(freed)} freed)")
        return 0
    info = describe(directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"location: {info['location']}")
    print(f"size:     {_mib(info['bytes'])}")
    print(f"rows:     {info['rows']}")
    print(f"cap:      {_mib(info['max_bytes'])} (PYVMM_BT_CACHE_MAX)")
    for f in info["files"]:
        mark = " (this version)" if f["current"] else ""
        print(f"  {Path(f['path']).name}: {_mib(f['bytes'])}{mark}")
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rows(path: Path) -> int | None:
    """Rows of one store file, read-only; None when it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            return db.execute("SELECT count(*) FROM blocks").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
