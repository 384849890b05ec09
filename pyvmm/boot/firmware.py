"""Booting through BIOS firmware (SeaBIOS), as a PC does.

The BIOS image sits at the top of the 4 GiB address space, and its last
128 KiB also appear at 0xE0000-0xFFFFF, where real-mode code can reach
them.  The vCPU starts at the reset vector F000:FFF0 in real mode.

Shadow RAM: on an i440FX the low copy is ROM until the firmware turns the
PAM registers (devices/pci/pam.py) to RAM and copies itself there.  pyvmm
preloads RAM at 0xE0000-0xFFFFF with the image instead, so the copy the
firmware makes from the top-of-4-GiB alias finds the same bytes; a reset
rebuilds the machine (runner.py), so the copy is fresh each boot.

What else the firmware needs comes from the fw_cfg files of
`firmware_files()`: the e820 map, the serial console port, the boot
wait, the boot order."""

from __future__ import annotations

import os
import struct

from ..config import VmConfig
from ..cpu import CpuState, Segment
from ..errors import ConfigError
from ..memory import GuestMemory
from .result import BootResult

DEFAULT_BIOS = "/usr/share/seabios/bios.bin"
FOUR_GIB = 1 << 32
LOW_ALIAS_END = 0x100000
LOW_ALIAS_MAX = 128 * 1024     # 0xE0000-0xFFFFF
BIOS_SIZE_MIN = 64 * 1024
BIOS_SIZE_MAX = 16 * 1024 * 1024
RESET_VECTOR_FROM_END = 16     # F000:FFF0 is 16 bytes below the top
# The first instruction at the reset vector of every PC BIOS: a far jump
# (EA) or a near one (E9, EB) into the body.
RESET_JUMPS = (0xEA, 0xE9, 0xEB)
SERIAL_CONSOLE_PORT = 0x3F8
# How long SeaBIOS waits after "No bootable device" before it resets the
# machine (ms): none when that reset would end pyvmm anyway.
BOOT_FAIL_WAIT_MS = 5000
E820_ENTRY = struct.Struct("<QQI")   # address, length, type (QEMU's etc/e820)
E820_RAM, E820_RESERVED = 1, 2


def read_bios(path: str) -> bytes:
    """The BIOS image at `path`. Raises ConfigError (one line) when it is
    missing, not whole 64 KiB pages of 64 KiB to 16 MiB, or has no jump at
    its reset vector."""
    try:
        with open(path, "rb") as f:
            image = f.read(BIOS_SIZE_MAX + 1)
    except OSError as e:
        raise ConfigError(f"--bios {path}: {e.strerror or e}") from None
    if not BIOS_SIZE_MIN <= len(image) <= BIOS_SIZE_MAX or len(image) % BIOS_SIZE_MIN:
        raise ConfigError(f"--bios {path}: {len(image)} bytes is not a BIOS image "
                          f"(a multiple of 64 KiB, 64 KiB to 16 MiB)")
    if image[-RESET_VECTOR_FROM_END] not in RESET_JUMPS:
        raise ConfigError(f"--bios {path}: corrupt BIOS image (no jump at the reset vector)")
    return image


def reset_state() -> CpuState:
    """A vCPU at F000:FFF0 in real mode.  CS's base is 0xF0000, not the
    power-on 0xFFFF0000: the low alias holds the same bytes, and every
    engine runs plain real-mode segments."""
    st = CpuState()
    st.cs = Segment.real_mode(0xF000, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(st, name, Segment.real_mode(0))
    st.rip = 0xFFF0
    st.regs["rdx"] = 0x600   # the CPU's family/model/stepping in DX after reset (family 6)
    return st


def load_bios(memory: GuestMemory, config: VmConfig) -> BootResult:
    """Maps config.bios (or DEFAULT_BIOS) and returns the reset state.
    Raises ConfigError for a bad image."""
    path = os.fspath(config.bios or DEFAULT_BIOS)
    image = read_bios(path)
    memory.add_rom(FOUR_GIB - len(image), image)
    low = image[-LOW_ALIAS_MAX:]
    memory.write(LOW_ALIAS_END - len(low), low)
    return BootResult(reset_state(), "bios",
                      f"{path}: {len(image) // 1024} KiB at 0x{FOUR_GIB - len(image):x}, "
                      f"last {len(low) // 1024} KiB at 0x{LOW_ALIAS_END - len(low):x}")


def e820_table(ram_ranges: list[tuple[int, int]]) -> bytes:
    """QEMU's etc/e820: the RAM ranges; the firmware reserves its own areas."""
    return b"".join(E820_ENTRY.pack(start, size, E820_RAM) for start, size in ram_ranges)


def firmware_files(memory: GuestMemory, config: VmConfig) -> list[tuple[str, bytes]]:
    """The fw_cfg files SeaBIOS reads on a pyvmm machine."""
    wait = 0 if config.no_reboot else BOOT_FAIL_WAIT_MS
    files = [
        ("etc/e820", e820_table(memory.ram_ranges())),
        ("etc/sercon-port", struct.pack("<H", SERIAL_CONSOLE_PORT)),
        ("etc/boot-fail-wait", struct.pack("<I", wait)),
        ("etc/show-boot-menu", struct.pack("<H", 0)),   # the boot loader's menu is the one to show
    ]
    return files


__all__ = ["DEFAULT_BIOS", "e820_table", "firmware_files", "load_bios", "read_bios", "reset_state"]
