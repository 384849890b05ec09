"""A host TAP device as a NetPort: frames the guest sends are written to
the TAP, frames the host sends to the TAP are read on the machine's event
loop (never on a vCPU thread) and handed to the NIC model.

The device is opened through /dev/net/tun with IFF_TAP | IFF_NO_PI (plain
Ethernet frames, no packet-information prefix and no virtio header: the
NIC offers no checksum or segmentation offloads).  TUNSETIFF on a name
that does not exist creates the interface (it needs CAP_NET_ADMIN) and it
goes away when pyvmm closes it; an existing one (`ip tuntap add`) is
attached to.  The interface is left down and unaddressed: configuring the
host side is the user's business.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from .port import MAX_FRAME, FrameHandler, NetError

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
IFNAMSIZ = 16
IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")      # struct ifreq: name, ifr_flags, union padding
# Frames read per readable event before the loop serves others again.
READ_BATCH = 64


def check_ifname(name: str) -> None:
    """Raises NetError for a name Linux would refuse for an interface."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) \
            or name in (".", ".."):
        raise NetError(f"tap={name!r}: not a valid interface name (1 to {IFNAMSIZ - 1} characters, "
                       "no '/' or spaces)")


class TapPort:
    """The TAP interface `ifname`, read on `loop` (an EventLoop) once
    on_receive() is called.  Raises NetError (one line) from the
    constructor when the device cannot be opened or created."""

    def __init__(self, ifname: str, loop=None):
        check_ifname(ifname)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise NetError(f"tap={ifname}: cannot open {TUN_PATH}: {e.strerror}") from None
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(ifname.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            why = ("creating a TAP device needs CAP_NET_ADMIN (or create it first with "
                   "`ip tuntap add dev NAME mode tap user USER`)" if e.errno == errno.EPERM
                   else "the interface exists and is not a TAP device, or is in use" if e.errno in
                   (errno.EINVAL, errno.EBUSY) else e.strerror)
            raise NetError(f"tap={ifname}: cannot attach: {why}") from None
        self.fd = fd
        self.ifname = IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
        self.loop = loop
        self._callback: FrameHandler | None = None
        self.rx_frames = self.tx_frames = 0
        self.tx_dropped = 0
        log.info("TAP %s attached", self.ifname)

    def __repr__(self) -> str:
        return (f"TapPort({self.ifname}, rx={self.rx_frames}, tx={self.tx_frames}, "
                f"tx_dropped={self.tx_dropped}, {'open' if self.fd >= 0 else 'closed'})")

    def send(self, frame: bytes) -> None:
        """Writes one frame; a full TAP queue or a TAP that is down drops it."""
        if self.fd < 0:
            self.tx_dropped += 1
            return
        try:
            os.write(self.fd, frame)
            self.tx_frames += 1
        except OSError as e:   # EAGAIN: host queue full; EIO: interface down
            self.tx_dropped += 1
            log.debug("TAP %s: frame of %d bytes dropped: %s", self.ifname, len(frame), e.strerror)

    def on_receive(self, callback: FrameHandler) -> None:
        """Starts reading frames on the loop, each passed to callback."""
        self._callback = callback
        if self.loop is None:
            raise NetError(f"tap={self.ifname}: no event loop to read on")
        self.loop.add_reader(self.fd, self._on_readable)

    def read_pending(self) -> int:
        """Reads up to READ_BATCH waiting frames into the callback; returns
        how many (the loop's reader, and tests without a loop)."""
        n = 0
        while n < READ_BATCH and self.fd >= 0:
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("TAP %s: read failed: %s", self.ifname, e.strerror)
                break
            n += 1
            self.rx_frames += 1
            if self._callback is not None:
                self._callback(frame)
        return n

    def _on_readable(self) -> None:
        self.read_pending()

    def close(self) -> None:
        """Stops reading and closes the TAP (a TAP pyvmm created goes away). Idempotent."""
        if self.fd < 0:
            return
        if self.loop is not None and self._callback is not None:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1


__all__ = ["TapPort", "check_ifname", "TUN_PATH"]
