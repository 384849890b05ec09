"""The default guest userland: a gzip-compressed newc initramfs holding a
static busybox and an /init script that mounts the pseudo file systems,
prints a marker and hands the console to an interactive shell.

gzip is used because every kernel with initramfs support can unpack it
(the Debian cloud kernel has CONFIG_RD_GZIP=y, like nearly all others).

When the kernel being booted has its drivers as modules (the stock Debian
kernel: virtio_pci, virtio_blk, virtio-rng, virtio_net), `ensure_default_initramfs(
release=...)` builds a variant that carries them, with their dependencies
from modules.dep, under /lib/modules/<release>/, and /init insmods them in
dependency order (listed in /etc/pyvmm-modules) before the marker.

Kernel command-line switches the /init script understands:

    pyvmm.poweroff   power off right after printing the marker (smoke tests)
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import tempfile
from pathlib import Path

from ..cachedir import pyvmm_cache
from ..errors import ConfigError
from .cpio import CpioWriter

log = logging.getLogger(__name__)

READY_MARKER = "PYVMM-INIT-READY"
DEFAULT_BUSYBOX = "/bin/busybox"

DIRS = ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root", "usr", "usr/bin",
        "usr/sbin", "mnt", "run", "var")
# Linked in the archive so /init works before `busybox --install` runs.
APPLETS = ("sh", "mount", "umount", "uname", "cat", "ls", "echo", "mkdir", "poweroff",
           "reboot", "halt", "setsid", "cttyhack", "grep", "dmesg", "ps", "sleep")
SBIN_APPLETS = ("poweroff", "reboot", "halt")

INIT_SCRIPT = f"""#!/bin/busybox sh
# pyvmm default init: mount the pseudo file systems, say we are ready, then
# give the console to a shell.  Leaving the shell powers the VM off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
export TERM=linux
/bin/busybox --install -s 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || echo "init: cannot mount devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
# Drivers the kernel has as modules (virtio): load them, dependencies first.
if [ -f /etc/pyvmm-modules ]; then
    for m in $(cat /etc/pyvmm-modules); do insmod "$m" || echo "init: cannot load $m"; done
fi
# Named virtio-console ports as /dev/virtio-ports/NAME (what udev would make);
# names arrive just after the driver loads: wait up to 2 s for every port
# but the console (p0) to have one.
for try in 1 2 3 4 5 6 7 8 9 10; do
    unnamed=0
    for d in /sys/class/virtio-ports/vport*; do
        case "$d" in *p0|*"vport*") ;; *) [ -s "$d/name" ] || unnamed=1 ;; esac
    done
    [ $unnamed = 0 ] && break
    sleep 0.2
done
for f in /sys/class/virtio-ports/*/name; do
    d=${{f%/name}}
    [ -s "$f" ] && mkdir -p /dev/virtio-ports && ln -sf "../${{d##*/}}" /dev/virtio-ports/"$(cat "$f")"
done
hostname pyvmm
printf '\\n{READY_MARKER}\\n'
case " $(cat /proc/cmdline) " in
*" pyvmm.poweroff "*) poweroff -f ;;
esac
cd /root
# cttyhack opens the real console device (e.g. /dev/ttyS0) so the shell gets
# a controlling terminal: job control and Ctrl-C work.
setsid cttyhack sh -l
echo "init: shell exited, powering off"
sync
poweroff -f
"""

PROFILE = """PS1='\\w # '
alias ll='ls -l'
"""


def _is_static_elf(data: bytes) -> bool | None:
    """True for an ELF without an interpreter (PT_INTERP); None when `data` is
    not a 64- or 32-bit little-endian ELF we can read."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[5] != 1:
        return None
    is64 = data[4] == 2
    if is64:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    else:
        phoff, = struct.unpack_from("<I", data, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return None
        p_type, = struct.unpack_from("<I", data, off)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _load_busybox(busybox_path: str) -> bytes:
    """Raises ConfigError if busybox is missing, unreadable or not static."""
    hint = "install busybox-static (Debian/Ubuntu: apt install busybox-static)"
    try:
        data = Path(busybox_path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"busybox not found at {busybox_path}: {hint}") from None
    except OSError as e:
        raise ConfigError(f"cannot read busybox at {busybox_path}: {e.strerror}") from None
    static = _is_static_elf(data)
    if static is None:
        raise ConfigError(f"{busybox_path} is not an ELF executable: {hint}")
    if not static:
        raise ConfigError(f"{busybox_path} is dynamically linked and cannot run alone "
                          f"in the guest: {hint}")
    return data


MODULES_ROOT = "/lib/modules"
MODULES_LIST = "etc/pyvmm-modules"
# What a guest needs for pyvmm's virtio devices (issue 16 part 5).
VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio-rng", "virtio_net",   # virtio_net pulls net_failover, failover
                  "virtio_console")


