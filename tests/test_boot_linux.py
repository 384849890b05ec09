"""Linux direct boot: bzImage header, payload decompression, ELF loading, zero page, loader.

Tests marked `debian` use the Debian cloud kernel (linux-image-cloud-amd64)
and fail when it is absent (scripts/setup.sh installs it); the rest build tiny kernels of their own."""

import bz2
import gzip
import lzma
import os
import random
import struct
import sys
import types

import pytest

from pyvmm.boot import layout
from pyvmm.boot import imagefile as imagefile_mod
from pyvmm.boot import loader as loader_mod
from pyvmm.boot.bzimage import SETUP_HEADER_END, SetupHeader, parse_bzimage
from pyvmm.boot.decompress import LZ4_LEGACY_MAGIC, decompress_payload, detect_format
from pyvmm.boot.elf import elf_notes, is_linux_elf, load_elf, parse_elf
from pyvmm.boot.linux import load_linux
from pyvmm.boot.loader import load_guest
from pyvmm.boot.result import BootResult
from pyvmm.boot.zeropage import ZeroPage
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError, ImageError
from pyvmm.memory import GuestMemory
from tests.hostfacts import from_setup, require_debian_cloud_kernel

debian = from_setup(paths=["/boot/vmlinuz-*-cloud-amd64"], package="linux-image-cloud-amd64")
MIB = 1 << 20
KBASE = 0x1000000


# -- tiny kernels -------------------------------------------------------------

def make_elf(code: bytes = b"\xf4" * 64, paddr: int = KBASE, bss: int = 0x2000,
             owner: bytes = b"Linux") -> bytes:
    """An ELF64 'vmlinux': one PT_LOAD (code + bss) and one PT_NOTE."""
    name = owner + b"\0"
    note = struct.pack("<III", len(name), 4, 0x100) + name.ljust((len(name) + 3) & ~3, b"\0") + b"6.1\0"
    phoff, phnum = 64, 2
    code_off = phoff + 56 * phnum
    note_off = code_off + len(code)
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                       2, 62, 1, paddr, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0xFFFFFFFF80000000 + paddr, paddr,
                       len(code), len(code) + bss, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + code + note


def lz4_legacy(data: bytes, block: int = 4096) -> bytes:
    import lz4.block
    out = [struct.pack("<I", LZ4_LEGACY_MAGIC)]
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i:i + block], store_size=False)
        out.append(struct.pack("<I", len(c)) + c)
    return b"".join(out)


def compress(fmt: str, data: bytes) -> bytes:
    """Compresses as the kernel build does: size word appended except for gzip."""
    if fmt == "gzip":
        return gzip.compress(data)
    if fmt == "xz":
        c = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif fmt == "lzma":
        c = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif fmt == "bzip2":
        c = bz2.compress(data)
    elif fmt == "lz4":
        c = lz4_legacy(data)
    elif fmt == "zstd":
        import zstandard
        c = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    return c + struct.pack("<I", len(data))


def make_bzimage(payload: bytes, *, xloadflags: int = 1, init_size: int = 0x100000,
                 version: int = 0x020F, cmdline_size: int = 2047) -> bytes:
    """A minimal bzImage: 4 setup sectors of header, then a 'kernel' holding the payload."""
    setup = bytearray(5 * 512)
    kernel = b"\x90" * 0x200 + payload
    hdr = SetupHeader(setup_sects=4, syssize=(len(kernel) + 15) // 16, boot_flag=0xAA55,
                      jump=0xEB | ((SETUP_HEADER_END - 0x202) << 8), header=0x53726448,
                      version=version, loadflags=1, code32_start=0x100000,
                      initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000, relocatable_kernel=1,
                      xloadflags=xloadflags, cmdline_size=cmdline_size, payload_offset=0x200,
                      payload_length=len(payload), pref_address=KBASE, init_size=init_size)
    hdr.pack_into(setup)
    return bytes(setup) + kernel


@pytest.fixture
def mem512():
    m = GuestMemory(512 * MIB)
    yield m
    m.close()


@pytest.fixture
def mem32():
    m = GuestMemory(32 * MIB)
    yield m
    m.close()


def write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def zero_page(mem) -> ZeroPage:
    return ZeroPage.from_bytes(mem.read(layout.ZERO_PAGE_ADDR, 4096))


