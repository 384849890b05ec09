"""Assembles and links small test guests with GNU as/ld at test time.

    from tests.asm import assemble, require_toolchain
    path = assemble(GUESTS / "multiboot_info.S", fmt="elf32", org=0x100000)

Sources are plain GNU as syntax (no C preprocessor).  Formats:

- ``elf32``: ``as --32`` and ``ld -m elf_i386`` -> a 32-bit ELF executable;
- ``elf64``: ``as --64`` and ``ld -m elf_x86_64`` -> a 64-bit ELF executable;
- ``bin``:   a flat binary whose first byte sits at ``org`` (the source picks
  its mode with ``.code16``/``.code32``/``.code64``).

Every call writes into a fresh temporary directory (or ``outdir``) and returns
the output path.  When ``as`` or ``ld`` is missing, ``assemble`` fails the
test naming scripts/setup.sh, which installs binutils.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .hostfacts import require_from_setup

_FORMATS = {
    # fmt: (as flags, ld emulation)
    "elf32": (["--32"], "elf_i386"),
    "elf64": (["--64"], "elf_x86_64"),
    "bin": (["--64"], "elf_x86_64"),
}


def missing_tools() -> list[str]:
    """Names of the binutils programs this helper needs that are not on PATH."""
    return [tool for tool in ("as", "ld") if shutil.which(tool) is None]


def require_toolchain() -> None:
    """Fails the calling test when GNU as/ld are not installed."""
    require_from_setup(programs=["as", "ld"], package="binutils")


GUESTS_DIR = Path(__file__).resolve().parent / "guests"


def _source_text(source: str | Path) -> tuple[str, str, Path]:
    """(text, stem, include dir) of a source given as a path or as the text itself."""
    if isinstance(source, Path) or ("\n" not in source and Path(source).is_file()):
        path = Path(source)
        return path.read_text(), path.stem, path.resolve().parent
    return source, "guest", GUESTS_DIR


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


def assemble(source: str | Path, *, fmt: str = "elf32", org: int = 0x100000,
             ld_script: str | Path | None = None, entry: str = "_start",
             outdir: Path | None = None, extra_ld_args: list[str] | None = None) -> Path:
    """Assembles and links `source` (a path or the text itself); returns the output file.

    `org` is the address of the text section (ignored when `ld_script` is
    given, which may be a path or the script text).  The ELF is linked with
    ``-n`` so that segments are not page-aligned in the file: headers such as
    Multiboot's stay near the start of the file.

    Skips the calling test when as/ld are missing; raises RuntimeError with
    the tools' messages when assembling or linking fails, and ValueError for
    an unknown format."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(_FORMATS)})")
    require_toolchain()
    text, stem, include_dir = _source_text(source)
    as_flags, emulation = _FORMATS[fmt]
    work = Path(outdir) if outdir is not None else Path(tempfile.mkdtemp(prefix="pyvmm-guest-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"{stem}.s"
    src.write_text(text)
    obj = work / f"{stem}.o"
    _run(["as", *as_flags, "-I", str(include_dir), "-o", str(obj), str(src)], work)

    out = work / (f"{stem}.bin" if fmt == "bin" else f"{stem}.elf")
    ld = ["ld", "-m", emulation, "-n", "--build-id=none", "-e", entry]
    if ld_script is not None:
        script = ld_script
        if isinstance(script, str) and ("\n" in script or not Path(script).is_file()):
            script_path = work / f"{stem}.ld"
            script_path.write_text(script)
            script = script_path
        ld += ["-T", str(Path(script).resolve())]
    else:
        ld += [f"-Ttext=0x{org:x}"]
    if fmt == "bin":
        ld += ["--oformat", "binary"]
    ld += list(extra_ld_args or [])
    _run([*ld, "-o", str(out), str(obj)], work)
    return out


class PollingUart:
    """Just enough of a 16550 for polling output: LSR always says the
    transmitter is empty; bytes written to THR collect in `out`."""

    def __init__(self):
        self.out = bytearray()

    def read(self, offset: int, size: int) -> int:
        return 0x60 if offset == 5 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.out.append(value & 0xFF)


class _DebugExit:
    def __init__(self):
        self.value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value


def emulate32(memory, cpu, devices: list[tuple[int, int, object]] = (), *,
              max_instructions: int = 5_000_000) -> tuple[str, int | None]:
    """Runs a 32-bit flat protected-mode guest in Unicorn; returns (what it
    wrote to COM1, the value written to the debug-exit port 0xf4 or None).

    Guest RAM is the GuestMemory's own mappings; IN/OUT go to a pyvmm Bus
    holding a minimal COM1 at 0x3f8, a debug-exit port at 0xf4 (which stops
    the run) and `devices` as (base, length, device).  Only the general
    registers and EIP of `cpu` (a CpuState) are used.  The run also stops
    after `max_instructions`.  Fails the test when unicorn (a setup dependency) is missing."""
    require_from_setup(modules=["unicorn"], package="unicorn: pip .[test]")
    import unicorn
    from unicorn import x86_const as x

    from pyvmm.bus import Bus

    serial, debug_exit = PollingUart(), _DebugExit()
    bus = Bus("io")
    bus.insert(0x3F8, 8, serial, "serial")
    bus.insert(0xF4, 4, debug_exit, "debug-exit")
    for base, length, dev in devices:
        bus.insert(base, length, dev)

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    for region in memory.regions:
        if region.gpa < 1 << 32:
            uc.mem_map_ptr(region.gpa, region.size, unicorn.UC_PROT_ALL, region.host_address())
    regs = {"rax": x.UC_X86_REG_EAX, "rbx": x.UC_X86_REG_EBX, "rcx": x.UC_X86_REG_ECX,
            "rdx": x.UC_X86_REG_EDX, "rsi": x.UC_X86_REG_ESI, "rdi": x.UC_X86_REG_EDI,
            "rsp": x.UC_X86_REG_ESP, "rbp": x.UC_X86_REG_EBP}
    for name, reg in regs.items():
        uc.reg_write(reg, cpu.regs[name] & 0xFFFFFFFF)

    def on_in(uc, port, size, _data):
        return bus.read(port, size)

    def on_out(uc, port, size, value, _data):
        bus.write(port, size, value)
        if debug_exit.value is not None:
            uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INSN, on_in, None, 1, 0, x.UC_X86_INS_IN)
    uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, x.UC_X86_INS_OUT)
    uc.emu_start(cpu.rip, 0xFFFFFFFF, count=max_instructions)
    return serial.out.decode("latin-1"), debug_exit.value


