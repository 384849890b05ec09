"""`--bios` with `--kernel`: SeaBIOS runs pyvmm's own Linux loader option
ROM (boot/optionrom/linuxboot.S), which copies the parts of a bzImage from
fw_cfg into place and enters its setup code as the boot protocol says.

The bzImage here is a small stand-in: its setup code checks the segments
and stack it was entered with and reports through isa-debug-exit, and the
test reads back where each part landed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.boot.bzimage import SetupHeader
from pyvmm.boot.firmware import DEFAULT_BIOS
from pyvmm.boot.linuxboot import CMDLINE_ADDR, HEAP_END, KERNEL_ADDR, SETUP_ADDR
from pyvmm.config import VmConfig
from pyvmm.machine import StopReason
from tests.asm import assemble
from tests.hostfacts import require_from_setup
from tests.rawguest import run_machine

GOOD, BAD = 0x21, 0x2E
SETUP_CODE = f"""
    .code16
    mov %ds, %ax
    cmp ${SETUP_ADDR >> 4:#x}, %ax
    jne bad
    mov %ss, %bx
    cmp %ax, %bx
    jne bad
    mov %cs, %bx
    sub $0x20, %bx
    cmp %ax, %bx
    jne bad
    mov %sp, %ax
    cmp $0xFFF0, %ax
    jne bad
    mov ${GOOD}, %al
    jmp done
bad:
    mov ${BAD}, %al
done:
    out %al, $0xF4
1:  hlt
    jmp 1b
"""
KERNEL = bytes(range(256)) * 64          # the "protected-mode kernel": 16 KiB, recognisable
INITRD = b"pyvmm-initrd-" * 1000
CMDLINE = "console=ttyS0 pyvmm.test=linuxboot"


def fake_bzimage(path: Path) -> Path:
    setup_sects = 1
    setup = bytearray((setup_sects + 1) * 512)
    code = Path(assemble(SETUP_CODE, fmt="bin", org=0)).read_bytes()
    hdr = SetupHeader(setup_sects=setup_sects, boot_flag=0xAA55, jump=0x7EEB, header=0x53726448,
                      version=0x020F, loadflags=0x01, code32_start=KERNEL_ADDR, initrd_addr_max=0x7FFFFFFF,
                      cmdline_size=255, payload_offset=0, payload_length=len(KERNEL),
                      syssize=len(KERNEL) // 16)
    hdr.pack_into(setup)
    setup[0x280:0x280 + len(code)] = code     # the jump at 0x200 lands here (0x202 + 0x7E)
    path.write_bytes(bytes(setup) + KERNEL)
    return path


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_option_rom_loads_and_enters_the_kernel(engine, tmp_path):
    require_from_setup(paths=[DEFAULT_BIOS], package="seabios")
    kernel = fake_bzimage(tmp_path / "bzImage")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(INITRD)
    out = bytearray()
    cfg = VmConfig(bios=DEFAULT_BIOS, kernel=str(kernel), initrd=[str(initrd)], cmdline=CMDLINE,
                   engine=engine, mem_mib=64, no_reboot=True, debug_exit=(0xF4, 1))

    def landed(m):
        mem = m.memory
        hdr = SetupHeader.unpack_from(mem.read(SETUP_ADDR, 1024))
        return (hdr, mem.read(KERNEL_ADDR, len(KERNEL)), mem.read(CMDLINE_ADDR, len(CMDLINE) + 1),
                mem.read(hdr.ramdisk_image, len(INITRD)) if hdr.ramdisk_image else b"")

    machine, _ = run_machine(cfg, None, output=out.extend, timeout=60, inspect=landed)
    text = out.decode(errors="replace")
    assert "Booting from ROM" in text, text
    status = machine.stop_status
    assert status.reason is StopReason.DEBUG_EXIT and status.value == GOOD, (status, text)
    hdr, kernel_bytes, cmdline, initrd_bytes = machine.inspected
    assert kernel_bytes == KERNEL
    assert cmdline.rstrip(b"\0").decode().startswith(CMDLINE)
    assert initrd_bytes == INITRD and hdr.ramdisk_size == len(INITRD)
    assert hdr.ramdisk_image % 4096 == 0 and hdr.ramdisk_image + len(INITRD) <= 64 << 20
    assert hdr.cmd_line_ptr == CMDLINE_ADDR and hdr.heap_end_ptr == HEAP_END
    assert hdr.type_of_loader == 0xFF and hdr.loadflags & 0x80


def test_only_bzimages_boot_through_the_firmware(tmp_path):
    from pyvmm.boot.linuxboot import linuxboot_fw_cfg
    from pyvmm.errors import ConfigError
    elf = tmp_path / "k.elf"
    elf.write_bytes(b"\x7fELF" + bytes(4092))
    with pytest.raises(ConfigError, match="only bzImage"):
        linuxboot_fw_cfg(VmConfig(bios=DEFAULT_BIOS, kernel=str(elf)), 64 << 20)


def test_option_rom_sources_ship_as_package_data():
    """An installed wheel holds every non-Python file pyvmm reads at run
    time (the option ROM sources): each matches a package-data pattern of
    its package in pyproject.toml, without which setuptools leaves it out."""
    import fnmatch
    import tomllib
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data = [p for p in (root / "pyvmm").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(p.name == "linuxboot.S" for p in data)
    for path in data:
        package = ".".join(path.parent.relative_to(root).parts)
        assert any(fnmatch.fnmatch(path.name, g) for g in patterns.get(package, [])), path
