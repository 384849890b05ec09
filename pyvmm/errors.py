"""The one exception hierarchy of pyvmm.

The CLI turns any VmmError into a one-line message and a non-zero exit code;
anything else escaping is a bug in pyvmm.
"""


class VmmError(Exception):
    """Root of every error pyvmm reports to its user."""

    exit_code = 1


class ConfigError(VmmError):
    """The VM description is invalid (bad size, missing file, bad option)."""


class ImageError(VmmError):
    """A kernel, initrd or other guest image cannot be used."""


class GuestMemoryError(VmmError):
    """An access falls outside guest RAM."""

    def __init__(self, gpa: int, size: int, message: str = "outside guest RAM"):
        super().__init__(f"guest physical 0x{gpa:x}+{size}: {message}")
        self.gpa = gpa
        self.size = size


class StateError(VmmError):
    """A command that needs another run state or mode ("not while running",
    "the dirty log is off")."""


class BusError(VmmError):
    """A device cannot be placed on a bus (overlap, zero length)."""


class EngineError(VmmError):
    """The CPU engine cannot be created or cannot go on."""


class GuestCrash(EngineError):
    """The guest stopped in a way the engine cannot continue from
    (e.g. KVM's emulation failure); carries a register dump."""

    exit_code = 3