# -- decompression --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd"])
def test_decompress_round_trip(fmt):
    elf = make_elf(code=bytes(range(256)) * 200)
    payload = compress(fmt, elf)
    assert detect_format(payload) == fmt
    assert decompress_payload(payload) == elf


def test_decompress_errors():
    with pytest.raises(ImageError, match="unknown kernel compression"):
        decompress_payload(b"\x00" * 64)
    bad = bytearray(compress("xz", make_elf()))
    bad[40] ^= 0xFF
    with pytest.raises(ImageError, match="corrupt xz"):
        decompress_payload(bytes(bad))
    wrong_size = compress("bzip2", make_elf())[:-4] + struct.pack("<I", 3)
    with pytest.raises(ImageError, match="size word"):
        decompress_payload(wrong_size)
    with pytest.raises(ImageError, match="lzo"):
        decompress_payload(b"\x89LZO\0" + bytes(32))


# -- ELF --------------------------------------------------------------------------

def test_load_elf_zeroes_bss(mem32):
    mem32.fill(KBASE, 0x3000, 0xAA)
    img = load_elf(mem32, make_elf(code=b"\xf4" * 16, bss=0x2000))
    assert (img.entry, img.low, img.high) == (KBASE, KBASE, KBASE + 16 + 0x2000)
    assert mem32.read(KBASE, 16) == b"\xf4" * 16
    assert mem32.read(KBASE + 16, 0x2000) == bytes(0x2000)
    assert is_linux_elf(make_elf()) and not is_linux_elf(make_elf(owner=b"GNU"))
    assert [(n.owner, n.type, n.desc) for n in elf_notes(make_elf())] == [("Linux", 0x100, b"6.1\0")]


def test_load_elf_outside_ram(mem32):
    with pytest.raises(ImageError, match="outside guest RAM"):
        load_elf(mem32, make_elf(paddr=40 * MIB))
    with pytest.raises(ImageError, match="kernel needs 49 MiB"):
        load_elf(mem32, make_elf(bss=48 * MIB))
    with pytest.raises(ImageError, match="truncated ELF"):
        load_elf(mem32, make_elf()[:100])


# -- synthetic kernels through load_linux ---------------------------------------------

def test_bzimage_host_decompressed(tmp_path, mem512):
    elf = make_elf(code=b"\x0f\x0b" * 100)
    kpath = write(tmp_path, "bzImage", make_bzimage(compress("zstd", elf)))
    rd = os.urandom(3 * 4096 + 5)
    res = load_linux(mem512, VmConfig(kernel=kpath, initrd=[write(tmp_path, "rd", rd)], cmdline="console=ttyS0"))
    assert res.protocol == "linux-elf (host-decompressed zstd)"
    assert res.cpu.rip == KBASE and res.cpu.long_mode and res.cpu.regs["rsi"] == layout.ZERO_PAGE_ADDR
    assert mem512.read(KBASE, 200) == b"\x0f\x0b" * 100
    zp = zero_page(mem512)
    addr, size = zp.ramdisk
    assert size == len(rd) and addr % 4096 == 0 and mem512.read(addr, size) == rd
    assert addr + size <= 512 * MIB and addr + size > 512 * MIB - 8192    # as high as possible
    assert kpath in res.summary


def test_bzimage_not_decompressed(tmp_path, mem512):
    image = make_bzimage(compress("gzip", make_elf()))
    kpath = write(tmp_path, "bzImage", image)
    res = load_linux(mem512, VmConfig(kernel=kpath, host_decompress=False))
    assert res.protocol == "linux-bzimage"
    assert res.cpu.rip == KBASE + 0x200 and res.cpu.long_mode
    kernel = image[5 * 512:]
    assert mem512.read(KBASE, len(kernel)) == kernel
    assert zero_page(mem512).header.code32_start == KBASE


def test_32bit_bzimage_enters_protected_mode(tmp_path, mem512):
    kpath = write(tmp_path, "bzImage", make_bzimage(compress("gzip", make_elf()), xloadflags=0))
    res = load_linux(mem512, VmConfig(kernel=kpath))
    assert res.protocol == "linux-bzimage"
    assert res.cpu.rip == KBASE and not res.cpu.long_mode and res.cpu.regs["rsi"] == layout.ZERO_PAGE_ADDR


