"""The switch's ways out to the host: a TAP device the switch creates (or
attaches to) and AF_PACKET on an existing interface (veth or physical).

Both are non-blocking fds the switch's selector loop waits on. A TAP
opener lives here for now; pyvmm/net/tap.py (virtio-net's backend) may
take it over."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from .gso import GSO_ECN, GSO_TCPV4, GSO_TCPV6, VNET_F_NEEDS_CSUM, VNET_HDR, segment_tcp

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
RECV_SIZE = 1 << 17                     # a 64 KiB GSO frame, its tag and its virtio_net_hdr
NO_VNET_HDR = bytes(VNET_HDR.size)      # what every frame we send starts with: no offload asked
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_CSUMNOTREADY = 0x8
L4_CHECKSUM_AT = {6: 16, 17: 6}        # TCP, UDP: where the checksum sits in the header
AUXDATA = struct.Struct("=IIIHHHH")    # struct tpacket_auxdata
READ_BATCH = 64                         # frames per wake-up, so one uplink cannot starve the rest
GONE = (errno.ENODEV, errno.ENXIO, errno.EBADF, errno.EBADFD, errno.EIO)


class UplinkGone(OSError):
    """The interface behind the uplink disappeared."""


def open_tap(ifname: str) -> int:
    """A non-blocking fd for TAP device ifname (made if missing), frames
    without the packet-info header. Raises OSError."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class TapUplink:
    def __init__(self, ifname: str):
        self.ifname = ifname
        self.fd = open_tap(ifname)
        self.kind = "tap"

    def __repr__(self) -> str:
        return f"TapUplink({self.ifname}, fd={self.fd})"

    def read_frames(self) -> list[bytes]:
        """Raises UplinkGone when the device is gone."""
        out = []
        for _ in range(READ_BATCH):
            try:
                out.append(os.read(self.fd, 65536))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in GONE:
                    raise UplinkGone(e.errno, f"TAP {self.ifname}: {e.strerror}") from None
                break
        return out

    def send(self, frame: bytes) -> bool:
        try:
            return os.write(self.fd, frame) == len(frame)
        except OSError:
            return False            # full, or the link is down: a dropped frame

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def finish_checksum(frame: bytes) -> bytes:
    """frame with its TCP/UDP checksum completed. A packet socket gets the
    host's own packets before checksum offload has run (TP_STATUS_CSUMNOTREADY:
    the field holds only the pseudo-header sum); a VM would drop them."""
    from ..devices.virtio.net_offload import ones_complement_sum
    ethertype, at = struct.unpack_from(">H", frame, 12)[0] if len(frame) >= 14 else 0, 14
    if ethertype == 0x8100 and len(frame) >= 18:
        ethertype, at = struct.unpack_from(">H", frame, 16)[0], 18
    if ethertype == 0x0800 and len(frame) >= at + 20:
        proto, start = frame[at + 9], at + (frame[at] & 0xF) * 4
        end = at + struct.unpack_from(">H", frame, at + 2)[0]
    elif ethertype == 0x86DD and len(frame) >= at + 40:
        proto, start = frame[at + 6], at + 40
        end = start + struct.unpack_from(">H", frame, at + 4)[0]
    else:
        return frame
    offset = L4_CHECKSUM_AT.get(proto)
    if offset is None or end > len(frame) or start + offset + 2 > end:
        return frame
    out = bytearray(frame)
    value = ~ones_complement_sum(memoryview(out)[start:end]) & 0xFFFF
    struct.pack_into(">H", out, start + offset, value or 0xFFFF)    # 0 and 0xFFFF are the same sum
    return bytes(out)


class PacketUplink:
    """AF_PACKET bound to ifname. VLAN tags that the kernel moved into
    packet metadata (VLAN offload) are put back into the frame, so the
    switch sees what was on the wire. With PACKET_VNET_HDR every frame
    comes with a virtio_net_hdr: TCP super-frames (GSO, from a veth's
    peer) are cut into wire-sized ones here (gso.py), partial checksums
    completed."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        self.kind = "packet"
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.bind((ifname, ETH_P_ALL))
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.fd = self.sock.fileno()

    def __repr__(self) -> str:
        return f"PacketUplink({self.ifname}, fd={self.fd})"

    def read_frames(self) -> list[bytes]:
        out = []
        for _ in range(READ_BATCH):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(AUXDATA.size))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in GONE or (e.errno == errno.ENETDOWN and not _exists(self.ifname)):
                    raise UplinkGone(e.errno, f"{self.ifname}: {e.strerror}") from None
                break           # the link went down (reported once); it may come back up
            if addr[2] == PACKET_OUTGOING or len(data) < VNET_HDR.size:   # our own, looped back to us
                continue
            vflags, gso_type, _hl, gso_size, _cs, _co = VNET_HDR.unpack_from(data)
            data = data[VNET_HDR.size:]
            partial = bool(vflags & VNET_F_NEEDS_CSUM)
            for level, kind, value in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(value) >= AUXDATA.size:
                    status, _l, _s, _m, _n, tci, tpid = AUXDATA.unpack_from(value)
                    if status & TP_STATUS_VLAN_VALID:
                        data = data[:12] + struct.pack(">HH", tpid or 0x8100, tci) + data[12:]
                    partial |= bool(status & TP_STATUS_CSUMNOTREADY)
            pieces = segment_tcp(data, gso_size) if gso_type & ~GSO_ECN in (GSO_TCPV4, GSO_TCPV6) else [data]
            if len(pieces) > 1:
                out.extend(pieces)          # each piece with its checksums complete
            else:
                out.append(finish_checksum(data) if partial else data)
        return out

    def send(self, frame: bytes) -> bool:
        try:
            return self.sock.send(NO_VNET_HDR + frame) == VNET_HDR.size + len(frame)
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            self.sock.close()
            self.fd = -1


def _exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
        return True
    except OSError:
        return False


def open_uplink(kind: str, ifname: str) -> TapUplink | PacketUplink:
    return TapUplink(ifname) if kind == "tap" else PacketUplink(ifname)
