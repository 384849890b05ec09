"""newc cpio writer and reader; the default initramfs."""

import gzip
import stat
import struct
import subprocess

import pytest

from pyvmm.errors import ConfigError, ImageError
from pyvmm.guest.cpio import CpioWriter, read_cpio
from pyvmm.guest.initramfs import (READY_MARKER, build_default_initramfs,
                                   default_initramfs_path, write_default_initramfs)
from tests.hostfacts import from_setup

BUSYBOX = "/bin/busybox"


def _archive():
    w = CpioWriter()
    w.add_dir("/bin")
    w.add_file("/bin/hello", b"abcde", 0o755)
    w.add_file("etc/empty", b"")
    w.add_symlink("/bin/sh", "hello")
    w.add_char_device("/dev/console", 5, 1)
    return w.finish()


def test_cpio_roundtrip():
    entries = read_cpio(_archive())
    assert [e.name for e in entries] == ["bin", "bin/hello", "etc/empty", "bin/sh", "dev/console"]
    by = {e.name: e for e in entries}
    assert by["bin"].is_dir and stat.S_IMODE(by["bin"].mode) == 0o755
    assert by["bin/hello"].is_file and by["bin/hello"].data == b"abcde"
    assert stat.S_IMODE(by["bin/hello"].mode) == 0o755
    assert by["etc/empty"].data == b"" and stat.S_IMODE(by["etc/empty"].mode) == 0o644
    assert by["bin/sh"].is_symlink and by["bin/sh"].data == b"hello"
    con = by["dev/console"]
    assert con.is_char_device and (con.rdevmajor, con.rdevminor) == (5, 1)
    assert len({e.ino for e in entries}) == len(entries)


def test_cpio_layout_alignment_and_trailer():
    data = _archive()
    assert len(data) % 4 == 0
    assert data[:6] == b"070701"
    # Every header starts 4-aligned: find them all by magic.
    pos = 0
    starts = []
    while (pos := data.find(b"070701", pos)) >= 0:
        starts.append(pos)
        pos += 1
    assert starts and all(s % 4 == 0 for s in starts)
    trailer = data[starts[-1]:]
    assert b"TRAILER!!!\0" in trailer
    # File data begins 4-aligned right after the padded name.
    i = data.index(b"abcde")
    assert i % 4 == 0


@from_setup(programs=["cpio"], package="cpio")
def test_cpio_readable_by_gnu_cpio():
    out = subprocess.run(["cpio", "-it", "--quiet"], input=_archive(), capture_output=True,
                         check=True).stdout.decode().split()
    assert out == ["bin", "bin/hello", "etc/empty", "bin/sh", "dev/console"]


def test_cpio_rejects_bad_input():
    w = CpioWriter()
    w.add_file("a", b"")
    with pytest.raises(ImageError):
        w.add_file("/a", b"x")  # duplicate
    with pytest.raises(ImageError):
        w.add_dir("/")
    w.finish()
    with pytest.raises(ImageError):
        w.finish()
    with pytest.raises(ImageError):
        read_cpio(b"not a cpio archive at all" * 10)
    with pytest.raises(ImageError):
        read_cpio(_archive()[:-124])  # trailer cut off


needs_busybox = from_setup(paths=[BUSYBOX], package="busybox-static")


@needs_busybox
def test_default_initramfs_contents():
    image = build_default_initramfs(BUSYBOX)
    assert image[:2] == b"\x1f\x8b"  # gzip
    entries = {e.name: e for e in read_cpio(gzip.decompress(image))}
    init = entries["init"]
    assert init.is_file and init.mode & 0o111
    assert init.data.startswith(b"#!/bin/busybox sh\n")
    assert READY_MARKER.encode() in init.data
    assert b"poweroff -f" in init.data
    with open(BUSYBOX, "rb") as f:
        assert entries["bin/busybox"].data == f.read()
    assert entries["bin/sh"].is_symlink
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "root"):
        assert entries[d].is_dir
    con, null = entries["dev/console"], entries["dev/null"]
    assert (con.rdevmajor, con.rdevminor) == (5, 1) and con.is_char_device
    assert (null.rdevmajor, null.rdevminor) == (1, 3) and null.is_char_device
    # Reproducible: same busybox, same bytes.
    assert build_default_initramfs(BUSYBOX) == image


@needs_busybox
def test_init_script_parses():
    init = {e.name: e for e in read_cpio(gzip.decompress(build_default_initramfs(BUSYBOX)))}["init"]
    subprocess.run([BUSYBOX, "sh", "-n", "/dev/stdin"], input=init.data, check=True)


def test_missing_busybox(tmp_path):
    with pytest.raises(ConfigError, match="busybox-static"):
        build_default_initramfs(str(tmp_path / "nope"))
    fake = tmp_path / "busybox"
    fake.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(ConfigError, match="busybox-static"):
        build_default_initramfs(str(fake))


def test_dynamic_busybox_refused(tmp_path):
    # A minimal 64-bit ELF header with one PT_INTERP program header.
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)          # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)      # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 3)              # PT_INTERP
    fake = tmp_path / "busybox"
    fake.write_bytes(bytes(ehdr + phdr))
    with pytest.raises(ConfigError, match="dynamically linked"):
        build_default_initramfs(str(fake))


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_initramfs_path() == tmp_path / "pyvmm" / "initramfs.cpio.gz"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_initramfs_path() == tmp_path / "home" / ".cache" / "pyvmm" / "initramfs.cpio.gz"


@needs_busybox
def test_write_default_initramfs(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = write_default_initramfs()
    assert path == tmp_path / "pyvmm" / "initramfs.cpio.gz"
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert [p.name for p in path.parent.iterdir()] == ["initramfs.cpio.gz"]
