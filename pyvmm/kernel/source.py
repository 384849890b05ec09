"""Finding a Linux source tree to build: a directory the user names, or
Debian's `linux-source-X.Y` tarball (/usr/src/linux-source-X.Y.tar.xz),
unpacked once into pyvmm's cache, outside the repository:

    $XDG_CACHE_HOME/pyvmm/kernel/linux-source-X.Y/    the unpacked tree
    $XDG_CACHE_HOME/pyvmm/kernel/build-linux-source-X.Y/  O= build directory

XDG_CACHE_HOME defaults to ~/.cache; PYVMM_KERNEL_CACHE overrides the whole
kernel cache directory.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..cachedir import pyvmm_cache
from ..errors import VmmError

log = logging.getLogger(__name__)

DEBIAN_TARBALLS = "/usr/src/linux-source-*.tar.*"
INSTALL_HINT = "run scripts/install-kernel-build-deps.sh (apt-get install linux-source-6.1)"
UNPACKED_MARKER = ".pyvmm-unpacked"
# Files whose presence makes a directory a kernel tree we can configure.
TREE_FILES = ("Makefile", "Kconfig", "scripts/kconfig/merge_config.sh", "arch/x86/Kconfig")


class KernelSourceError(VmmError):
    """No usable kernel source tree (missing package, not a kernel tree,
    unpacking failed)."""


def cache_dir() -> Path:
    """pyvmm's kernel cache: $PYVMM_KERNEL_CACHE, else
    $XDG_CACHE_HOME/pyvmm/kernel, else ~/.cache/pyvmm/kernel."""
    return pyvmm_cache("kernel", "PYVMM_KERNEL_CACHE")


def check_tree(path: str | os.PathLike) -> Path:
    """Returns `path` resolved if it is a Linux source tree with x86 support.
    Raises KernelSourceError otherwise (one line, naming what is missing)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise KernelSourceError(f"{root}: not a directory (expected a Linux source tree)")
    missing = [f for f in TREE_FILES if not (root / f).exists()]
    if missing:
        raise KernelSourceError(f"{root}: not a Linux kernel source tree (no {', '.join(missing)})")
    return root


def kernel_version(tree: Path) -> str:
    """"6.1.158" from the tree's top Makefile ("" when unreadable)."""
    try:
        head = (tree / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return ""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d*)", head, re.M))
    parts = [fields.get(k, "") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(p for p in parts if p)


def find_debian_tarball() -> Path:
    """The newest /usr/src/linux-source-*.tar.* (by version in the name).
    Raises KernelSourceError when none is installed."""
    found = glob.glob(DEBIAN_TARBALLS)
    if not found:
        raise KernelSourceError(f"no kernel source given and no {DEBIAN_TARBALLS} installed: {INSTALL_HINT}")

    def key(p: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", Path(p).name)]
    return Path(max(found, key=key))


def _tarball_stamp(tarball: Path) -> str:
    st = tarball.stat()
    return f"{tarball} {st.st_size} {int(st.st_mtime)}\n"


def unpack_tarball(tarball: Path, dest_root: Path | None = None) -> Path:
    """Unpacks a linux-source tarball (whose top directory is its name less
    the .tar.* suffix) under `dest_root` (default cache_dir()), once: a
    marker records which tarball it came from and a newer tarball replaces
    the tree.  Returns the tree.  Raises KernelSourceError."""
    dest_root = dest_root or cache_dir()
    name = tarball.name.split(".tar")[0]
    tree = dest_root / name
    marker = tree / UNPACKED_MARKER
    stamp = _tarball_stamp(tarball)
    try:
        if marker.read_text() == stamp:
            return tree
    except OSError:
        pass
    if shutil.which("tar") is None or shutil.which("xz") is None and tarball.suffix == ".xz":
        raise KernelSourceError(f"cannot unpack {tarball}: tar/xz missing: {INSTALL_HINT}")
    log.warning("unpacking %s into %s (once; about 1.5 GB)", tarball, dest_root)
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_root))
    except OSError as e:
        raise KernelSourceError(f"cannot create {dest_root}: {e.strerror or e}") from None
    try:
        proc = subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise KernelSourceError(f"unpacking {tarball} failed: {last}")
        top = tmp / name
        if not top.is_dir():
            entries = [p for p in tmp.iterdir() if p.is_dir()]
            if len(entries) != 1:
                raise KernelSourceError(f"{tarball}: expected one top directory, found {len(entries)}")
            top = entries[0]
        check_tree(top)
        (top / UNPACKED_MARKER).write_text(stamp)
        if tree.exists():
            shutil.rmtree(tree)
        top.rename(tree)
    except OSError as e:
        raise KernelSourceError(f"unpacking {tarball} into {dest_root} failed: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def resolve_source(source: str | os.PathLike | None = None) -> Path:
    """The tree to build: `source` if given (a tree, or a linux-source
    tarball to unpack into the cache), else Debian's linux-source unpacked
    into the cache.  Raises KernelSourceError."""
    if source is None:
        return unpack_tarball(find_debian_tarball())
    path = Path(source).expanduser()
    if path.is_file() and ".tar" in path.name:
        return unpack_tarball(path.resolve())
    return check_tree(path)


def default_build_dir(tree: Path) -> Path:
    """The O= directory for `tree`: cache_dir()/build-<tree name>."""
    return cache_dir() / f"build-{tree.name}"
