"""--drive cache= modes (storage/cache.py) and QEMU's -drive if=none with
-device virtio-blk-pci,drive=ID (config.parse_qemu_drives)."""

from __future__ import annotations

import logging
import os

import pytest

from pyvmm.config import VmConfig, parse_drive, parse_qemu_drives, parse_qemu_nets
from pyvmm.errors import ConfigError
from pyvmm.storage import open_image
from pyvmm.storage.cache import CACHE_MODES, CachedImage, with_cache_mode

MIB = 1 << 20


class CountingImage:
    """A DiskImage stand-in that counts flushes."""

    format = "qcow2"
    size = MIB
    readonly = False
    path = None

    def __init__(self):
        self.data = bytearray(MIB)
        self.flushes = 0
        self.closed = False

    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def discard(self, offset, length):
        pass

    def write_zeroes(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_every_qemu_cache_mode_parses(mode):
    assert parse_drive(f"file=/x,cache={mode}").cache == mode


def test_unknown_cache_mode_is_refused():
    with pytest.raises(ConfigError, match="cache mode"):
        parse_drive("file=/x,cache=sometimes")
    with pytest.raises(ConfigError):
        VmConfig.from_dict({"drives": [{"file": "/x", "cache": "fast"}]})


def test_writethrough_flushes_after_each_write_and_unsafe_never():
    image = CountingImage()
    wt = with_cache_mode(image, "writethrough")
    wt.write(0, b"a" * 512)
    wt.write_zeroes(0, 512)
    wt.discard(0, 512)
    assert image.flushes == 3
    wt.flush()
    assert image.flushes == 4
    unsafe = with_cache_mode(image, "unsafe")
    unsafe.write(0, b"b")
    unsafe.flush()
    assert image.flushes == 4 and unsafe.read(0, 1) == b"b"
    assert with_cache_mode(image, "writeback") is image


def test_none_goes_around_the_page_cache_on_a_file_system_with_o_direct(tmp_path):
    path = tmp_path / "d.raw"             # /tmp here is ext4, which has O_DIRECT
    path.write_bytes(os.urandom(2 * MIB))
    image = CachedImage(open_image(str(path), "raw"), "none")
    try:
        assert image.direct_fd >= 0
        assert image.read(4096, 8192) == path.read_bytes()[4096:4096 + 8192]
        image.write(MIB - 4096, b"\x11" * (MIB + 4096))   # more than one bounce buffer
        assert image.direct_requests == 2
        image.write(3, b"unaligned")                      # the ordinary descriptor
        assert image.direct_requests == 2
        assert image.read(0, 12) == path.read_bytes()[:3] + b"unaligned"
        image.flush()
    finally:
        image.close()
    data = path.read_bytes()
    assert data[MIB - 4096:] == b"\x11" * (MIB + 4096) and len(data) == 2 * MIB


def test_none_falls_back_with_one_warning_where_o_direct_is_refused(tmp_path, monkeypatch, caplog):
    """tmpfs before Linux 6.6 fails open(O_DIRECT) with EINVAL: stand in for it."""
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(MIB))
    real_open = os.open

    def open_without_direct(p, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct)
    with caplog.at_level(logging.WARNING, logger="pyvmm.storage.cache"):
        image = CachedImage(open_image(str(path), "raw"), "directsync")
    monkeypatch.undo()
    try:
        assert image.direct_fd == -1 and image.write_through
        assert len([r for r in caplog.records if "O_DIRECT" in r.getMessage()]) == 1
        image.write(0, b"z" * 4096)
        assert image.read(0, 4096) == b"z" * 4096 and image.direct_requests == 0
    finally:
        image.close()


def test_none_on_a_non_raw_image_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="pyvmm.storage.cache"):
        image = CachedImage(CountingImage(), "none")
    assert image.direct_fd == -1 and "not raw" in caplog.text
    image.write(0, b"q" * 4096)
    assert image.image.flushes == 0 and image.read(0, 4) == b"qqqq"


def test_qemu_drive_if_none_with_device():
    drives = parse_qemu_drives(["file=/a,if=none,id=d1,cache=none", "file=/b,format=raw"],
                               ["virtio-net-pci,netdev=n0", "virtio-blk-pci,drive=d1"])
    assert [(d.file, d.id, d.cache) for d in drives] == [("/b", None, "writeback"), ("/a", "d1", "none")]
    # -device virtio-blk-pci does not trouble the NIC parser
    assert parse_qemu_nets(["tap,id=n0,ifname=tap9"], ["virtio-blk-pci,drive=d1", "virtio-net-pci,netdev=n0"])


@pytest.mark.parametrize("drives, devices, message", [
    (["file=/a,if=none,id=d1"], [], "has no -device"),
    (["file=/a,if=none"], ["virtio-blk-pci,drive=d1"], "needs id=ID"),
    (["file=/a,if=none,id=d1"], ["virtio-blk-pci,drive=d2"], "names no"),
    (["file=/a,if=none,id=d1"], ["virtio-blk-pci,drive=d1", "virtio-blk-pci,drive=d1"], "names no"),
    (["file=/a,if=scsi"], [], "only if=virtio"),           # if=ide is parse_ide_drives' (tests/devices/test_ide.py)
])
def test_qemu_drive_errors(drives, devices, message):
    with pytest.raises(ConfigError, match=message):
        parse_qemu_drives(drives, devices)
    with pytest.raises(ConfigError):
        parse_drive("file=/a,if=none,id=x")                # --drive alone cannot be if=none


def test_builder_opens_the_disk_in_its_cache_mode(tmp_path):
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.cpu import CpuState
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MIB))
    cfg = VmConfig(engine="bt", mem_mib=32, drives=[parse_drive(f"file={disk},cache=directsync,id=d0")])
    machine = build_machine(cfg, lambda b: None, boot=lambda memory: BootResult(cpu=CpuState(), protocol="test"))
    try:
        image = machine.devices["d0"].device.image
        assert isinstance(image, CachedImage) and image.mode == "directsync" and image.direct_fd >= 0
    finally:
        destroy_machine(machine)
