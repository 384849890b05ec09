"""`pyvmm guest disk`: the partition table and boot loader pieces, and the
whole disk booted under QEMU TCG with Debian's SeaBIOS (the reference that
the image is sound), in each output format, once each; qemu-img checks the
images before and after the guest has written to its root."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.guest import bootloader
from pyvmm.guest.disk_image import DEFAULT_CMDLINE, make_boot_disk
from pyvmm.guest.partition import (
    TYPE_FAT16_LBA,
    TYPE_LINUX,
    Partition,
    chs,
    mbr_sector,
    read_partitions,
)
from pyvmm.storage.image import open_image
from tests.devices.qemu_reference import QemuSession, qemu_binary
from tests.hostfacts import from_setup, require_debian_cloud_kernel

REPO = Path(__file__).resolve().parents[2]
TOOLS = from_setup(programs=["mformat", "mcopy", "syslinux", "mke2fs", "qemu-img"],
                   paths=["/usr/lib/syslinux/mbr/mbr.bin"], package="syslinux syslinux-common mtools e2fsprogs")
BOOT_TIMEOUT = 300
TEST_CMDLINE = DEFAULT_CMDLINE + " pyvmm.disk-test=1"


def test_chs_encoding_and_its_ceiling():
    assert chs(0) == bytes((0, 1, 0))
    assert chs(2048) == bytes((32, 33, 0))            # 2048 = 0*16065 + 32*63 + 32
    assert chs(16065 * 300 + 63 + 5) == bytes((1, 6 | ((300 >> 2) & 0xC0), 300 & 0xFF))
    assert chs(16065 * 5000) == bytes((254, 63 | 0xC0, 0xFF))   # past cylinder 1023: 1023/254/63


def test_mbr_sector_layout_and_round_trip():
    parts = [Partition(2048, 4096, TYPE_FAT16_LBA, bootable=True), Partition(6144, 10000, TYPE_LINUX)]
    sector = mbr_sector(b"\xfa" * 440, parts, 0x12345678)
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert sector[:440] == b"\xfa" * 440 and struct.unpack_from("<I", sector, 440)[0] == 0x12345678
    assert sector[446] == 0x80 and sector[446 + 16] == 0
    assert struct.unpack_from("<II", sector, 446 + 8) == (2048, 4096)
    assert read_partitions(sector) == parts


@pytest.mark.parametrize("parts", [
    [Partition(0, 10, TYPE_LINUX)],                                             # over the MBR itself
    [Partition(2048, 100, TYPE_LINUX), Partition(2100, 100, TYPE_LINUX)],       # overlapping
    [Partition(2048, 1 << 32, TYPE_LINUX)],                                     # past 2 TiB
    [Partition(2048 * (i + 1), 10, TYPE_LINUX) for i in range(5)],              # five primaries
])
def test_mbr_sector_refuses_bad_tables(parts):
    with pytest.raises(ConfigError):
        mbr_sector(b"", parts, 0)


def test_syslinux_config_talks_on_com1_with_menu_and_short_timeout():
    cfg = bootloader.syslinux_config("root=/dev/vda2 console=ttyS0", 1.5, "6.1.0-1-amd64")
    lines = [line.strip() for line in cfg.splitlines()]
    assert lines[0] == "SERIAL 0 115200"      # must come first, before anything is printed
    assert "UI menu.c32" in lines and "MENU LABEL Linux 6.1.0-1-amd64" in lines
    assert "PROMPT 1" in lines and "TIMEOUT 15" in lines and "DEFAULT linux" in lines
    assert "APPEND root=/dev/vda2 console=ttyS0" in lines


@TOOLS
def test_bad_input_is_one_line_error(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pyvmm", "guest", "disk", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    kernel = require_debian_cloud_kernel()
    for args, words in [((str(tmp_path / "a.qcow2"), "--kernel", str(tmp_path / "none")), "no such file"),
                        ((str(tmp_path / "b.qcow2"), "--size", "8M", "--kernel", kernel), "too small"),
                        ((str(tmp_path / "c.qcow2"), "--size", "lots"), "bad size"),
                        ((str(tmp_path / "nodir" / "d.qcow2"),), "does not exist")]:
        done = run(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not Path(args[0]).exists()
    assert not any(p.name.startswith(".pyvmm-disk-") for p in tmp_path.iterdir())   # no leftovers


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """One disk per format, each built once for the module."""
    kernel = require_debian_cloud_kernel()
    d = tmp_path_factory.mktemp("disks")
    return {fmt: make_boot_disk(str(d / f"boot.{fmt}"), fmt, "96M", kernel, TEST_CMDLINE, timeout_s=1)
            for fmt in ("qcow2", "raw", "vmdk")}


def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


@TOOLS
def test_disk_layout_mbr_boot_sector_and_ext4_root(disks):
    layout = disks["qcow2"]
    with open_image(layout.path, "qcow2", readonly=True) as img:
        sector0 = img.read(0, 512)
        assert sector0[:440] == bootloader.mbr_boot_code()
        boot, root = read_partitions(sector0)
        assert (boot, root) == (layout.boot, layout.root)
        assert boot.bootable and not root.bootable and boot.start == 2048 and root.type == TYPE_LINUX
        assert root.end == img.size // 512
        vbr = img.read(boot.start * 512, 512)
        assert vbr[510:] == b"\x55\xaa" and b"FAT" in (vbr[54:57], vbr[82:85])
        assert b"SYSLINUX" in vbr                                       # SYSLINUX's boot sector code
        assert struct.unpack_from("<I", vbr, 28)[0] == boot.start      # hidden sectors = partition start
        sb = img.read(root.start * 512 + 1024, 1024)
        assert struct.unpack_from("<H", sb, 0x38)[0] == 0xEF53          # ext2/3/4 magic
        assert sb[0x78:0x88].rstrip(b"\0") == b"pyvmm-root"
        assert struct.unpack_from("<I", sb, 4)[0] * 4096 == root.sectors * 512   # blocks * 4 KiB fills it


@TOOLS
@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk"])
def test_disk_boots_under_qemu_tcg_with_seabios(disks, fmt):
    layout = disks[fmt]
    info = json.loads(_qemu_img("info", "--output", "json", layout.path).stdout)
    assert info["format"] == fmt and info["virtual-size"] == 96 << 20
    if fmt != "raw":
        check = _qemu_img("check", layout.path)
        assert check.returncode == 0, check.stdout + check.stderr
    argv = [qemu_binary(), "-accel", "tcg", "-m", "512", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-drive", f"file={layout.path},if=virtio,format={fmt}"]
    with QemuSession(argv) as q:
        q.expect(r"SYSLINUX 6\.\d+", timeout=BOOT_TIMEOUT)
        q.expect(bootloader.MENU_TITLE, timeout=BOOT_TIMEOUT)          # menu.c32 on COM1
        q.expect(r"Linux [\w.-]+, a shell in the initramfs", timeout=BOOT_TIMEOUT)
        q.expect(r"Booting linux in (\x1b\[[0-9;]*m)*\d", timeout=BOOT_TIMEOUT)   # the countdown, highlighted
        q.expect(r"Loading /vmlinuz\.*\s*ok", timeout=BOOT_TIMEOUT)
        q.expect(r"Linux version", timeout=BOOT_TIMEOUT)
        q.expect(r"pyvmm-initramfs: root /dev/vda2 mounted rw", timeout=BOOT_TIMEOUT)
        ready = q.expect(r"PYVMM-INIT-READY", timeout=BOOT_TIMEOUT).end()
        q.expect(r"# ", timeout=BOOT_TIMEOUT, after=ready)
        sent = q.send("echo CMD-$((1+1)); cat /proc/cmdline; mount | grep ' / '; sync\n")
        m = q.expect(r"CMD-2\r?\n(.*?)\r?\n(.*?)\r?\n", timeout=60, after=sent)
        assert m.group(1) == f"BOOT_IMAGE=/vmlinuz {TEST_CMDLINE} initrd=/initrd.img"
        assert re.match(r"/dev/vda2 on / type ext4 \(rw", m.group(2)), m.group(2)
        q.send("poweroff -f\n")
        assert q.wait(timeout=60) == 0
    if fmt != "raw":    # the guest wrote to its root (busybox --install): still sound
        check = _qemu_img("check", layout.path)
        assert check.returncode == 0, check.stdout + check.stderr
