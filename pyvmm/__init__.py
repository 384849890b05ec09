"""pyvmm: a multi-mode x86 virtual machine monitor written in Python."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from pyvmm import VM` without importing the API for every `pyvmm` command.
    if name == "VM":
        from .vm import VM
        return VM
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
