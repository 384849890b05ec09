"""pyvmm: a multi-mode x86 virtual machine monitor written in Python."""

__version__ = "0.1.0"
