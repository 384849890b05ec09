"""What a network backend is to a NIC model: a port that takes the frames
the guest sends and hands over the frames the guest should receive.

    send(frame)        one Ethernet frame from the guest (no virtio header);
                       never blocks: a backend that cannot take it drops it
    on_receive(cb)     cb(frame) for each frame for the guest, called on the
                       machine's event loop (under the machine's lock)
    close()            stops receiving and releases the backend

The TAP device (tap.py) is one; a port on a `pyvmm switch` or any QEMU
stream server (switch_client.StreamPort) is another.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from ..errors import VmmError

# The largest frame a backend reads or passes on (without GSO a frame is at
# most the MTU plus 18 bytes; 64 KiB leaves room for jumbo MTUs).
MAX_FRAME = 65536

FrameHandler = Callable[[bytes], None]


class NetError(VmmError):
    """A network backend cannot be opened or used."""


@runtime_checkable
class NetPort(Protocol):
    """One end of a network link, as a NIC model sees it."""

    def send(self, frame: bytes) -> None: ...
    def on_receive(self, callback: FrameHandler) -> None: ...
    def close(self) -> None: ...


__all__ = ["NetPort", "NetError", "FrameHandler", "MAX_FRAME"]