def test_bare_vmlinux_gets_synthesised_header(tmp_path, mem512):
    kpath = write(tmp_path, "vmlinux", make_elf())
    res = load_guest(mem512, VmConfig(kernel=kpath, cmdline="root=/dev/vda"))
    assert res.protocol == "linux-elf" and res.cpu.rip == KBASE
    h = zero_page(mem512).header
    assert (h.boot_flag, h.header, h.version, h.type_of_loader) == (0xAA55, 0x53726448, 0x020F, 0xFF)
    assert mem512.read(layout.CMDLINE_ADDR, 14) == b"root=/dev/vda\0"


def test_old_protocol_rejected():
    with pytest.raises(ImageError, match="2.05 is too old"):
        parse_bzimage(make_bzimage(compress("gzip", make_elf()), version=0x0205))


def test_cmdline_too_long(tmp_path, mem512):
    kpath = write(tmp_path, "bzImage", make_bzimage(compress("gzip", make_elf()), cmdline_size=16))
    with pytest.raises(ImageError, match="command line is 17 bytes"):
        load_linux(mem512, VmConfig(kernel=kpath, cmdline="x" * 17))


def test_initrd_does_not_fit(tmp_path, mem32):
    kpath = write(tmp_path, "vmlinux", make_elf())
    rpath = write(tmp_path, "big.rd", bytes(20 * MIB))
    with pytest.raises(ImageError, match="big.rd: initrd of 20 MiB does not fit"):
        load_linux(mem32, VmConfig(kernel=kpath, initrd=[rpath]))


