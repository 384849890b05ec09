"""The layout of the XSAVE area that bt offers (Intel SDM Vol. 1, 13.4):
the components XCR0 may enable and where each lives.  Constants and one
function only, so that CPUID (leaf 0xD) and the XSAVE family share them."""

from __future__ import annotations

X87, SSE, AVX = 1, 2, 4          # XCR0 / XSTATE_BV bits of the components
AVX_OFF, AVX_SIZE = 576, 256     # component 2: YMM0-15 bits 255:128
LEGACY_AND_HEADER = 576          # the 512-byte legacy region and the 64-byte header


def area_size(xcr0: int) -> int:
    """Bytes of a standard-form area holding the components in xcr0 (also
    the compacted size: component 2 sits at the same offset)."""
    return AVX_OFF + AVX_SIZE if xcr0 & AVX else LEGACY_AND_HEADER
