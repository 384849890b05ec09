"""boot/elf.py, the one ELF parser of the Linux, Multiboot and PVH loaders,
against cut-off and hostile files: each must give a one-line ImageError (never
a struct.error or IndexError) and write nothing into guest memory."""

from __future__ import annotations

import random
import struct

import pytest

from pyvmm.boot import elf, multiboot, pvh
from pyvmm.config import VmConfig
from pyvmm.errors import ImageError
from pyvmm.memory import GuestMemory
from tests.asm import elf_image

MIB = 1 << 20
CODE = b"\x90" * 16 + b"\xf4" * 16
PVH_NOTE = ("Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY, (0x100000).to_bytes(4, "little"))


@pytest.fixture
def mem():
    m = GuestMemory(16 * MIB)
    yield m
    m.close()


def image(elf64: bool = False, segments=None, notes=(PVH_NOTE,)) -> bytearray:
    segs = segments or [(0x100000, 0x100000, CODE, 0x1000)]
    return bytearray(elf_image(segs, 0x100000, notes=list(notes), elf64=elf64))


def phdr_offset(img: bytes, i: int) -> int:
    """File offset of program header i (the header fields are at fixed places)."""
    if img[4] == elf.ELFCLASS64:
        phoff, = struct.unpack_from("<Q", img, 32)
        size, = struct.unpack_from("<H", img, 54)
    else:
        phoff, = struct.unpack_from("<I", img, 28)
        size, = struct.unpack_from("<H", img, 42)
    return phoff + i * size


def set_phdr(img: bytearray, i: int, **fields: int) -> None:
    _, names = elf._PHDR_LAYOUT[img[4]]
    fmt = "<IIQQQQQQ" if img[4] == elf.ELFCLASS64 else "<IIIIIIII"
    base = phdr_offset(img, i)
    values = dict(zip(names, struct.unpack_from(fmt, img, base)))
    values.update(fields)
    struct.pack_into(fmt, img, base, *(values[n] for n in names))


def one_line_error(excinfo, pattern: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    assert pattern in message, message


@pytest.mark.parametrize("elf64", [False, True])
def test_phdr_table_past_eof(elf64):
    img = image(elf64)
    struct.pack_into("<H", img, 56 if elf64 else 44, 0xFFFF)     # e_phnum
    with pytest.raises(ImageError) as e:
        elf.parse_elf(bytes(img))
    one_line_error(e, "program header table")
    assert not pvh.probe(bytes(img))


@pytest.mark.parametrize("elf64", [False, True])
def test_phdr_table_offset_far_away(elf64):
    img = image(elf64)
    if elf64:
        struct.pack_into("<Q", img, 32, 1 << 62)
    else:
        struct.pack_into("<I", img, 28, 0xFFFFFFF0)
    with pytest.raises(ImageError) as e:
        elf.parse_elf(bytes(img))
    one_line_error(e, "past its end")


def test_phentsize_too_small():
    img = image()
    struct.pack_into("<H", img, 42, 8)
    with pytest.raises(ImageError) as e:
        elf.parse_elf(bytes(img))
    one_line_error(e, "program header size 8 is too small")


@pytest.mark.parametrize("elf64", [False, True])
def test_overlapping_segments(mem, elf64):
    img = image(elf64, segments=[(0x100000, 0x100000, CODE, 0x2000),
                                 (0x101000, 0x101000, CODE, 0x1000)])
    with pytest.raises(ImageError) as e:
        elf.load_elf(mem, bytes(img))
    one_line_error(e, "ELF segments 0 and 1 overlap at 0x101000")
    assert mem.read(0x100000, len(CODE)) == bytes(len(CODE))      # nothing written
    with pytest.raises(ImageError) as e:
        pvh.load(mem, VmConfig(), bytes(img))
    one_line_error(e, "PVH kernel: ELF segments 0 and 1 overlap")


def test_adjacent_segments_are_fine(mem):
    img = image(segments=[(0x100000, 0x100000, CODE, 0x1000), (0x101000, 0x101000, CODE, 0x1000)])
    loaded = elf.load_elf(mem, bytes(img))
    assert (loaded.low, loaded.high) == (0x100000, 0x102000)
    assert mem.read(0x101000, len(CODE)) == CODE


@pytest.mark.parametrize("elf64", [False, True])
def test_huge_segment(mem, elf64):
    img = image(elf64)
    set_phdr(img, 0, p_memsz=(1 << 40) if elf64 else 0xFFFFF000)
    with pytest.raises(ImageError) as e:
        elf.load_elf(mem, bytes(img))
    one_line_error(e, "kernel needs")


def test_segment_at_top_of_address_space(mem):
    img = image(elf64=True)
    set_phdr(img, 0, p_paddr=(1 << 64) - 0x1000)
    with pytest.raises(ImageError) as e:
        elf.load_elf(mem, bytes(img))
    one_line_error(e, "outside guest RAM")


def test_segment_file_bytes_past_eof(mem):
    img = image()
    set_phdr(img, 0, p_offset=0xFFFFFF00)
    with pytest.raises(ImageError) as e:
        elf.load_elf(mem, bytes(img), what="multiboot kernel")
    one_line_error(e, "multiboot kernel: truncated ELF file: segment 0")


def test_filesz_over_memsz(mem):
    img = image()
    set_phdr(img, 0, p_memsz=4)
    with pytest.raises(ImageError) as e:
        elf.load_elf(mem, bytes(img))
    one_line_error(e, "exceeds memory size")


@pytest.mark.parametrize("elf64", [False, True])
def test_note_past_segment_end(mem, elf64):
    img = image(elf64)
    note = phdr_offset(img, 1)
    _, names = elf._PHDR_LAYOUT[img[4]]
    fmt = "<IIQQQQQQ" if elf64 else "<IIIIIIII"
    p_offset = dict(zip(names, struct.unpack_from(fmt, img, note)))["p_offset"]
    struct.pack_into("<I", img, p_offset + 4, 0x1000)           # descsz far past the segment
    with pytest.raises(ImageError) as e:
        list(elf.elf_notes(bytes(img)))
    one_line_error(e, "runs past its segment")
    assert not pvh.probe(bytes(img))
    with pytest.raises(ImageError) as e:
        pvh.load(mem, VmConfig(), bytes(img))
    one_line_error(e, "runs past its segment")


def test_note_segment_past_eof():
    img = image()
    set_phdr(img, 1, p_filesz=0x10000)
    with pytest.raises(ImageError) as e:
        elf.pvh_entry(bytes(img))
    one_line_error(e, "note segment")


@pytest.mark.parametrize("elf64", [False, True])
def test_pvh_entry_read_from_the_one_parser(elf64):
    assert elf.pvh_entry(bytes(image(elf64))) == 0x100000
    assert elf.pvh_entry(bytes(image(elf64, notes=[("GNU", 18, b"\0" * 4)]))) is None


def test_physical_entry_of_higher_half_kernel():
    img = elf_image([(0x200000, 0xC0200000, CODE, 0x100)], 0xC020000C)
    assert elf.parse_elf(img).physical_entry() == 0x20000C


@pytest.mark.parametrize("elf64", [False, True])
def test_every_truncation_is_a_one_line_error(mem, elf64):
    """Each prefix of a valid PVH kernel (its note segment is last) gives a
    one-line ImageError; only the segment loader accepts a file cut after
    the code it loads."""
    full = bytes(image(elf64))
    code_end = elf.parse_elf(full).loads()[0].p_offset + len(CODE)
    for n in range(len(full)):
        cut = full[:n]
        loaders = [lambda: pvh.load(mem, VmConfig(), cut), lambda: list(elf.elf_notes(cut))]
        if n < code_end:
            loaders.append(lambda: elf.load_elf(mem, cut))
        for load in loaders:
            with pytest.raises(ImageError) as e:
                load()
            assert "\n" not in str(e.value)
        assert not pvh.probe(cut)
    assert pvh.probe(full)


def test_random_corruption_never_escapes_as_another_error(mem):
    rng = random.Random(15)
    full = bytes(image(elf64=True))
    for _ in range(400):
        img = bytearray(full)
        for _ in range(rng.randint(1, 4)):
            img[rng.randrange(len(img))] = rng.randrange(256)
        for load in (lambda: elf.load_elf(mem, bytes(img)), lambda: pvh.load(mem, VmConfig(), bytes(img)),
                     lambda: multiboot.probe(bytes(img))):
            try:
                load()
            except ImageError as e:
                assert "\n" not in str(e)


def with_note_section(img: bytes, desc: bytes, shentsize: int = 40) -> bytes:
    """An ELF32 whose only note sits in a SHT_NOTE section (no PT_NOTE)."""
    name = b"Xen\0"
    blob = struct.pack("<III", len(name), len(desc), elf.XEN_ELFNOTE_PHYS32_ENTRY) + name + desc
    note_off = len(img)
    shoff = note_off + len(blob)
    null = bytes(shentsize)
    note = struct.pack("<IIIIII", 0, elf.SHT_NOTE, 0, 0, note_off, len(blob)).ljust(shentsize, b"\0")
    out = bytearray(img + blob + null + note)
    struct.pack_into("<I", out, 32, shoff)
    struct.pack_into("<HH", out, 46, shentsize, 2)
    return bytes(out)


def test_pvh_note_in_a_section_only():
    img = with_note_section(bytes(image(notes=())), (0x100000).to_bytes(4, "little"))
    assert list(elf.elf_notes(img)) == []                   # no PT_NOTE
    assert elf.pvh_entry(img) == 0x100000 and pvh.probe(img)
    # a section table with too small entries is ignored, as sections are optional
    assert elf.pvh_entry(with_note_section(bytes(image(notes=())), bytes(4), shentsize=20)) is None
