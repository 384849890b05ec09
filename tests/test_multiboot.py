"""Multiboot v1: header checks, a.out-kludge and ELF loading, the info
structure, and the real test guest tests/guests/multiboot_info.S (loaded by
the loader, then run in Unicorn against fw_cfg; end to end under KVM when the
CLI is ready)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.boot import elf, layout, multiboot
from pyvmm.config import VmConfig
from pyvmm.cpu import CR0_PE, CR0_PG
from pyvmm.devices.fw_cfg import PORT_RANGE, FwCfg
from pyvmm.errors import ImageError
from pyvmm.memory import GuestMemory
from tests.asm import assemble, elf_image, emulate32

GUESTS = Path(__file__).parent / "guests"
REPO = Path(__file__).parent.parent
MIB = 1 << 20
MAGIC = 0x1BADB002


@pytest.fixture
def mem():
    m = GuestMemory(64 * MIB)
    yield m
    m.close()


def header(flags: int, *fields: int, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MAGIC, flags, checksum) + struct.pack(f"<{len(fields)}I", *fields)


def aout_image(load=0x100000, bss_end=0x104000, entry=0x100020, pad=0, flags=0x10003,
               load_end=0) -> bytes:
    """An a.out-kludge image: `pad` bytes, the header (at load + pad), code."""
    hdr = header(flags, load + pad, load, load_end, bss_end, entry)
    body = b"\x00" * pad + hdr
    return body + bytes(range(0x20, 0x60)) + b"\xf4" * 16  # payload; hlt


def info(mem: GuestMemory) -> tuple:
    return multiboot.INFO.unpack(mem.read(layout.PROTOCOL_INFO_ADDR, multiboot.INFO.size))


def cstring(mem: GuestMemory, addr: int) -> str:
    raw = mem.read(addr, 256)
    return raw[:raw.index(b"\0")].decode()


# ------------------------------------------------------------------- probe
def test_probe():
    assert multiboot.probe(aout_image())
    assert multiboot.probe(b"\0" * 8188 + struct.pack("<I", MAGIC))
    assert not multiboot.probe(b"\0" * 8192 + header(0x3))       # past 8 KiB
    assert not multiboot.probe(b"\0\0" + header(0x3))            # not 4-byte aligned
    assert not multiboot.probe(b"\x7fELF" + bytes(100))


# ------------------------------------------------------------------ errors
def test_truncated_header(mem):
    with pytest.raises(ImageError, match="truncated header"):
        multiboot.load(mem, VmConfig(), b"\0" * 4 + struct.pack("<II", MAGIC, 3))
    # Flag 16 set but the address fields are cut off.
    with pytest.raises(ImageError, match="truncated header"):
        multiboot.load(mem, VmConfig(), header(0x10003, 0x100000, 0x100000))


def test_bad_checksum(mem):
    with pytest.raises(ImageError, match="checksum"):
        multiboot.load(mem, VmConfig(), header(0x10003, 0x100000, 0x100000, 0, 0, 0x100000,
                                               checksum=0x1234))


def test_unknown_required_flag_refused(mem):
    with pytest.raises(ImageError, match="unsupported features.*0x0008"):
        multiboot.load(mem, VmConfig(), aout_image(flags=0x10003 | 0x8))


def test_video_flag_accepted(mem):
    multiboot.load(mem, VmConfig(), aout_image(flags=0x10007))


def test_load_outside_ram(mem):
    with pytest.raises(ImageError, match="outside guest RAM"):
        multiboot.load(mem, VmConfig(), aout_image(load=0x8000000, bss_end=0, entry=0x8000020))
    with pytest.raises(ImageError, match="outside guest RAM"):
        multiboot.load(mem, VmConfig(), aout_image(bss_end=0x5000000))   # bss past 64 MiB


def test_loads_below_1mib(mem):
    """As under QEMU: a kernel at 0x8000 loads; pyvmm's boot data stays where
    layout.py puts it when the kernel does not cover it."""
    image = aout_image(load=0x8000, bss_end=0, entry=0x8020)
    result = multiboot.load(mem, VmConfig(), image)
    assert mem.read(0x8000, len(image)) == image
    assert result.cpu.rip == 0x8020 and result.cpu.regs["rbx"] == layout.PROTOCOL_INFO_ADDR


def test_kernel_over_boot_data_moves_it(mem):
    """A kernel covering the info structure, the data area and the boot GDT
    keeps its bytes; the info structure moves to the page after the kernel."""
    image = aout_image(load=0x400, bss_end=0x40000, entry=0x420)
    result = multiboot.load(mem, VmConfig(cmdline="moved"), image)
    assert mem.read(0x400, len(image)) == image            # over the GDT at 0x500
    assert mem.read(layout.PROTOCOL_INFO_ADDR, 16) == bytes(16)   # the zeroed bss, not info
    info_addr = result.cpu.regs["rbx"]
    assert info_addr == 0x40000
    flags, *_rest = multiboot.INFO.unpack(mem.read(info_addr, multiboot.INFO.size))
    cmdline = multiboot.INFO.unpack(mem.read(info_addr, multiboot.INFO.size))[4]
    assert flags & multiboot.MBI_CMDLINE and cmdline >= 0x40000 and cstring(mem, cmdline) == "moved"


def test_bad_aout_fields(mem):
    with pytest.raises(ImageError, match="entry_addr"):
        multiboot.load(mem, VmConfig(), aout_image(entry=0x200000))
    with pytest.raises(ImageError, match="load_end_addr"):
        multiboot.load(mem, VmConfig(), aout_image(load_end=0x200000))


def test_not_elf_without_kludge(mem):
    with pytest.raises(ImageError, match="not ELF"):
        multiboot.load(mem, VmConfig(), header(0x3) + b"\x90" * 32)


# ------------------------------------------------------------- a.out load
def test_aout_load_and_info(mem, tmp_path):
    mod_a = tmp_path / "mod_a.bin"
    mod_a.write_bytes(b"MODULE-A" * 100)
    mod_b = tmp_path / "mod_b.bin"
    mod_b.write_bytes(b"B")
    image = aout_image(pad=8)
    mem.fill(0x100000, 0x5000, 0xCC)   # the bss must be zeroed by the loader
    cfg = VmConfig(kernel="/k/kernel.bin", initrd=[str(mod_a), str(mod_b)], cmdline="exit=5 x")
    result = multiboot.load(mem, cfg, image)

    assert result.protocol == "multiboot"
    cpu = result.cpu
    assert cpu.regs["rax"] == 0x2BADB002 and cpu.regs["rbx"] == layout.PROTOCOL_INFO_ADDR
    assert cpu.rip == 0x100020 and cpu.cr0 & CR0_PE and not cpu.cr0 & CR0_PG
    assert cpu.cs.db == 1 and cpu.cs.base == 0 and cpu.cs.limit == 0xFFFFFFFF
    assert mem.read(0x100000, len(image)) == image
    assert mem.read(0x100000 + len(image), 0x104000 - 0x100000 - len(image)) == \
        bytes(0x104000 - 0x100000 - len(image))

    (flags, mem_lower, mem_upper, _boot_dev, cmdline, mods_count, mods_addr, _syms,
     mmap_length, mmap_addr, _dl, _da, _ct, loader_name, _apm) = info(mem)
    assert flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert mem_lower == 639 and mem_upper == (64 * MIB - MIB) // 1024
    assert cstring(mem, cmdline) == "/k/kernel.bin exit=5 x"
    assert cstring(mem, loader_name) == "pyvmm"

    assert mods_count == 2
    (a_start, a_end, a_str, _), (b_start, b_end, b_str, _) = \
        [multiboot.MODULE.unpack(mem.read(mods_addr + 16 * i, 16)) for i in range(2)]
    assert a_start == 0x104000 and a_end - a_start == 800     # page-aligned above the bss
    assert mem.read(a_start, 8) == b"MODULE-A"
    assert b_start == 0x105000 and b_end == b_start + 1
    assert cstring(mem, a_str) == str(mod_a) and cstring(mem, b_str) == str(mod_b)

    entries, off = [], mmap_addr
    while off < mmap_addr + mmap_length:
        size, base, length, etype = multiboot.MMAP_ENTRY.unpack(mem.read(off, 24))
        assert size == 20
        entries.append((base, length, etype))
        off += size + 4
    assert entries == layout.e820_map(mem.ram_ranges())
    for addr in (cmdline, loader_name, mods_addr, mmap_addr):
        assert layout.PROTOCOL_DATA_ADDR <= addr < layout.PROTOCOL_DATA_ADDR + layout.PROTOCOL_DATA_MAX


def test_missing_module(mem, tmp_path):
    with pytest.raises(ImageError, match="module"):
        multiboot.load(mem, VmConfig(initrd=[str(tmp_path / "nope")]), aout_image())


def test_module_too_big_for_ram(tmp_path):
    small = GuestMemory(16 * MIB)
    try:
        big = tmp_path / "big"
        big.write_bytes(b"\0" * (16 * MIB))
        with pytest.raises(ImageError, match="does not fit"):
            multiboot.load(small, VmConfig(initrd=[str(big)]), aout_image())
    finally:
        small.close()


# --------------------------------------------------------------- ELF load
def test_elf_loads_at_paddr(mem):
    code = header(0x3) + b"\x90" * 20 + b"\xf4"
    image = elf_image([(0x200000, 0xC0200000, code, len(code) + 0x100)], entry=0xC020000C)
    assert multiboot.probe(image)
    result = multiboot.load(mem, VmConfig(), image)
    assert mem.read(0x200000, len(code)) == code
    assert mem.read(0x200000 + len(code), 0x100) == bytes(0x100)
    assert result.cpu.rip == 0x20000C        # virtual entry moved to its physical address


def test_elf_segment_outside_ram(mem):
    code = header(0x3) + b"\xf4"
    image = elf_image([(0x7000000, 0x7000000, code, len(code))], entry=0x7000000)
    with pytest.raises(ImageError, match="outside guest RAM"):
        multiboot.load(mem, VmConfig(), image)


def test_elf_truncated_segment(mem):
    code = header(0x3) + b"\xf4" * 64
    image = elf_image([(0x100000, 0x100000, code, len(code))], entry=0x100000)
    with pytest.raises(ImageError, match="truncated"):
        multiboot.load(mem, VmConfig(), image[:-32])


# ----------------------------------------------------------- the real guest
@pytest.fixture(scope="module")
def guest() -> Path:
    return assemble(GUESTS / "multiboot_info.S", fmt="elf32", ld_script=GUESTS / "guest.ld")


def test_guest_builds_and_loads(mem, guest, tmp_path):
    image = guest.read_bytes()
    assert multiboot.probe(image)
    result = multiboot.load(mem, VmConfig(kernel=str(guest), cmdline="exit=5"), image)
    entry = struct.unpack_from("<I", image, 24)[0]
    assert result.cpu.rip == entry and result.cpu.regs["rax"] == 0x2BADB002


def test_guest_runs_in_unicorn(mem, guest, tmp_path):
    module = tmp_path / "module.txt"
    module.write_bytes(b"HELLO-MB module text")
    cfg = VmConfig(kernel=str(guest), initrd=[str(module)], cmdline="exit=5", mem_mib=64, cpus=2)
    result = multiboot.load(mem, cfg, guest.read_bytes())
    fw_cfg = FwCfg(ram_size=64 * MIB, cpus=2, memory=mem)
    out, code = emulate32(mem, result.cpu, [(0x510, PORT_RANGE, fw_cfg)])
    lines = out.splitlines()
    assert lines == [
        "magic=ok",
        f"mem_upper={63 * 1024}",
        f"cmdline={guest} exit=5",
        "mods=1",
        "mod0=HELLO-MB",
        f"mmap={len(layout.e820_map(mem.ram_ranges()))}",
        "loader=pyvmm",
        "fw_cfg=QEMU",
        "cpus=2",
        "ram=64M",
        "exit=5",
    ]
    assert code == 5


# ------------------------------------------------------------- end to end
ENGINES = ["hw", "bt"]


def run_vm(kernel: Path, modules: list[Path], append: str, engine: str = "hw") -> subprocess.CompletedProcess:
    if engine == "hw" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not available")
    cmd = [sys.executable, "-m", "pyvmm", "run", "--engine", engine, "--kernel", str(kernel)]
    for m in modules:
        cmd += ["--initrd", str(m)]
    cmd += ["--append", append, "--mem", "64M", "--cpus", "2",
            "--debug-exit", "iobase=0xf4,iosize=4", "--no-reboot"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("engine", ENGINES)
def test_guest_end_to_end(guest, tmp_path, engine):
    module = tmp_path / "module.txt"
    module.write_bytes(b"HELLO-MB module text")
    proc = run_vm(guest, [module], "exit=5", engine)
    out = proc.stdout.decode("latin-1")
    assert proc.returncode == (5 << 1) | 1, out + proc.stderr.decode("latin-1")
    for line in ("magic=ok", f"mem_upper={63 * 1024}", "mods=1", "mod0=HELLO-MB",
                 "loader=pyvmm", "fw_cfg=QEMU", "cpus=2", "ram=64M", "exit=5"):
        assert line in out
    assert "exit=5" in out.split("cmdline=")[1].splitlines()[0]




# ------------------------------------------- kernels below 1 MiB, with QEMU
LOW_ELF = """
.text
.globl _start
.align 4
mbh: .long 0x1BADB002, 0, -(0x1BADB002)
_start:
    cmp $0x2BADB002, %eax
    jne 1f
    mov $0x3f8, %dx
    mov $'L', %al
    out %al, %dx
    mov $0xf4, %dx
    mov $0x15, %eax
    out %eax, %dx
