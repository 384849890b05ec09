"""ELF kernels: headers, PT_LOAD segments, PT_NOTE notes, loading at physical addresses.

Only what a loader needs: the ELF header, the program headers and notes
(ELF32 and ELF64, little-endian).  Segments go to their p_paddr, as a boot
loader does for vmlinux, Multiboot and PVH kernels.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ImageError
from ..memory import GuestMemory

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4

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

    @property
    def is_64bit(self) -> bool:
        return self.elf_class == ELFCLASS64

    def loads(self) -> list[ProgramHeader]:
        return [p for p in self.phdrs if p.p_type == PT_LOAD and p.p_memsz]


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

    Raises ImageError for a non-ELF, big-endian, unknown-class or truncated file."""
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
    if h["e_phnum"] and h["e_phentsize"] < phs.size:
        raise ImageError(f"ELF program header size {h['e_phentsize']} is too small")
    phdrs = []
    for i in range(h["e_phnum"]):
        off = h["e_phoff"] + i * h["e_phentsize"]
        if off + phs.size > len(data):
            raise ImageError(f"truncated ELF file: program header {i} at {off} is past its end")
        phdrs.append(ProgramHeader(**dict(zip(names, phs.unpack_from(data, off)))))
    return ElfFile(elf_class=cls, machine=h["e_machine"], elf_type=h["e_type"],
                   entry=h["e_entry"], phdrs=phdrs)


def elf_notes(data: bytes, elf: ElfFile | None = None) -> Iterator[ElfNote]:
    """Yields every note of every PT_NOTE segment as ElfNote(owner, type, desc).

    Raises ImageError when the file is not ELF or a note runs past its segment."""
    elf = elf or parse_elf(data)
    for ph in elf.phdrs:
        if ph.p_type != PT_NOTE:
            continue
        align = 8 if ph.p_align == 8 else 4
        seg = data[ph.p_offset:ph.p_offset + ph.p_filesz]
        off = 0
        while off + _NOTE_HDR.size <= len(seg):
            namesz, descsz, ntype = _NOTE_HDR.unpack_from(seg, off)
            name_off = off + _NOTE_HDR.size
            desc_off = name_off + _align(namesz, align)
            end = desc_off + _align(descsz, align)
            if desc_off + descsz > len(seg):
                raise ImageError(f"ELF note at file offset {ph.p_offset + off} runs past its segment")
            owner = seg[name_off:name_off + namesz].rstrip(b"\0").decode("latin-1")
            yield ElfNote(owner, ntype, bytes(seg[desc_off:desc_off + descsz]))
            off = end


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


def load_elf(memory: GuestMemory, data: bytes, elf: ElfFile | None = None) -> ElfImage:
    """Copies every PT_LOAD segment to its p_paddr and zero-fills its bss.

    Raises ImageError when the file is malformed, has no loadable segment,
    needs more memory than the guest has, or puts a segment outside RAM;
    nothing is written in those cases."""
    elf = elf or parse_elf(data)
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
        if p.p_filesz > p.p_memsz:
            raise ImageError(f"ELF segment {i}: file size 0x{p.p_filesz:x} exceeds memory size 0x{p.p_memsz:x}")
        if p.p_offset + p.p_filesz > len(data):
            raise ImageError(f"truncated ELF file: segment {i} needs bytes up to "
                             f"{p.p_offset + p.p_filesz}, file has {len(data)}")
        if not memory.is_ram(p.p_paddr, p.p_memsz):
            raise ImageError(f"ELF segment {i} at 0x{p.p_paddr:x}-0x{p.p_paddr + p.p_memsz:x} is "
                             f"outside guest RAM ({ram_mib} MiB)")
    segments = []
    view = memoryview(data)
    for p in loads:
        memory.write(p.p_paddr, view[p.p_offset:p.p_offset + p.p_filesz])
        if p.p_memsz > p.p_filesz:
            memory.fill(p.p_paddr + p.p_filesz, p.p_memsz - p.p_filesz)
        segments.append((p.p_paddr, p.p_memsz))
        log.debug("ELF segment 0x%x+0x%x (file 0x%x)", p.p_paddr, p.p_memsz, p.p_filesz)
    return ElfImage(entry=elf.entry, low=low, high=high, is_64bit=elf.is_64bit, segments=segments)


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20
