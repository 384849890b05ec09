"""Creating empty images: `create_image(path, fmt, size, ...)`."""

from __future__ import annotations

import os
import struct

from .image import ImageError, open_image, probe_format
from .qcow2_layout import Header

DEFAULT_CLUSTER_SIZE = 65536


def create_image(path: str, fmt: str, size: int | None, *, backing: str | None = None,
                 backing_fmt: str | None = None, options: dict[str, str] | None = None) -> None:
    """Writes a new empty image. `size` None takes the backing file's size.
    Raises ImageError for bad options or an unusable backing file."""
    options = dict(options or {})
    if backing is not None:
        resolved = backing if os.path.isabs(backing) else os.path.join(
            os.path.dirname(os.path.abspath(path)), backing)
        backing_fmt = backing_fmt or probe_format(resolved)
        with open_image(resolved, backing_fmt, readonly=True) as base:
            if size is None:
                size = base.size
    if size is None:
        raise ImageError("image size is required without a backing file")
    if size < 0:
        raise ImageError(f"bad image size {size}")
    if fmt == "raw":
        if backing:
            raise ImageError("raw images cannot have a backing file")
        _refuse_options(options, set())
        from .raw import RawImage
        RawImage.create(path, size)
    elif fmt == "qcow2":
        _refuse_options(options, {"cluster_size", "compat", "refcount_bits"})
        create_qcow2(path, size, cluster_size=parse_size(options.get("cluster_size", str(DEFAULT_CLUSTER_SIZE))),
                     backing=backing, backing_fmt=backing_fmt,
                     refcount_bits=int(options.get("refcount_bits", "16")),
                     compat=options.get("compat", "1.1"))
    elif fmt == "vmdk":
        _refuse_options(options, {"subformat", "adapter_type"})
        from .vmdk import create_vmdk
        create_vmdk(path, size, subformat=options.get("subformat", "monolithicSparse"),
                    backing=backing, adapter_type=options.get("adapter_type", "ide"))
    else:
        raise ImageError(f"cannot create images of format {fmt!r} (raw, qcow2, vmdk)")


def _refuse_options(options: dict[str, str], known: set[str]) -> None:
    unknown = set(options) - known
    if unknown:
        raise ImageError(f"unknown option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known)) or 'none'})")


def parse_size(text: str) -> int:
    """'64K', '1G', '512', '1.5M' -> bytes (qemu-img's suffixes, powers of 1024).
    Raises ImageError."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in units and not t[-1].isdigit() else ""
    number = t[:-1] if unit else t
    try:
        value = float(number) * units[unit] if "." in number else int(number) * units[unit]
    except ValueError:
        raise ImageError(f"bad size {text!r} (e.g. 512, 64K, 10G)") from None
    if value < 0 or value != int(value):
        raise ImageError(f"bad size {text!r}")
    return int(value)


def create_qcow2(path: str, size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE, backing: str | None = None,
                 backing_fmt: str | None = None, refcount_bits: int = 16, compat: str = "1.1") -> None:
    """Layout: header in cluster 0, refcount table in 1, its one refcount
    block in 2, the L1 table from 3 on; every other cluster comes later."""
    if cluster_size & (cluster_size - 1) or not 4096 <= cluster_size <= 2 << 20:
        raise ImageError(f"cluster_size {cluster_size} must be a power of two from 4K to 2M")
    if refcount_bits not in (8, 16, 32, 64):
        raise ImageError(f"refcount_bits {refcount_bits}: pyvmm writes 8, 16, 32 or 64")
    if compat not in ("1.1", "v3"):
        raise ImageError(f"compat={compat}: pyvmm writes only qcow2 version 3 (compat=1.1)")
    cluster_bits = cluster_size.bit_length() - 1
    cs = cluster_size
    l1_size = -(-size // (cs * (cs // 8)))
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    used = 3 + l1_clusters
    rb_entries = cs * 8 // refcount_bits
    if used > rb_entries:
        raise ImageError(f"a {size}-byte disk needs an L1 table too big for cluster_size {cs}")
    header = Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits, size=size,
                    crypt_method=0, l1_size=l1_size, l1_table_offset=3 * cs, refcount_table_offset=cs,
                    refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0,
                    refcount_order=refcount_bits.bit_length() - 1,
                    backing_file=backing, backing_format=backing_fmt if backing else None)
    fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[refcount_bits]
    refblock = struct.pack(f">{rb_entries}{fmt}", *([1] * used + [0] * (rb_entries - used)))
    try:
        with open(path, "wb") as f:
            f.write(header.pack())
            f.seek(cs)
            f.write(struct.pack(">Q", 2 * cs))
            f.seek(2 * cs)
            f.write(refblock)
            f.truncate(used * cs)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
