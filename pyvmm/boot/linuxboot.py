"""`--bios` with `--kernel`: the firmware boots a bzImage that pyvmm hands
over through fw_cfg, as QEMU's linuxboot does.

pyvmm splits the bzImage into its real-mode setup and protected-mode
kernel, fills in the setup header as a boot loader would (loader type,
heap end, command line and initrd addresses), and offers each part as
fw_cfg items with its load address.  Its own option ROM
(optionrom/linuxboot.S, run by SeaBIOS as genroms/linuxboot.bin and named
first in the boot order) copies the parts into place and enters the setup
code in real mode.  Everything from there is the kernel's own boot path,
with the firmware's e820 map and ACPI tables."""

from __future__ import annotations

import os

from ..config import VmConfig
from ..errors import ConfigError, ImageError
from .bzimage import CAN_USE_HEAP, looks_like_bzimage, parse_bzimage
from .imagefile import read_image
from .optionrom import option_rom

SETUP_ADDR = 0x10000          # the real-mode setup (segment 0x1000)
CMDLINE_ADDR = 0x20000        # right above its 64 KiB
KERNEL_ADDR = 0x100000        # the protected-mode kernel, at 1 MiB
STACK_TOP = 0xFFF0            # SP the ROM gives the setup code (optionrom/linuxboot.S)
HEAP_END = CMDLINE_ADDR - SETUP_ADDR - 0x200   # the boot protocol: stack end - 0x200
LOADER_TYPE = 0xFF            # no assigned boot loader id
# Below the top of low RAM: the firmware's own tables (ACPI, its high zone)
# sit there, and the initrd must not overwrite them.
FIRMWARE_TOP_RESERVE = 4 << 20
ROM_NAME = "genroms/linuxboot.bin"


def linuxboot_fw_cfg(config: VmConfig, low_ram: int) -> tuple[dict, list[tuple[str, bytes]]]:
    """(FwCfg keyword arguments, fw_cfg files) that boot config.kernel with
    its initrd and command line. `low_ram` is the RAM below 4 GiB.
    Raises ConfigError or ImageError for an image this cannot boot."""
    path = os.fspath(config.kernel)
    image = read_image(path, "kernel")
    if not looks_like_bzimage(image):
        raise ConfigError(f"--bios with --kernel {path}: only bzImage kernels boot through the firmware")
    bz = parse_bzimage(image)
    cmdline = " ".join(filter(None, (config.cmdline, config.linux_cmdline_extra)))
    limit = bz.header.cmdline_size or 255
    if len(cmdline) > limit:
        raise ImageError(f"{path}: command line of {len(cmdline)} bytes is longer than its {limit}")
    initrd = None
    initrd_addr = 0
    if config.initrd:
        if len(config.initrd) > 1:
            raise ConfigError("--bios with --kernel: one initrd at most")
        data = read_image(os.fspath(config.initrd[0]), "initrd")
        top = min(bz.header.initrd_addr_max, low_ram - FIRMWARE_TOP_RESERVE)
        initrd_addr = (top - len(data)) & ~0xFFF
        if initrd_addr < KERNEL_ADDR + len(bz.kernel):
            raise ImageError(f"{config.initrd[0]}: {len(data)} bytes do not fit in guest RAM beside the kernel")
        initrd = (initrd_addr, data)
    header = bz.header.replace(type_of_loader=LOADER_TYPE, loadflags=bz.header.loadflags | CAN_USE_HEAP,
                               heap_end_ptr=HEAP_END, cmd_line_ptr=CMDLINE_ADDR,
                               ramdisk_image=initrd_addr, ramdisk_size=len(initrd[1]) if initrd else 0)
    setup = bytearray(bz.setup)
    header.pack_into(setup)
    args = {"setup": (SETUP_ADDR, bytes(setup)), "kernel": (KERNEL_ADDR, bz.kernel), "initrd": initrd,
            "cmdline": cmdline, "cmdline_addr": CMDLINE_ADDR}
    files = [(ROM_NAME, option_rom("linuxboot")), ("bootorder", f"/rom@{ROM_NAME}\n".encode())]
    return args, files


__all__ = ["CMDLINE_ADDR", "KERNEL_ADDR", "SETUP_ADDR", "linuxboot_fw_cfg"]
