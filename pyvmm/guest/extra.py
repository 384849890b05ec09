"""Extra programs for the busybox initramfs, taken from Debian packages.

`fetch_package("open-vm-tools")` downloads the package with `apt-get
download` into ~/.cache/pyvmm/packages/<name>/ and unpacks it with
`dpkg -x`; `program_files(tree, "usr/bin/vmware-rpctool")` collects the
program with the shared libraries and dynamic loader it needs (resolved
with the host's `ldd`, libraries found in the unpacked tree first); and
`extra_cpio(files)` writes them as a gzip-compressed newc archive.  Linux
unpacks concatenated archives one after the other, so
`append_to_initramfs(base, extra, out)` gives one initrd holding both.

`python3 -m pyvmm.guest.extra [OUT]` (scripts/fetch-open-vm-tools.sh)
builds the default initramfs plus vmware-rpctool and prints its path."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..cachedir import pyvmm_cache
from ..errors import ConfigError
from .cpio import CpioWriter

log = logging.getLogger(__name__)

RPCTOOL = "usr/bin/vmware-rpctool"
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_LINE = re.compile(r"^\s*(\S+)(?:\s+=>\s+(\S+))?\s+\(0x[0-9a-f]+\)\s*$")


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/pyvmm/packages (XDG_CACHE_HOME defaults to ~/.cache)."""
    return pyvmm_cache("packages")


def _run(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    """Runs a host tool. Raises ConfigError when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"{argv[0]} is not installed")
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{argv[0]}: {e}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise ConfigError(f"{' '.join(argv)}: {last}")
    return p.stdout


def fetch_package(name: str, cache: Path | None = None) -> Path:
    """The unpacked tree of Debian package `name` (downloaded once, then
    reused). Raises ConfigError when apt-get or dpkg cannot provide it."""
    where = (cache or cache_dir()) / name
    tree = where / "root"
    if (where / ".unpacked").exists():
        return tree
    where.mkdir(parents=True, exist_ok=True)
    for old in where.glob("*.deb"):
        old.unlink()
    _run(["apt-get", "download", name], cwd=where)
    debs = sorted(where.glob(f"{name}_*.deb"))
    if not debs:
        raise ConfigError(f"apt-get download {name}: no .deb appeared in {where}")
    if tree.exists():
        shutil.rmtree(tree)
    _run(["dpkg", "-x", str(debs[-1]), str(tree)])
    (where / ".unpacked").write_text(debs[-1].name + "\n")
    log.info("unpacked %s into %s", debs[-1].name, tree)
    return tree


def _lib_dirs(tree: Path) -> list[str]:
    return [str(d) for d in (tree / "usr/lib/x86_64-linux-gnu", tree / "lib/x86_64-linux-gnu",
                             tree / "usr/lib") if d.is_dir()]


def shared_objects(tree: Path, program: str) -> dict[str, Path]:
    """Guest path -> host file of every library and the loader `program`
    (a path inside `tree`) needs, as the host's ldd resolves them with the
    tree's library directories first. Raises ConfigError for a missing one."""
    env = dict(os.environ)
    dirs = _lib_dirs(tree)
    if dirs:
        env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    out = _run(["ldd", str(tree / program)], env=env)
    found: dict[str, Path] = {}
    for line in out.splitlines():
        if "not found" in line:
            raise ConfigError(f"{program}: {line.strip()}")
        m = _LDD_LINE.match(line)
        if not m or m.group(1).startswith("linux-vdso") or m.group(1).startswith("linux-gate"):
            continue
        host = m.group(2) or m.group(1)
        if not host.startswith("/"):
            continue
        guest = host
        for d in dirs:                       # a library from the package: its place in the package
            if host.startswith(d + "/"):
                guest = "/" + os.path.relpath(host, tree)
        found[guest] = Path(os.path.realpath(host))
        if m.group(2) is None:               # the loader: also where Debian's ld.so lives
            found["/lib/x86_64-linux-gnu/" + os.path.basename(host)] = found[guest]
    return found


def program_files(tree: Path, program: str) -> dict[str, tuple[bytes, int]]:
    """Guest path -> (bytes, mode) of `program` and what it needs to run.
    Raises ConfigError as shared_objects, or when a file cannot be read."""
    files = {"/" + program: (tree / program, 0o755)}
    files.update({g: (h, 0o755) for g, h in shared_objects(tree, program).items()})
    out: dict[str, tuple[bytes, int]] = {}
    for guest, (host, mode) in files.items():
        try:
            out[guest] = (Path(host).read_bytes(), mode)
        except OSError as e:
            raise ConfigError(f"{host}: {e.strerror}") from None
    return out


def extra_cpio(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A gzip-compressed newc archive with `files` and their directories
    (timestamps zero, so the same files give the same bytes)."""
    w = CpioWriter()
    dirs: set[str] = set()
    for guest in sorted(files):
        parts = guest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                w.add_dir(d, 0o755)
    for guest in sorted(files):
        data, mode = files[guest]
        w.add_file(guest, data, mode)
    return gzip.compress(w.finish(), compresslevel=6, mtime=0)


def append_to_initramfs(base: Path, extra: bytes, out: Path) -> Path:
    """Writes base's bytes followed by `extra` to `out` (atomically).
    Raises ConfigError on I/O errors."""
    try:
        data = Path(base).read_bytes() + extra
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".initrd-", dir=out.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def rpctool_initramfs(out: Path | None = None) -> Path:
    """The default busybox initramfs with Debian's vmware-rpctool added
    (/usr/bin/vmware-rpctool). Raises ConfigError when the package cannot be
    fetched or busybox is unusable."""
    from .initramfs import ensure_default_initramfs
    tree = fetch_package("open-vm-tools")
    extra = extra_cpio(program_files(tree, RPCTOOL))
    target = out or cache_dir() / "open-vm-tools" / "initramfs-rpctool.cpio.gz"
    return append_to_initramfs(ensure_default_initramfs(), extra, target)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = rpctool_initramfs(Path(args[0]) if args else None)
    except ConfigError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