1:  hlt
"""
# A real-mode test kernel: an a.out-kludge image at 0x8000 (flags 0x10000)
# that drops from the Multiboot entry state to real mode and writes from there.
LOW_AOUT = """
.code32
.text
.globl _start
hdr:
    .long 0x1BADB002, 0x10000, -(0x1BADB002 + 0x10000)
    .long hdr, hdr, 0, 0, _start
_start:
    lgdt gdtr
    ljmp $0x08, $pm16
.code16
pm16:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov %cr0, %eax
    and $~1, %eax
    mov %eax, %cr0
    ljmp $0, $real
real:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    mov $0xf4, %dx
    mov $0x16, %eax
    out %eax, %dx
    hlt
.align 8
gdt: .quad 0, 0x00009A000000FFFF, 0x000092000000FFFF
gdtr: .word 23
    .long gdt
"""


def _low_kernels(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """name -> (kernel, the exit value it writes): the plain `ld -m elf_i386
    -Ttext 0x100000` ELF (its headers' LOAD segment starts at 0xff000) and
    an a.out kernel at 0x8000."""
    from tests.asm import require_toolchain
    require_toolchain()
    (tmp_path / "low.s").write_text(LOW_ELF)
    subprocess.run(["as", "--32", "-o", "low.o", "low.s"], cwd=tmp_path, check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-o", "low.elf", "low.o"],
                   cwd=tmp_path, check=True)
    aout = assemble(LOW_AOUT, fmt="bin", org=0x8000, outdir=tmp_path / "aout")
    return {"elf_ff000": (tmp_path / "low.elf", 0x15, "L"), "aout_8000": (aout, 0x16, "R")}


def test_low_elf_has_a_segment_below_1mib(tmp_path):
    image = _low_kernels(tmp_path)["elf_ff000"][0].read_bytes()
    assert min(p.p_paddr for p in elf.parse_elf(image).loads()) < 0x100000


@pytest.mark.parametrize("name", ["elf_ff000", "aout_8000"])
def test_low_kernels_run_under_bt_and_qemu(tmp_path, name):
    import shutil
    kernel, value, letter = _low_kernels(tmp_path)[name]
    proc = run_vm(kernel, [], "", "bt")
    out = proc.stdout.decode("latin-1")
    assert proc.returncode == (value << 1) | 1, out + proc.stderr.decode("latin-1")
    assert letter in out
    from tests.hostfacts import require_from_setup
    require_from_setup(programs=["qemu-system-x86_64"], package="qemu-system-x86")
    qemu = shutil.which("qemu-system-x86_64")
    q = subprocess.run([qemu, "-accel", "tcg", "-m", "64", "-kernel", str(kernel), "-display", "none",
                        "-serial", "stdio", "-monitor", "none", "-no-reboot",
                        "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert q.returncode == proc.returncode
    assert letter in q.stdout.decode("latin-1")
