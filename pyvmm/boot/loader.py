"""Choosing the boot protocol for a guest image and loading it.

Linux bzImages and vmlinux ELF files are handled by linux.py.  Other images
are offered, in order, to the optional protocol modules listed in
PROTOCOL_MODULES; each exposes `probe(image) -> bool` and
`load(memory, config, image) -> BootResult`.  A module that is not there
(not written yet) is skipped.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from ..config import VmConfig
from ..errors import ConfigError, ImageError
from ..memory import GuestMemory
from .bzimage import looks_like_bzimage
from .elf import is_linux_elf
from .imagefile import read_image
from .result import BootResult

log = logging.getLogger(__name__)

PROTOCOL_MODULES = ("pyvmm.boot.multiboot", "pyvmm.boot.pvh")


def _protocol_modules() -> list[ModuleType]:
    mods = []
    for name in PROTOCOL_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise      # the module exists but something it needs is missing
            log.debug("boot protocol module %s not available", name)
    return mods


def load_guest(memory: GuestMemory, config: VmConfig) -> BootResult:
    """Loads config.kernel (with initrd and command line) into `memory` and
    returns the boot vCPU's entry state.

    Raises ConfigError when no kernel is given or a file cannot be read,
    ImageError when the image is of no known kind or does not fit."""
    if not config.kernel:
        raise ConfigError("no kernel image given")
    path = os.fspath(config.kernel)
    image = read_image(path, "kernel")
    if looks_like_bzimage(image) or is_linux_elf(image):
        from .linux import load_linux
        result = load_linux(memory, config, image=image)
    else:
        for mod in _protocol_modules():
            if mod.probe(image):
                log.debug("%s: loading with %s", path, mod.__name__)
                result = mod.load(memory, config, image)
                break
        else:
            raise ImageError(f"{path}: not a bzImage, ELF kernel or Multiboot image")
    log.info("%s: %s", result.protocol, result.summary)
    return result
