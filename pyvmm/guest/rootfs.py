"""The root file system of `pyvmm guest disk`: a busybox userland, the
kernel with its modules and initramfs under /boot, made into ext4 with
`mke2fs -d` straight into the disk image at the partition's offset (no
mount, no loop device, no root needed).

Boot goes: SYSLINUX loads the kernel and the *boot initramfs* built here,
whose /init loads the disk drivers the stock Debian kernel has as modules
(virtio_pci + virtio_blk, or ata_piix + sd_mod for an IDE disk), mounts
the `root=` of the command line and switch_roots into it; the root's
/sbin/init is pyvmm's default init script (guest/initramfs.py), so the
shell and the READY marker are the same as with the direct kernel boot.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError
from .cpio import CpioWriter
from .initramfs import (
    APPLETS,
    DIRS,
    INIT_SCRIPT,
    MODULES_ROOT,
    PROFILE,
    SBIN_APPLETS,
    VIRTIO_MODULES,
    _load_busybox,
    module_closure,
)

ROOT_LABEL = "pyvmm-root"
ROOT_MODULES = ("virtio_pci", "virtio_blk")
ATA_MODULES = ("ata_piix", "sd_mod")           # pull libata, scsi_mod, scsi_common
VIRTIO_LIST = "etc/pyvmm-root-modules"
ATA_LIST = "etc/pyvmm-ata-modules"

BOOT_INIT = f"""#!/bin/busybox sh
# pyvmm boot-disk initramfs: load the disk drivers, mount the root= of the
# command line and hand over to its /sbin/init.
export PATH=/bin:/sbin
/bin/busybox --install -s 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root=; mode=rw; init=/sbin/init; wait=300
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    root=*) root="${{arg#root=}}" ;;
    ro) mode=ro ;;
    init=*) init="${{arg#init=}}" ;;
    rootwait) wait=0 ;;
    esac
done
load() {{ [ -f "$1" ] && for m in $(cat "$1"); do insmod "$m" 2>/dev/null; done; }}
load /{VIRTIO_LIST}
# libata and SCSI are big; load them only when the root may be on IDE.
case "$root" in /dev/vd*) ;; *) load /{ATA_LIST} ;; esac
# libata probes disks asynchronously, seconds after the module loads on a
# slow (emulated) CPU: wait up to 30 s for the root, forever with rootwait.
dev=; try=0
while [ "$wait" = 0 ] || [ $try -lt $wait ]; do
    try=$((try + 1))
    case "$root" in
    LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) [ -b "$root" ] && dev="$root" ;;
    esac
    [ -n "$dev" ] && break
    sleep 0.1
done
if [ -z "$dev" ] || ! mount -t ext4 -o "$mode" "$dev" /newroot; then
    echo "pyvmm-initramfs: cannot mount root '$root'; here is a shell"
    exec sh