def module_closure(release: str, names: tuple[str, ...] | list[str], root: str = MODULES_ROOT) -> list[str]:
    """Paths (relative to root/release) of modules `names` and everything
    they depend on, each after its dependencies, from modules.dep.
    Raises ConfigError when modules.dep or a named module is missing."""
    dep_file = Path(root) / release / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as e:
        raise ConfigError(f"{dep_file}: {e.strerror}") from None
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in text.splitlines():
        path, colon, rest = line.partition(":")
        if colon:
            deps[path] = rest.split()
            by_name[Path(path).name.split(".ko")[0]] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):    # modprobe loads the list from its end
            visit(d)
        order.append(path)

    for name in names:
        path = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if path is None:
            raise ConfigError(f"kernel {release} has no module {name} (see {dep_file})")
        visit(path)
    return order


def build_default_initramfs(busybox_path: str = DEFAULT_BUSYBOX, release: str | None = None,
                            modules: tuple[str, ...] = VIRTIO_MODULES,
                            modules_root: str = MODULES_ROOT) -> bytes:
    """The default initramfs as gzip-compressed newc cpio bytes. The result
    depends only on the busybox binary (timestamps are zero), and, with a
    kernel `release`, on the `modules` it then carries and loads.
    Raises ConfigError when no usable static busybox is found, or a module."""
    busybox = _load_busybox(busybox_path)
    w = CpioWriter()
    for d in DIRS:
        w.add_dir(d, 0o700 if d == "root" else 0o1777 if d == "tmp" else 0o755)
    w.add_char_device("dev/console", 5, 1, 0o600)
    w.add_char_device("dev/null", 1, 3, 0o666)
    w.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        if applet in SBIN_APPLETS:
            w.add_symlink(f"sbin/{applet}", "../bin/busybox")
        else:
            w.add_symlink(f"bin/{applet}", "busybox")
    w.add_file("etc/profile", PROFILE.encode(), 0o644)
    w.add_file("etc/hostname", b"pyvmm\n", 0o644)
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    w.add_file("etc/group", b"root:x:0:\n", 0o644)
    w.add_file("init", INIT_SCRIPT.encode(), 0o755)
    if release is not None:
        _add_modules(w, release, modules, modules_root)
    archive = w.finish()
    return gzip.compress(archive, compresslevel=9, mtime=0)


def _add_modules(w: CpioWriter, release: str, names: tuple[str, ...], root: str) -> None:
    paths = module_closure(release, names, root)
    made = {"lib", "lib/modules"}
    w.add_dir("lib", 0o755)
    w.add_dir("lib/modules", 0o755)
    for rel in paths:
        parts = f"lib/modules/{release}/{rel}".split("/")
        for i in range(3, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                w.add_dir(d, 0o755)
                made.add(d)
        try:
            data = (Path(root) / release / rel).read_bytes()
        except OSError as e:
            raise ConfigError(f"{root}/{release}/{rel}: {e.strerror}") from None
        w.add_file("/".join(parts), data, 0o644)
    listing = "".join(f"/lib/modules/{release}/{rel}\n" for rel in paths)
    w.add_file(MODULES_LIST, listing.encode(), 0o644)


def default_initramfs_path() -> Path:
    """$XDG_CACHE_HOME/pyvmm/initramfs.cpio.gz (XDG_CACHE_HOME defaults to ~/.cache)."""
    return pyvmm_cache("initramfs.cpio.gz")


def write_default_initramfs(path: str | os.PathLike | None = None,
                            busybox_path: str = DEFAULT_BUSYBOX, release: str | None = None) -> Path:
    """Builds the default initramfs and writes it (atomically) to `path`,
    default `default_initramfs_path()`. Returns the path.
    Raises ConfigError when busybox is unusable or the file cannot be written."""
    target = Path(path) if path is not None else default_initramfs_path()
    data = build_default_initramfs(busybox_path, release)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise ConfigError(f"cannot write initramfs to {target}: {e.strerror or e}") from None
    log.info("wrote default initramfs (%d bytes) to %s", len(data), target)
    return target


def ensure_default_initramfs(busybox_path: str = DEFAULT_BUSYBOX, release: str | None = None) -> Path:
    """The cached default initramfs, rebuilt when missing or older than the
    busybox binary or this module; with a kernel `release`, the variant
    that carries and loads that kernel's virtio modules.
    Raises ConfigError as write_default_initramfs."""
    if release is None:
        target = default_initramfs_path()
    else:
        target = pyvmm_cache(f"initramfs-virtio-{release}.cpio.gz")
    try:
        built = target.stat().st_mtime
        newest_input = max(os.stat(busybox_path).st_mtime, os.stat(__file__).st_mtime)
        if built >= newest_input:
            return target
    except OSError:
        pass
    return write_default_initramfs(target, busybox_path, release)
