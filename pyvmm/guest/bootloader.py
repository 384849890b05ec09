"""The boot loader of `pyvmm guest disk`: Debian's SYSLINUX on a small FAT
boot partition, installed into the image file offline.

Why SYSLINUX on FAT and not EXTLINUX on the ext4 root: the `extlinux`
installer only works on a mounted file system (it needs root, a loop
device or FUSE), and installing its ldlinux.sys by hand means finding
the blocks of a file inside ext4 and patching their list into the boot
sector ourselves, against a loader version's private layout. The FAT
variant is the same loader (same ldlinux, same config language, same
serial menu) and Debian's `syslinux` installer writes it through mtools
into a plain file at a byte offset, as an unprivileged process.

The MBR boot code is SYSLINUX's mbr.bin: it loads the first sector of the
active partition, which is SYSLINUX's FAT boot sector.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError
from .partition import HEADS, SECTOR, SECTORS_PER_TRACK, TYPE_FAT16_LBA, TYPE_FAT32_LBA

MBR_BOOT_CODE = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")   # syslinux-common, syslinux
VOLUME_LABEL = "PYVMMBOOT"
CONFIG_NAME = "syslinux.cfg"
MENU_TITLE = "pyvmm boot disk"
COM32_DIR = "/usr/lib/syslinux/modules/bios"        # syslinux-common
MENU_MODULES = ("menu.c32", "libutil.c32", "libcom32.c32")   # the menu first, then what it loads
KERNEL_NAME = "vmlinuz"        # 8.3 names: SYSLINUX reads them whether or not mtools wrote long names
INITRD_NAME = "initrd.img"
SETUP_HINT = "install syslinux, syslinux-common and mtools (scripts/setup.sh)"


def mbr_boot_code() -> bytes:
    """SYSLINUX's 440-byte MBR. Raises ConfigError when it is not installed."""
    for path in MBR_BOOT_CODE:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    raise ConfigError(f"no SYSLINUX MBR ({MBR_BOOT_CODE[0]}): {SETUP_HINT}")


def menu_modules() -> dict[str, str]:
    """SYSLINUX's menu module and the libraries it loads, name -> host path.
    Raises ConfigError when they are not installed."""
    found = {}
    for name in MENU_MODULES:
        path = Path(COM32_DIR) / name
        if not path.is_file():
            raise ConfigError(f"no SYSLINUX module {path}: {SETUP_HINT}")
        found[name] = str(path)
    return found


def syslinux_config(cmdline: str, timeout_s: float, release: str = "") -> str:
    """A SYSLINUX config that talks on COM1 at 115200 baud, shows a menu
    there and boots `linux` after `timeout_s` seconds.

    The menu is menu.c32 (drawn with ANSI sequences on the serial port)
    because SYSLINUX 6.04 writes SAY and DISPLAY text to the screen only;
    where menu.c32 cannot load, PROMPT 1 still gives the `boot:` prompt."""
    tenths = max(1, round(timeout_s * 10))     # SYSLINUX's TIMEOUT counts tenths of a second
    kernel = f"Linux {release}".rstrip()
    return (f"SERIAL 0 115200\n"
            f"UI {MENU_MODULES[0]}\n"
            f"MENU TITLE {MENU_TITLE}\n"
            f"MENU AUTOBOOT Booting linux in # s\n"
            f"PROMPT 1\n"
            f"TIMEOUT {tenths}\n"
            f"DEFAULT linux\n"
            f"LABEL linux\n"
            f"  MENU LABEL {kernel}\n"
            f"  KERNEL /{KERNEL_NAME}\n"
            f"  INITRD /{INITRD_NAME}\n"
            f"  APPEND {cmdline}\n"
            f"LABEL shell\n"
            f"  MENU LABEL {kernel}, a shell in the initramfs\n"
            f"  KERNEL /{KERNEL_NAME}\n"
            f"  INITRD /{INITRD_NAME}\n"
            f"  APPEND {cmdline} rdinit=/bin/sh\n")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} not found: {SETUP_HINT}")
    return path


def _run(argv: list[str]) -> None:
    """Runs a host tool; its last line of complaint becomes a ConfigError."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLSRC=os.devnull)
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise ConfigError(f"{Path(argv[0]).name} failed: {lines[-1]}")


def install_fat_boot(image: str, start: int, sectors: int, files: dict[str, str | os.PathLike]) -> int:
    """Makes a FAT file system on sectors [start, start+sectors) of the
    image file, copies `files` (name in the root directory -> host path)
    into it and installs SYSLINUX there. Returns the MBR partition type
    that matches the FAT variant mformat chose.
    Raises ConfigError when a tool is missing or fails (e.g. no space)."""
    offset = start * SECTOR
    target = f"{image}@@{offset}"
    # -H: hidden sectors, the partition's first LBA, from which the FAT
    # boot sector finds ldlinux.sys on the whole disk.
    _run([_tool("mformat"), "-i", target, "-T", str(sectors), "-h", str(HEADS), "-s", str(SECTORS_PER_TRACK),
          "-H", str(start), "-v", VOLUME_LABEL, "::"])
    for name, host_path in files.items():
        _run([_tool("mcopy"), "-i", target, "-o", str(host_path), f"::/{name}"])
    _run([_tool("syslinux"), "--install", "--offset", str(offset), image])
    with open(image, "rb") as f:
        f.seek(offset)
        boot_sector = f.read(SECTOR)
    return TYPE_FAT32_LBA if boot_sector[82:87] == b"FAT32" else TYPE_FAT16_LBA
