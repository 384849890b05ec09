"""What pyvmm puts inside the guest: the default initramfs and its cpio writer."""

from .cpio import CpioEntry, CpioWriter, read_cpio
from .initramfs import (READY_MARKER, build_default_initramfs, default_initramfs_path,
                        ensure_default_initramfs, write_default_initramfs)

__all__ = ["CpioEntry", "CpioWriter", "read_cpio", "READY_MARKER", "build_default_initramfs",
           "default_initramfs_path", "ensure_default_initramfs", "write_default_initramfs"]