def elf_image(segments: list[tuple[int, int, bytes, int]], entry: int, *,
              notes: list[tuple[str, int, bytes]] = (), elf64: bool = False) -> bytes:
    """A minimal little-endian x86 ELF executable built in Python (no toolchain).

    `segments` are (paddr, vaddr, data, memsz) PT_LOADs; `notes` (owner,
    type, desc) go into one PT_NOTE."""
    import struct

    note_blob = b""
    for owner, ntype, desc in notes:
        name = owner.encode() + b"\0"
        note_blob += struct.pack("<III", len(name), len(desc), ntype)
        note_blob += name.ljust((len(name) + 3) & ~3, b"\0") + desc.ljust((len(desc) + 3) & ~3, b"\0")
    nph = len(segments) + (1 if notes else 0)
    ehsize, phentsize = (64, 56) if elf64 else (52, 32)
    off = ehsize + nph * phentsize
    body, phdrs = b"", b""
    for paddr, vaddr, data, memsz in segments:
        fields = (1, off + len(body), vaddr, paddr, len(data), memsz, 7, 0x1000)
        if elf64:
            phdrs += struct.pack("<IIQQQQQQ", fields[0], fields[6], *fields[1:6], fields[7])
        else:
            phdrs += struct.pack("<8I", *fields)
        body += data
    if notes:
        fields = (4, off + len(body), 0, 0, len(note_blob), len(note_blob), 4, 4)
        if elf64:
            phdrs += struct.pack("<IIQQQQQQ", fields[0], fields[6], *fields[1:6], fields[7])
        else:
            phdrs += struct.pack("<8I", *fields)
        body += note_blob
    ident = b"\x7fELF" + bytes([2 if elf64 else 1, 1, 1]) + bytes(9)
    if elf64:
        header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0,
                                     ehsize, phentsize, nph, 64, 0, 0)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, ehsize, 0, 0,
                                     ehsize, phentsize, nph, 40, 0, 0)
    return header + phdrs + body


MULTIBOOT_HEADER = """
.text
.globl _start
.align 4
    .long 0x1BADB002, 0, -(0x1BADB002)
_start:
"""


def multiboot_kernel(body: str) -> Path:
    """A 32-bit Multiboot ELF at 1 MiB whose entry runs `body` (AT&T syntax)."""
    return assemble(MULTIBOOT_HEADER + body, fmt="elf32", org=0x100000)
