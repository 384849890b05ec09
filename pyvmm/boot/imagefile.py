"""Reading a guest image file (kernel, initrd, module) whole, with the
one-line errors every loader gives for it."""

from __future__ import annotations

import logging

from ..errors import ConfigError, ImageError

log = logging.getLogger(__name__)


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
