"""What the hypercall page holds, per engine.

The guest calls offset 0 with the operation in RAX.  Both sequences are
the same bytes in 32- and 64-bit code:

  bt:  vmcall; ret             the translator turns vmcall into a direct call
                               of the dispatcher (engines/bt/pvcall.py)
  hw:  push rdx; mov dx, PORT; out dx, al; pop rdx; ret
                               KVM handles vmcall itself, so an I/O exit to
                               pyvmm's doorbell (devices/pv_doorbell.py) it is

The rest of the page is int3, so a stray call lands on a breakpoint."""

from __future__ import annotations

import struct

from ..errors import ConfigError
from . import abi

BT_ENTRY = b"\x0f\x01\xc1\xc3"
HW_ENTRY = b"\x52\x66\xba" + struct.pack("<H", abi.DOORBELL_PORT) + b"\xee\x5a\xc3"
FILL = b"\xcc"


def entry_code(engine: str) -> bytes:
    """The entry sequence for `engine` ("bt" or "hw"). Raises ConfigError."""
    if engine == "bt":
        return BT_ENTRY
    if engine == "hw":
        return HW_ENTRY
    raise ConfigError(f"no hypercall page for engine {engine!r}")


def page_bytes(engine: str) -> bytes:
    """The whole 4 KiB page for `engine`. Raises ConfigError."""
    code = entry_code(engine)
    return code + FILL * (abi.PAGE_SIZE - len(code))
