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
from .result import BootResult

log = logging.getLogger(__name__)

PROTOCOL_MODULES = ("pyvmm.boot.multiboot", "pyvmm.boot.pvh")


def read_image(path: str, what: str = "kernel") -> bytes:
    """Reads a whole guest image file (`what` names it in messages).

    Raises ConfigError when the file is missing, a directory or unreadable,
    and ImageError when it is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    if not data:
        raise ImageError(f"{what} {path}: file is empty")
    log.debug("read %s %s: %d bytes", what, path, len(data))
    return data


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