def test_initrd_goes_below_kernel_when_above_is_full(tmp_path, mem32):
    # kernel footprint up to 31 MiB: a 4 MiB initrd only fits below 16 MiB
    kpath = write(tmp_path, "vmlinux", make_elf(bss=15 * MIB))
    rd = bytes(range(256)) * (4 * MIB // 256)
    load_linux(mem32, VmConfig(kernel=kpath, initrd=[write(tmp_path, "rd", rd)]))
    addr, size = zero_page(mem32).ramdisk
    assert addr + size <= KBASE and addr >= layout.HIMEM_START
    assert mem32.read(addr, size) == rd


# -- the loader ---------------------------------------------------------------------

def test_loader_file_errors(tmp_path, mem32):
    with pytest.raises(ConfigError, match="nope/bzImage: no such file"):
        load_guest(mem32, VmConfig(kernel=str(tmp_path / "nope/bzImage")))
    with pytest.raises(ImageError, match="empty"):
        load_guest(mem32, VmConfig(kernel=write(tmp_path, "empty", b"")))
    with pytest.raises(ConfigError, match="is a directory"):
        load_guest(mem32, VmConfig(kernel=str(tmp_path)))
    with pytest.raises(ConfigError, match="initrd .*missing.rd: no such file"):
        load_guest(mem32, VmConfig(kernel=write(tmp_path, "k", make_elf()),
                                   initrd=[str(tmp_path / "missing.rd")]))
    with pytest.raises(ConfigError, match="no kernel"):
        load_guest(mem32, VmConfig())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_loader_permission_denied(tmp_path, mem32):
    p = write(tmp_path, "secret", make_elf())
    os.chmod(p, 0)
    with pytest.raises(ConfigError, match="secret: permission denied"):
        load_guest(mem32, VmConfig(kernel=p))


def test_loader_permission_denied_reported(tmp_path, mem32, monkeypatch):
    """The same path as above, for runs as root: open() itself refuses."""
    def refuse(path, mode="r"):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(imagefile_mod, "open", refuse, raising=False)
    with pytest.raises(ConfigError, match=r"kernel /some/bzImage: permission denied$"):
        load_guest(mem32, VmConfig(kernel="/some/bzImage"))


def test_loader_random_bytes(tmp_path, mem32, monkeypatch):
    monkeypatch.setattr(loader_mod, "PROTOCOL_MODULES", ("pyvmm.boot.no_such_protocol",))
    p = write(tmp_path, "junk", random.Random(1).randbytes(8192))
    with pytest.raises(ImageError, match=r"junk: not a bzImage, ELF kernel or Multiboot image"):
        load_guest(mem32, VmConfig(kernel=p))


def test_loader_truncated_bzimage(tmp_path, mem32):
    p = write(tmp_path, "trunc", make_bzimage(compress("gzip", make_elf()))[:0x400])
    with pytest.raises(ImageError, match="trunc: truncated bzImage"):
        load_guest(mem32, VmConfig(kernel=p))


def test_loader_offers_other_images_to_protocol_modules(tmp_path, mem32, monkeypatch):
    seen = []
    fake = types.ModuleType("pyvmm.boot.fakeproto")
    fake.probe = lambda image: image.startswith(b"FAKE")
    fake.load = lambda memory, config, image: seen.append(image) or BootResult(cpu=None, protocol="fake")
    monkeypatch.setitem(sys.modules, "pyvmm.boot.fakeproto", fake)
    monkeypatch.setattr(loader_mod, "PROTOCOL_MODULES", ("pyvmm.boot.absent", "pyvmm.boot.fakeproto"))
    res = load_guest(mem32, VmConfig(kernel=write(tmp_path, "img", b"FAKE kernel")))
    assert res.protocol == "fake" and seen == [b"FAKE kernel"]


# -- the Debian kernel ------------------------------------------------------------------

@pytest.fixture(scope="module")
def debian_kernel():
    path = require_debian_cloud_kernel()
    with open(path, "rb") as f:
        data = f.read()
    bz = parse_bzimage(data)
    return types.SimpleNamespace(path=path, data=data, bz=bz, vmlinux=decompress_payload(bz.payload))


@debian
def test_debian_setup_header(debian_kernel):
    h = debian_kernel.bz.header
    assert h.version >= 0x020F and h.is_64bit and h.relocatable
    assert h.cmdline_size == 2047 and h.init_size > len(debian_kernel.bz.kernel)
    assert detect_format(debian_kernel.bz.payload) == "lz4"


@debian
def test_debian_payload_is_vmlinux(debian_kernel):
    v = debian_kernel.vmlinux
    elf = parse_elf(v)
    assert elf.is_64bit and 0x1000000 <= elf.entry < 0x2000000
    assert is_linux_elf(v)
    assert any(n.owner == "Xen" and n.type == 18 for n in elf_notes(v, elf))   # PVH entry note


@debian
def test_debian_load_linux(debian_kernel, mem512, tmp_path):
    rd = os.urandom(100000)
    cfg = VmConfig(kernel=debian_kernel.path, initrd=[write(tmp_path, "rd", rd)], cmdline="console=ttyS0 quiet")
    res = load_guest(mem512, cfg)
    elf = parse_elf(debian_kernel.vmlinux)
    assert res.protocol == "linux-elf (host-decompressed lz4)"
    assert res.cpu.long_mode and res.cpu.rip == elf.entry and res.cpu.regs["rsi"] == layout.ZERO_PAGE_ADDR
    first = elf.loads()[0]
    assert mem512.read(first.p_paddr, 4096) == debian_kernel.vmlinux[first.p_offset:first.p_offset + 4096]
    zp = zero_page(mem512)
    h = zp.header
    assert h.type_of_loader == 0xFF and zp.cmd_line_ptr == layout.CMDLINE_ADDR
    assert mem512.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert zp.e820() == layout.e820_map(mem512.ram_ranges())
    addr, size = zp.ramdisk
    assert size == len(rd) and addr % 4096 == 0 and mem512.read(addr, size) == rd
    assert addr >= KBASE + h.init_size and addr + size <= h.initrd_addr_max + 1


@debian
def test_debian_bzimage_entry(debian_kernel, mem512):
    res = load_linux(mem512, VmConfig(kernel=debian_kernel.path, host_decompress=False),
                     image=debian_kernel.data)
    assert res.protocol == "linux-bzimage" and res.cpu.rip == KBASE + 0x200
    assert mem512.read(KBASE, 4096) == debian_kernel.bz.kernel[:4096]


@debian
@pytest.mark.parametrize("host_decompress", [True, False])
def test_debian_kernel_larger_than_ram(debian_kernel, mem32, host_decompress):
    cfg = VmConfig(kernel=debian_kernel.path, host_decompress=host_decompress)
    with pytest.raises(ImageError, match=rf"{debian_kernel.path}: kernel needs \d+ MiB"):
        load_linux(mem32, cfg, image=debian_kernel.data)


@debian
def test_debian_truncated(debian_kernel, tmp_path, mem32):
    p = write(tmp_path, "short", debian_kernel.data[:len(debian_kernel.data) // 2])
    with pytest.raises(ImageError, match="short: truncated bzImage"):
        load_guest(mem32, VmConfig(kernel=p))
