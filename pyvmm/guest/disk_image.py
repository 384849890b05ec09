"""`pyvmm guest disk OUT`: a bootable PC disk built offline from the host's
Debian packages, as an unprivileged-friendly process.

Layout (MiB-aligned, as partitioning tools do):

    sector 0          MBR: SYSLINUX's mbr.bin + our partition table
    partition 1       FAT, active: ldlinux.sys/.c32, syslinux.cfg, menu.c32, kernel, boot initramfs
    partition 2       ext4 `pyvmm-root`: busybox userland, init, /boot, /lib/modules

The disk is assembled as a sparse raw file next to OUT, then either
renamed into place (raw) or copied into qcow2/VMDK by pyvmm's own storage
code (`storage.ops.convert`), so no qemu-img is needed.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..storage.create import parse_size
from ..storage.ops import convert
from . import bootloader, rootfs
from .initramfs import DEFAULT_BUSYBOX, MODULES_ROOT
from .partition import SECTOR, TYPE_LINUX, Partition, mbr_sector

log = logging.getLogger(__name__)

FORMATS = ("qcow2", "raw", "vmdk")
DEFAULT_SIZE = "128M"
DEFAULT_CMDLINE = "root=/dev/vda2 console=ttyS0"
DEFAULT_TIMEOUT_S = 2.0
MIB = 1 << 20
ALIGN = MIB // SECTOR            # partitions start on MiB boundaries
# ext4 needs room beyond its files: superblocks, group descriptors, inode
# tables, a 4 MiB journal for a disk this small, the reserved blocks.
EXT4_OVERHEAD = 12 * MIB
FAT_SLACK = 2 * MIB              # FAT tables, directories, ldlinux.sys/.c32 and the menu (~480 KiB)


@dataclass(frozen=True)
class DiskLayout:
    """What was written: the image, its format and size, the partitions."""
    path: str
    fmt: str
    size: int
    kernel: str
    cmdline: str
    boot: Partition
    root: Partition


def default_kernel() -> str:
    """The newest Debian cloud kernel in /boot, the one pyvmm's Linux tests
    boot. Raises ConfigError when there is none."""
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or sorted(glob.glob("/boot/vmlinuz-*"))
    if not found:
        raise ConfigError("no kernel in /boot (install linux-image-cloud-amd64 or give --kernel)")
    return found[-1]


def _mib_up(n: int) -> int:
    return -(-n // MIB) * MIB


def make_boot_disk(out: str, fmt: str = "qcow2", size: str | int = DEFAULT_SIZE, kernel: str | None = None,
                   cmdline: str = DEFAULT_CMDLINE, timeout_s: float = DEFAULT_TIMEOUT_S,
                   busybox: str = DEFAULT_BUSYBOX, modules_root: str = MODULES_ROOT) -> DiskLayout:
    """Writes the bootable disk OUT. Raises ConfigError for bad input (an
    unknown format, a missing kernel or busybox, a size too small for the
    contents) and when a host tool fails; OUT is then left as it was."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown disk format {fmt!r} (one of {', '.join(FORMATS)})")
    disk_size = size if isinstance(size, int) else parse_size(size)
    kernel = kernel or default_kernel()
    if not os.path.isfile(kernel):
        raise ConfigError(f"kernel {kernel}: no such file")
    release = rootfs.kernel_release(kernel)
    if not os.path.isdir(Path(modules_root) / release):
        release_modules = None       # drivers built in (or a kernel not from /boot): no modules to carry
    else:
        release_modules = release
    boot_code, menu = bootloader.mbr_boot_code(), bootloader.menu_modules()   # missing SYSLINUX: fail first
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"{out}: directory {out_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix=".pyvmm-disk-", dir=out_dir) as work:
        work_dir = Path(work)
        initrd = work_dir / "initrd.img"
        initrd.write_bytes(rootfs.build_boot_initramfs(busybox, release_modules, modules_root))
        config = work_dir / bootloader.CONFIG_NAME
        config.write_text(bootloader.syslinux_config(cmdline, timeout_s, release))
        stage = work_dir / "root"
        stage.mkdir()
        rootfs.stage_root(stage, busybox, kernel, initrd, release_modules, modules_root)

        boot_bytes = _mib_up(os.path.getsize(kernel) + initrd.stat().st_size + FAT_SLACK)
        root_min = _mib_up(rootfs.tree_bytes(stage) * 11 // 10 + EXT4_OVERHEAD)
        needed = MIB + boot_bytes + root_min
        if disk_size < needed:
            raise ConfigError(f"disk size {disk_size // MIB} MiB is too small: this kernel and userland "
                              f"need at least {-(-needed // MIB)} MiB")
        boot = Partition(ALIGN, boot_bytes // SECTOR, 0, bootable=True)
        root_sectors = (disk_size // MIB) * ALIGN - boot.end
        raw = str(work_dir / "disk.raw")
        with open(raw, "wb") as f:
            f.truncate(disk_size)
        files = {bootloader.KERNEL_NAME: kernel, bootloader.INITRD_NAME: initrd,
                 bootloader.CONFIG_NAME: config, **menu}
        fat_type = bootloader.install_fat_boot(raw, boot.start, boot.sectors, files)
        boot = Partition(boot.start, boot.sectors, fat_type, bootable=True)
        root = Partition(boot.end, root_sectors, TYPE_LINUX)
        rootfs.make_ext4(raw, root.start * SECTOR, root.sectors * SECTOR, stage)
        mbr = mbr_sector(boot_code, [boot, root], secrets.randbits(32))
        with open(raw, "r+b") as f:
            f.write(mbr)
        _place(raw, out, fmt, work_dir)
    log.info("wrote %s (%s, %d MiB): boot %d+%d, root %d+%d sectors", out, fmt, disk_size // MIB,
             boot.start, boot.sectors, root.start, root.sectors)
    return DiskLayout(out, fmt, disk_size, kernel, cmdline, boot, root)


def _place(raw: str, out: str, fmt: str, work_dir: Path) -> None:
    """Moves the finished raw disk to `out`, in format `fmt`, atomically."""
    if fmt == "raw":
        os.replace(raw, out)
        return
    converted = str(work_dir / f"disk.{fmt}")
    convert(raw, converted, src_fmt="raw", dst_fmt=fmt)
    os.replace(converted, out)
