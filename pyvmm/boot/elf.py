"""ELF kernels: headers, PT_LOAD segments, notes, loading at physical addresses.

The one ELF parser of pyvmm: the Linux (vmlinux), Multiboot and PVH loaders
all read their kernels here.  Only what a loader needs: the ELF header, the
program headers and notes (ELF32 and ELF64, little-endian), including the
Xen PHYS32_ENTRY note that says a kernel can be booted by PVH.  Segments go
to their p_paddr, as a boot loader does.

Every offset and size is checked against the file before it is used, so a
cut-off or hostile file gets a one-line ImageError, never a struct.error.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ImageError
from ..memory import GuestMemory
from .layout import HIMEM_START

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
XEN_NOTE_OWNER = "Xen"
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Header layouts as struct formats with their field names; ELF32 and ELF64
# order the program header fields differently.
_EHDR_IDENT = struct.Struct("<4sBBBBB7x")          # magic, class, data, version, osabi, abiversion
_EHDR_REST = {
    ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"),
    ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH"),
}
_EHDR_FIELDS = ("e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff", "e_flags",
                "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize", "e_shnum", "e_shstrndx")
_PHDR_LAYOUT = {
    ELFCLASS32: (struct.Struct("<IIIIIIII"),
                 ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_flags", "p_align")),
    ELFCLASS64: (struct.Struct("<IIQQQQQQ"),
                 ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_align")),
}
# sh_type, sh_offset, sh_size of a section header, and the least e_shentsize.
_SHDR_TYPE_OFFSET_SIZE = {
    ELFCLASS32: (struct.Struct("<4xI8xII"), 40),
    ELFCLASS64: (struct.Struct("<4xI16xQQ"), 64),
}
_NOTE_HDR = struct.Struct("<III")                  # namesz, descsz, type


@dataclass
class ProgramHeader:
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass
class ElfFile:
    """The parsed headers of an ELF file."""
    elf_class: int            # ELFCLASS32 or ELFCLASS64
    machine: int
    elf_type: int
    entry: int
    phdrs: list[ProgramHeader]
    shoff: int = 0
    shentsize: int = 0
    shnum: int = 0

    @property
    def is_64bit(self) -> bool:
        return self.elf_class == ELFCLASS64

    def loads(self) -> list[ProgramHeader]:
        return [p for p in self.phdrs if p.p_type == PT_LOAD and p.p_memsz]

    def physical_entry(self) -> int:
        """e_entry moved from a segment's virtual to its physical address
        (they differ for higher-half kernels), as a 32-bit address."""
        for p in self.loads():
            if p.p_vaddr <= self.entry < p.p_vaddr + p.p_memsz:
                return (p.p_paddr + self.entry - p.p_vaddr) & 0xFFFFFFFF
        return self.entry & 0xFFFFFFFF


@dataclass
class ElfNote:
    owner: str
    type: int
    desc: bytes


@dataclass
class ElfImage:
    """What load_elf put into guest memory."""
    entry: int                # e_entry as in the file
    low: int                  # lowest p_paddr of a PT_LOAD
    high: int                 # end of the highest PT_LOAD (p_paddr + p_memsz)
    is_64bit: bool
    segments: list[tuple[int, int]] = field(default_factory=list)   # (paddr, memsz)

    @property
    def size(self) -> int:
        return self.high - self.low

    def __repr__(self) -> str:
        return (f"ElfImage(entry=0x{self.entry:x}, 0x{self.low:x}-0x{self.high:x}, "
                f"{len(self.segments)} segments, {'64' if self.is_64bit else '32'}-bit)")


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes) -> ElfFile:
    """Parses the ELF header and program headers.

    Raises ImageError for a non-ELF, big-endian, unknown-class or truncated
    file, or one whose program header table lies outside it."""
    if len(data) < _EHDR_IDENT.size or data[:4] != ELF_MAGIC:
        raise ImageError("not an ELF file")
    _, cls, enc, _, _, _ = _EHDR_IDENT.unpack_from(data, 0)
    if cls not in _EHDR_REST:
        raise ImageError(f"ELF class {cls} is neither 32- nor 64-bit")
    if enc != ELFDATA2LSB:
        raise ImageError("big-endian ELF files are not supported")
    rest = _EHDR_REST[cls]
    if len(data) < _EHDR_IDENT.size + rest.size:
        raise ImageError(f"truncated ELF file: {len(data)} bytes")
    h = dict(zip(_EHDR_FIELDS, rest.unpack_from(data, _EHDR_IDENT.size)))
    phs, names = _PHDR_LAYOUT[cls]
    phoff, phnum, phentsize = h["e_phoff"], h["e_phnum"], h["e_phentsize"]
    if phnum and phentsize < phs.size:
        raise ImageError(f"ELF program header size {phentsize} is too small")
    table_end = phoff + phnum * phentsize
    if phnum and table_end > len(data):
        raise ImageError(f"truncated ELF file: program header table 0x{phoff:x}-0x{table_end:x} "
                         f"is past its end ({len(data)} bytes)")
    phdrs = [ProgramHeader(**dict(zip(names, phs.unpack_from(data, phoff + i * phentsize))))
             for i in range(phnum)]
    return ElfFile(elf_class=cls, machine=h["e_machine"], elf_type=h["e_type"],
                   entry=h["e_entry"], phdrs=phdrs, shoff=h["e_shoff"],
                   shentsize=h["e_shentsize"], shnum=h["e_shnum"])


def elf_notes(data: bytes, elf: ElfFile | None = None, sections: bool = False) -> Iterator[ElfNote]:
    """Yields every note of every PT_NOTE segment as ElfNote(owner, type, desc).

    With `sections`, a file without PT_NOTE notes has its SHT_NOTE sections
    read instead (some linker scripts keep notes out of the program headers).
    Raises ImageError when the file is not ELF or a note area or a note runs
    past its end."""
    elf = elf or parse_elf(data)
    found = False
    for ph in elf.phdrs:
        if ph.p_type == PT_NOTE:
            for note in _notes_in(data, ph.p_offset, ph.p_filesz, 8 if ph.p_align == 8 else 4,
                                  "segment"):
                found = True
                yield note
    if sections and not found:
        for offset, size in _note_sections(data, elf):
            yield from _notes_in(data, offset, size, 4, "section")


def _notes_in(data: bytes, offset: int, size: int, align: int, what: str) -> Iterator[ElfNote]:
    if offset + size > len(data):
        raise ImageError(f"truncated ELF file: note {what} 0x{offset:x}-0x{offset + size:x} "
                         f"is past its end ({len(data)} bytes)")
    seg = memoryview(data)[offset:offset + size]
    off = 0
    while off + _NOTE_HDR.size <= len(seg):
        namesz, descsz, ntype = _NOTE_HDR.unpack_from(seg, off)
        name_off = off + _NOTE_HDR.size
        desc_off = name_off + _align(namesz, align)
        if desc_off + descsz > len(seg):
            raise ImageError(f"ELF note at file offset {offset + off} runs past its {what}")
        owner = bytes(seg[name_off:name_off + namesz]).rstrip(b"\0").decode("latin-1")
        yield ElfNote(owner, ntype, bytes(seg[desc_off:desc_off + descsz]))
        off = desc_off + _align(descsz, align)


def _note_sections(data: bytes, elf: ElfFile) -> list[tuple[int, int]]:
    """(offset, size) of each SHT_NOTE section; none when the section table
    is absent or does not fit in the file (sections are optional to a loader)."""
    shdr, min_size = _SHDR_TYPE_OFFSET_SIZE[elf.elf_class]
    if not elf.shoff or elf.shentsize < min_size or elf.shoff + elf.shnum * elf.shentsize > len(data):
        return []
    out = []
    for i in range(elf.shnum):
        stype, offset, size = shdr.unpack_from(data, elf.shoff + i * elf.shentsize)
        if stype == SHT_NOTE:
            out.append((offset, size))
    return out


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def is_linux_elf(data: bytes) -> bool:
    """True for an ELF file carrying a note owned by "Linux" (a vmlinux)."""
    if not is_elf(data):
        return False
    try:
        return any(n.owner == "Linux" for n in elf_notes(data))
    except ImageError:
        return False


def pvh_entry(data: bytes, elf: ElfFile | None = None) -> int | None:
    """The 32-bit physical entry of the Xen PHYS32_ENTRY note (PVH boot), or None.

    Raises ImageError when the file is not ELF or its notes are malformed."""
    for note in elf_notes(data, elf, sections=True):
        if note.owner == XEN_NOTE_OWNER and note.type == XEN_ELFNOTE_PHYS32_ENTRY and len(note.desc) >= 4:
            # The note holds a 32-bit address, stored in 4 or 8 bytes.
            return struct.unpack_from("<I", note.desc)[0]
    return None


def load_elf(memory: GuestMemory, data: bytes, elf: ElfFile | None = None, *,
             what: str = "", low_ok: bool = True) -> ElfImage:
    """Copies every PT_LOAD segment to its p_paddr and zero-fills its bss.

    `what` ("PVH kernel") prefixes the error messages; without `low_ok` a
    segment below 1 MiB, where pyvmm keeps its boot data, is refused.
    Raises ImageError when the file is malformed, has no loadable segment,
    has segments past its end or overlapping each other, needs more memory
    than the guest has, or puts a segment outside RAM; nothing is written
    in those cases."""
    prefix = f"{what}: " if what else ""
    try:
        elf = elf or parse_elf(data)
        _check_loads(memory, data, elf, low_ok)
    except ImageError as e:
        raise ImageError(f"{prefix}{e}") from None
    loads = elf.loads()
    segments = []
    view = memoryview(data)
    for p in loads:
        memory.write(p.p_paddr, view[p.p_offset:p.p_offset + p.p_filesz])
        if p.p_memsz > p.p_filesz:
            memory.fill(p.p_paddr + p.p_filesz, p.p_memsz - p.p_filesz)
        segments.append((p.p_paddr, p.p_memsz))
        log.debug("ELF segment 0x%x+0x%x (file 0x%x)", p.p_paddr, p.p_memsz, p.p_filesz)
    low = min(p.p_paddr for p in loads)
    high = max(p.p_paddr + p.p_memsz for p in loads)
    return ElfImage(entry=elf.entry, low=low, high=high, is_64bit=elf.is_64bit, segments=segments)


def _check_loads(memory: GuestMemory, data: bytes, elf: ElfFile, low_ok: bool) -> None:
    loads = elf.loads()
    if not loads:
        raise ImageError("ELF file has no loadable segment")
    low = min(p.p_paddr for p in loads)
    high = max(p.p_paddr + p.p_memsz for p in loads)
    ram_mib = memory.size >> 20
    if high - low > memory.size:
        raise ImageError(f"kernel needs {_mib(high - low)} MiB (0x{low:x}-0x{high:x}) "
                         f"but the guest has only {ram_mib} MiB of RAM")
    for i, p in enumerate(loads):
        end = p.p_paddr + p.p_memsz
        if p.p_filesz > p.p_memsz:
            raise ImageError(f"ELF segment {i}: file size 0x{p.p_filesz:x} exceeds memory size 0x{p.p_memsz:x}")
        if p.p_offset + p.p_filesz > len(data):
            raise ImageError(f"truncated ELF file: segment {i} needs bytes up to "
                             f"{p.p_offset + p.p_filesz}, file has {len(data)}")
        if p.p_paddr < HIMEM_START and not low_ok:
            raise ImageError(f"ELF segment {i} loads at 0x{p.p_paddr:x}, below 1 MiB where pyvmm "
                             f"keeps boot data")
        if not memory.is_ram(p.p_paddr, p.p_memsz):
            raise ImageError(f"ELF segment {i} at 0x{p.p_paddr:x}-0x{end:x} is "
                             f"outside guest RAM ({ram_mib} MiB)")
    by_addr = sorted(range(len(loads)), key=lambda i: loads[i].p_paddr)
    for a, b in zip(by_addr, by_addr[1:]):
        if loads[b].p_paddr < loads[a].p_paddr + loads[a].p_memsz:
            raise ImageError(f"ELF segments {a} and {b} overlap at 0x{loads[b].p_paddr:x}")


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20
