"""Virtual disks: one DiskImage contract (image.py) and a module per format
(raw.py, qcow2.py, vmdk.py). `open_image` probes a file and opens it."""

from .image import (CorruptImageError, DiskImage, Extent, ImageError, Status, UnsupportedImageError,
                    open_image, probe_format)
from . import formats  # noqa: F401  (fills image.OPENERS)
from .create import create_image

__all__ = ["CorruptImageError", "DiskImage", "Extent", "ImageError", "Status", "UnsupportedImageError",
           "open_image", "probe_format", "create_image"]
