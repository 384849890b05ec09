"""The openers open_image (image.py) dispatches to, one per format.  Kept
apart from image.py so that the format modules, which open their backing
files through open_image, and image.py do not import each other."""

from __future__ import annotations

from .image import OPENERS, DiskImage
from .qcow2 import Qcow2Image
from .qcow2_check import check_qcow2
from .raw import RawImage
from .vmdk import VmdkImage


def _open_qcow2(path: str, readonly: bool, seen: tuple[str, ...]) -> DiskImage:
    img = Qcow2Image(path, readonly=readonly, seen=seen)
    if img.needs_recount:     # dirty with lazy refcounts: recount before writing
        try:
            check_qcow2(img, "all")
        except BaseException:
            img.close()
            raise
    return img


OPENERS.update(
    raw=lambda path, readonly, seen: RawImage(path, readonly=readonly),
    qcow2=_open_qcow2,
    vmdk=lambda path, readonly, seen: VmdkImage(path, readonly=readonly, seen=seen),
)