fi
echo "pyvmm-initramfs: root $dev mounted $mode, starting $init"
umount /proc /sys
umount /dev 2>/dev/null
exec switch_root /newroot "$init"
"""


def kernel_release(kernel: str) -> str:
    """`6.1.0-57-cloud-amd64` for /boot/vmlinuz-6.1.0-57-cloud-amd64; the
    file name itself for a kernel named otherwise."""
    name = Path(kernel).name
    return name.partition("vmlinuz-")[2] or name


def _modules(release: str | None, names: tuple[str, ...], root: str) -> list[str]:
    return module_closure(release, names, root) if release else []


def build_boot_initramfs(busybox_path: str, release: str | None, modules_root: str = MODULES_ROOT) -> bytes:
    """The gzip newc initramfs that mounts the disk's root. `release` None:
    a kernel with its drivers built in, so no modules are carried.
    Raises ConfigError for a missing busybox or module."""
    busybox = _load_busybox(busybox_path)
    virtio = _modules(release, ROOT_MODULES, modules_root)
    ata = _modules(release, ATA_MODULES, modules_root)
    w = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "newroot"):
        w.add_dir(d)
    w.add_char_device("dev/console", 5, 1, 0o600)
    w.add_file("bin/busybox", busybox, 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("init", BOOT_INIT.encode(), 0o755)
    made = set()
    for rel in dict.fromkeys(virtio + ata):
        parts = f"lib/modules/{release}/{rel}".split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                w.add_dir(d)
                made.add(d)
        w.add_file("/".join(parts), _read(Path(modules_root) / release / rel), 0o644)
    for listing, paths in ((VIRTIO_LIST, virtio), (ATA_LIST, ata)):
        if paths:
            w.add_file(listing, "".join(f"/lib/modules/{release}/{p}\n" for p in paths).encode())
    return gzip.compress(w.finish(), compresslevel=9, mtime=0)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None


def stage_root(stage: Path, busybox_path: str, kernel: str, initrd: Path, release: str | None,
               modules_root: str = MODULES_ROOT) -> None:
    """Writes the root file system's tree under `stage` (an empty directory).
    Raises ConfigError for a missing input."""
    for d in DIRS + ("boot", "sbin", "lib"):
        (stage / d).mkdir(mode=0o755, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "root").chmod(0o700)
    (stage / "bin/busybox").write_bytes(_load_busybox(busybox_path))
    (stage / "bin/busybox").chmod(0o755)
    for applet in APPLETS:
        link = stage / ("sbin" if applet in SBIN_APPLETS else "bin") / applet
        link.symlink_to("../bin/busybox" if applet in SBIN_APPLETS else "busybox")
    files = {"etc/profile": PROFILE, "etc/hostname": "pyvmm\n", "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
             "etc/group": "root:x:0:\n", "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 rw 0 1\n"}
    for rel, text in files.items():
        (stage / rel).write_text(text)
    (stage / "sbin/init").write_text(INIT_SCRIPT)
    (stage / "sbin/init").chmod(0o755)
    suffix = f"-{release}" if release else ""
    try:
        shutil.copyfile(kernel, stage / f"boot/vmlinuz{suffix}")
    except OSError as e:
        raise ConfigError(f"kernel {kernel}: {e.strerror}") from None
    shutil.copyfile(initrd, stage / f"boot/initrd.img{suffix}")
    if release:
        _stage_modules(stage, release, modules_root)


def _stage_modules(stage: Path, release: str, modules_root: str) -> None:
    """Every module pyvmm's devices need (virtio, IDE) with its dependencies,
    and a modules.dep that lists just those, so modprobe finds them all."""
    paths = module_closure(release, VIRTIO_MODULES + ROOT_MODULES + ATA_MODULES, modules_root)
    src = Path(modules_root) / release
    dst = stage / "lib/modules" / release
    for rel in paths:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(_read(src / rel))
    keep = set(paths)
    dep_lines = [line for line in _read(src / "modules.dep").decode().splitlines()
                 if line.partition(":")[0] in keep]
    (dst / "modules.dep").write_text("\n".join(dep_lines) + "\n")


def tree_bytes(stage: Path) -> int:
    """Bytes of file data under `stage`, each file rounded up to 4 KiB blocks."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(stage):
        total += 4096 * (len(dirnames) + len(filenames))   # directory entries, inodes, symlinks: a rough block each
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                total += -(-p.stat().st_size // 4096) * 4096
    return total


def make_ext4(image: str, offset: int, size: int, stage: Path) -> None:
    """mke2fs -d: an ext4 of `size` bytes at byte `offset` of the image
    file, filled from `stage`.
    Raises ConfigError when mke2fs is missing or fails (e.g. no space)."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    if mke2fs is None:
        raise ConfigError("mke2fs not found: install e2fsprogs (scripts/setup.sh)")
    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-b", "4096",
            "-E", f"offset={offset},root_owner=0:0,nodiscard", "-d", str(stage), image, f"{size // 1024}k"]
    # root_owner covers the root directory only: run unprivileged, the files
    # keep the caller's uid in the image (as root, the usual case, they are 0).
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise ConfigError(f"mke2fs failed: {lines[-1].strip()}")
