"""Decompressing a bzImage payload (the compressed vmlinux) on the host.

The kernel build compresses vmlinux with one of gzip, bzip2, lzma, xz, lzo,
lz4 or zstd and, for all but gzip (whose own trailer holds it), appends the
uncompressed size as a 4-byte little-endian word.  That word is checked
against what comes out when present; trailing bytes the decompressor does
not consume are otherwise ignored.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import struct
import zlib
from typing import Callable

from ..errors import ImageError

log = logging.getLogger(__name__)

# The kernel's legacy LZ4 frame ("lz4 -l"): a magic word, then blocks each
# prefixed by its compressed size; every block decompresses to at most 8 MiB.
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_MAX = 8 << 20

# (format, magic bytes at offset 0), tested in order.
MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("gzip", b"\x1f\x9e"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("lz4", struct.pack("<I", LZ4_LEGACY_MAGIC)),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzo", b"\x89LZO"),
    ("none", b"\x7fELF"),     # CONFIG_KERNEL_UNCOMPRESSED
)


def detect_format(payload: bytes) -> str:
    """Names the compression of `payload` from its magic bytes
    ("gzip", "xz", "lzma", "lz4", "zstd", "bzip2", "lzo" or "none").

    Raises ImageError when no known magic matches."""
    for name, magic in MAGICS:
        if payload[:len(magic)] == magic:
            return name
    raise ImageError(f"unknown kernel compression (payload starts {payload[:6].hex(' ')})")


def _gzip(payload: bytes) -> tuple[bytes, bytes]:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(payload)
    if not d.eof:
        raise ImageError("gzip payload ends before its end of stream")
    return out, d.unused_data


def _lzma_family(fmt: int) -> Callable[[bytes], tuple[bytes, bytes]]:
    def run(payload: bytes) -> tuple[bytes, bytes]:
        d = lzma.LZMADecompressor(format=fmt)
        out = d.decompress(payload)
        if not d.eof:
            raise ImageError("payload ends before its end of stream")
        return out, d.unused_data
    return run


def _bzip2(payload: bytes) -> tuple[bytes, bytes]:
    d = bz2.BZ2Decompressor()
    out = d.decompress(payload)
    if not d.eof:
        raise ImageError("bzip2 payload ends before its end of stream")
    return out, d.unused_data


def _zstd(payload: bytes) -> tuple[bytes, bytes]:
    try:
        import zstandard
    except ImportError:
        raise ImageError("zstd kernel needs the 'zstandard' Python package") from None
    try:
        d = zstandard.ZstdDecompressor().decompressobj()
        out = d.decompress(payload)
    except zstandard.ZstdError as e:
        raise ImageError(f"zstd: {e}") from None
    if not d.eof:
        raise ImageError("zstd payload ends before its end of frame")
    return out, d.unused_data


def _lz4_legacy(payload: bytes) -> tuple[bytes, bytes]:
    try:
        import lz4.block
    except ImportError:
        raise ImageError("lz4 kernel needs the 'lz4' Python package") from None
    magic = struct.pack("<I", LZ4_LEGACY_MAGIC)
    chunks: list[bytes] = []
    off = 4
    while len(payload) - off >= 4:
        if payload[off:off + 4] == magic:    # concatenated frames
            off += 4
            continue
        size = struct.unpack_from("<I", payload, off)[0]
        if size == 0 or size > len(payload) - off - 4:
            break      # not a block: the appended uncompressed size (or padding)
        block = payload[off + 4:off + 4 + size]
        try:
            chunks.append(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK_MAX))
        except lz4.block.LZ4BlockError as e:
            raise ImageError(f"lz4 block at payload offset {off}: {e}") from None
        off += 4 + size
    if not chunks:
        raise ImageError("lz4 payload has no blocks")
    return b"".join(chunks), payload[off:]


def _none(payload: bytes) -> tuple[bytes, bytes]:
    return payload, b""


_DECODERS: dict[str, Callable[[bytes], tuple[bytes, bytes]]] = {
    "gzip": _gzip,
    "xz": _lzma_family(lzma.FORMAT_XZ),
    "lzma": _lzma_family(lzma.FORMAT_ALONE),
    "bzip2": _bzip2,
    "zstd": _zstd,
    "lz4": _lz4_legacy,
    "none": _none,
}
SUPPORTED_FORMATS = frozenset(_DECODERS)


def decompress_payload(payload: bytes) -> bytes:
    """Decompresses a bzImage payload to the vmlinux ELF it holds.

    Raises ImageError for an unknown or unsupported format (lzo), corrupt data,
    or a result whose size disagrees with the appended size word."""
    fmt = detect_format(payload)
    decoder = _DECODERS.get(fmt)
    if decoder is None:
        raise ImageError(f"{fmt}-compressed kernels are not supported")
    try:
        out, rest = decoder(payload)
    except ImageError as e:
        raise ImageError(f"corrupt {fmt} kernel payload: {e}") from None
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise ImageError(f"corrupt {fmt} kernel payload: {e}") from None
    if len(rest) == 4:
        want = struct.unpack("<I", rest)[0]
        if want != len(out) & 0xFFFFFFFF:
            raise ImageError(f"{fmt} kernel payload decompressed to {len(out)} bytes, "
                             f"its size word says {want}")
    elif rest.strip(b"\0"):
        log.debug("%d bytes after the %s stream ignored", len(rest), fmt)
    log.debug("%s payload: %d -> %d bytes", fmt, len(payload), len(out))
    return out
