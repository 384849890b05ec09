"""Software segmentation of the TCP super-frames a packet socket hands
the switch.

A veth (or any interface whose peer offers TSO/GRO) passes the host's TCP
segments on unsegmented: an AF_PACKET socket on it reads one frame of up
to 64 KiB where the wire would carry MSS-sized ones, with a virtio_net_hdr
in front (PACKET_VNET_HDR) saying so: gso_type TCPV4/TCPV6 and gso_size,
the payload of each segment.  No VM and no switch port takes such a frame
(a guest's receive buffers hold one MTU), so a TCP transfer from the host
into a VM stalled as soon as the host's congestion window let it build
one.  segment_tcp() cuts it as the kernel's own GSO would: each piece gets
the headers, the sequence number advanced by its offset, IPv4 length and
ID (or IPv6 payload length), FIN/PSH only on the last piece, CWR only on
the first, and its checksums computed in full."""

from __future__ import annotations

import struct

# struct virtio_net_hdr, host-endian on a packet socket: flags, gso_type,
# hdr_len, gso_size, csum_start, csum_offset
VNET_HDR = struct.Struct("=BBHHHH")
VNET_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
PROTO_TCP = 6


def _sum16(data: bytes | memoryview) -> int:
    """The folded ones' complement sum (net_offload's, inlined to keep this
    module free of the device package)."""
    n = int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and n else s


def _checksum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def segment_tcp(frame: bytes, mss: int) -> list[bytes]:
    """frame (Ethernet, optionally 802.1Q, IPv4 or IPv6 without extension
    headers, TCP) cut into frames of at most `mss` payload bytes each.  A
    frame this does not understand, or whose payload fits, comes back
    alone, its checksums untouched."""
    at, ethertype = 14, frame[12:14] if len(frame) >= 14 else b""
    if ethertype == b"\x81\x00" and len(frame) >= 18:
        at, ethertype = 18, frame[16:18]
    if ethertype == b"\x08\x00" and len(frame) >= at + 20 and frame[at] >> 4 == 4:
        v4, ihl = True, (frame[at] & 0xF) * 4
        ip_end = at + struct.unpack_from(">H", frame, at + 2)[0]
        proto = frame[at + 9]
    elif ethertype == b"\x86\xdd" and len(frame) >= at + 40:
        v4, ihl = False, 40
        ip_end = at + 40 + struct.unpack_from(">H", frame, at + 4)[0]
        proto = frame[at + 6]
    else:
        return [frame]
    l4 = at + ihl
    if proto != PROTO_TCP or mss <= 0 or ip_end > len(frame) or l4 + 20 > ip_end:
        return [frame]
    tcp_len = (frame[l4 + 12] >> 4) * 4
    payload = frame[l4 + tcp_len:ip_end]
    if tcp_len < 20 or l4 + tcp_len > ip_end or len(payload) <= mss:
        return [frame]
    seq = struct.unpack_from(">I", frame, l4 + 4)[0]
    ip_id = struct.unpack_from(">H", frame, at + 4)[0] if v4 else 0
    flags = frame[l4 + 13]
    out = []
    for i, off in enumerate(range(0, len(payload), mss)):
        chunk = payload[off:off + mss]
        last = off + mss >= len(payload)
        ip = bytearray(frame[at:l4])
        tcp = bytearray(frame[l4:l4 + tcp_len])
        if v4:
            struct.pack_into(">HH", ip, 2, ihl + tcp_len + len(chunk), (ip_id + i) & 0xFFFF)
            struct.pack_into(">H", ip, 10, 0)
            struct.pack_into(">H", ip, 10, _checksum(bytes(ip)))
            pseudo = ip[12:20] + struct.pack(">BBH", 0, PROTO_TCP, tcp_len + len(chunk))
        else:
            struct.pack_into(">H", ip, 4, tcp_len + len(chunk))
            pseudo = ip[8:40] + struct.pack(">IxxxB", tcp_len + len(chunk), PROTO_TCP)
        struct.pack_into(">I", tcp, 4, (seq + off) & 0xFFFFFFFF)
        tcp[13] = flags & ~((0 if last else TCP_FIN | TCP_PSH) | (TCP_CWR if i else 0))
        struct.pack_into(">H", tcp, 16, 0)
        struct.pack_into(">H", tcp, 16, _checksum(bytes(pseudo) + bytes(tcp) + chunk))
        out.append(frame[:at] + bytes(ip) + bytes(tcp) + chunk)
    return out


__all__ = ["segment_tcp", "VNET_HDR", "VNET_F_NEEDS_CSUM", "GSO_NONE", "GSO_TCPV4", "GSO_TCPV6", "GSO_ECN"]
