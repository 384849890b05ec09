"""Software segmentation of the TCP super-frames a packet socket hands
the switch.

A veth (or any interface whose peer offers TSO/GRO) passes the host's TCP
segments on unsegmented: an AF_PACKET socket on it reads one frame of up
to 64 KiB where the wire would carry MSS-sized ones, with a virtio_net_hdr
in front (PACKET_VNET_HDR) saying so: gso_type TCPV4/TCPV6 and gso_size,
the payload of each segment.  No VM and no switch port takes such a frame
(a guest's receive buffers hold one MTU), so a TCP transfer from the host
into a VM stalled as soon as the host's congestion window let it build
one.  A guest's virtio-net with TCP segmentation offload (HOST_TSO4/6,
devices/virtio/net_offload.py) hands over the same kind of frame.

segment_tcp() cuts it as the kernel's own GSO would: each piece gets the
headers, the sequence number advanced by its offset, IPv4 length and ID
(or IPv6 payload length), FIN/PSH only on the last piece, CWR only on the
first, and its checksums computed in full."""

from __future__ import annotations

import struct
from typing import NamedTuple

# struct virtio_net_hdr, host-endian on a packet socket: flags, gso_type,
# hdr_len, gso_size, csum_start, csum_offset
VNET_HDR = struct.Struct("=BBHHHH")
VNET_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
PROTO_TCP = 6


def _fold(n: int) -> int:
    """The checksum field for a sum of big-endian 16-bit words held as one
    integer: 2**16 = 1 mod 0xFFFF, so parts may be added as integers
    (net_offload's reduction, kept here to leave this module free of the
    device package)."""
    s = n % 0xFFFF
    return ~(0xFFFF if s == 0 and n else s) & 0xFFFF


def _words(data: bytes | memoryview) -> int:
    """data as an integer of 16-bit words (an odd length padded with 0)."""
    return int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)


class TcpLayout(NamedTuple):
    """Where the headers of an Ethernet/IP/TCP frame lie (offsets into it)."""
    ip: int          # the IP header (after Ethernet and any 802.1Q tag)
    v4: bool
    tcp: int         # the TCP header
    payload: int     # the TCP payload
    end: int         # the end of the IP packet (bytes past it are padding)


def tcp_layout(frame: bytes | bytearray) -> TcpLayout | None:
    """The layout of an unfragmented IPv4 or IPv6 (no extension headers)
    TCP frame, optionally 802.1Q-tagged, whose lengths agree with each
    other and fit the frame; None for anything else."""
    at, ethertype = 14, bytes(frame[12:14]) if len(frame) >= 14 else b""
    if ethertype == b"\x81\x00" and len(frame) >= 18:
        at, ethertype = 18, bytes(frame[16:18])
    if ethertype == b"\x08\x00" and len(frame) >= at + 20 and frame[at] >> 4 == 4:
        v4, ihl = True, (frame[at] & 0xF) * 4
        total, frag = struct.unpack_from(">H2xH", frame, at + 2)
        ip_end, proto = at + total, frame[at + 9]
        if ihl < 20 or frag & 0x3FFF:
            return None
    elif ethertype == b"\x86\xdd" and len(frame) >= at + 40 and frame[at] >> 4 == 6:
        v4, ihl = False, 40
        ip_end = at + 40 + struct.unpack_from(">H", frame, at + 4)[0]
        proto = frame[at + 6]
    else:
        return None
    l4 = at + ihl
    if proto != PROTO_TCP or ip_end > len(frame) or l4 + 20 > ip_end:
        return None
    tcp_len = (frame[l4 + 12] >> 4) * 4
    if tcp_len < 20 or l4 + tcp_len > ip_end:
        return None
    return TcpLayout(at, v4, l4, l4 + tcp_len, ip_end)


def segment_tcp(frame: bytes, mss: int) -> list[bytes]:
    """frame (Ethernet, optionally 802.1Q, IPv4 or IPv6 without extension
    headers, TCP: see tcp_layout) cut into frames of at most `mss` payload
    bytes each.  A frame this does not understand, or whose payload fits,
    comes back alone, its checksums untouched."""
    layout = tcp_layout(frame)
    if layout is None or mss <= 0 or layout.end - layout.payload <= mss:
        return [frame]
    at, v4, l4, start, ip_end = layout
    payload = memoryview(frame)[start:ip_end]
    seq = struct.unpack_from(">I", frame, l4 + 4)[0]
    ip_id = struct.unpack_from(">H", frame, at + 4)[0] if v4 else 0
    flags = frame[l4 + 13]
    # Templates with the fields that change from piece to piece zeroed
    # (IPv4 length, ID and checksum or IPv6 payload length; TCP sequence,
    # flags and checksum) and their sums, to which each piece adds its own.
    ip = bytearray(frame[at:l4])
    if v4:
        struct.pack_into(">HH", ip, 2, 0, 0)
        struct.pack_into(">H", ip, 10, 0)
        addresses = frame[at + 12:at + 20]
    else:
        struct.pack_into(">H", ip, 4, 0)
        addresses = frame[at + 8:at + 40]
    tcp = bytearray(frame[l4:start])
    struct.pack_into(">I", tcp, 4, 0)
    tcp[13] = 0
    struct.pack_into(">H", tcp, 16, 0)
    ip_sum = _words(ip)
    tcp_sum = _words(addresses) + PROTO_TCP + _words(tcp)      # the pseudo-header less its length, the header
    eth = frame[:at]
    out = []
    for i, off in enumerate(range(0, len(payload), mss)):
        chunk = payload[off:off + mss]
        last = off + mss >= len(payload)
        seg_tcp_len = start - l4 + len(chunk)
        if v4:
            total, ident = start - at + len(chunk), (ip_id + i) & 0xFFFF
            struct.pack_into(">HH", ip, 2, total, ident)
            struct.pack_into(">H", ip, 10, _fold(ip_sum + total + ident))
        else:
            struct.pack_into(">H", ip, 4, seg_tcp_len)
        piece_seq = (seq + off) & 0xFFFFFFFF
        piece_flags = flags & ~((0 if last else TCP_FIN | TCP_PSH) | (TCP_CWR if i else 0))
        struct.pack_into(">I", tcp, 4, piece_seq)
        tcp[13] = piece_flags
        struct.pack_into(">H", tcp, 16, _fold(tcp_sum + seg_tcp_len + piece_seq + piece_flags + _words(chunk)))
        out.append(b"".join((eth, ip, tcp, chunk)))
    return out


__all__ = ["segment_tcp", "tcp_layout", "TcpLayout", "VNET_HDR", "VNET_F_NEEDS_CSUM", "GSO_NONE", "GSO_TCPV4",
           "GSO_TCPV6", "GSO_ECN"]
