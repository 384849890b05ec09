"""Frames on a byte stream, as QEMU's `-netdev stream` sends them: each
Ethernet frame is preceded by its length as a 4-byte big-endian integer,
so a QEMU VM can join the switch over the same Unix socket.

Ethernet header helpers live here too, since every part of the switch
reads the same three fields."""

from __future__ import annotations

import struct

LENGTH = struct.Struct(">I")
ETH_HLEN = 14
ETH_P_8021Q = 0x8100
VLAN_HLEN = 4
DEFAULT_MAX_FRAME = 1522        # 1500 bytes of payload, the header and one 802.1Q tag
HARD_LIMIT = 1 << 20            # beyond this the length word is garbage, not a big frame


class FramingError(ValueError):
    """The stream cannot be followed any more (a length word beyond HARD_LIMIT)."""


def encode(frame: bytes) -> bytes:
    return LENGTH.pack(len(frame)) + frame


class StreamDecoder:
    """Cuts a byte stream into frames. Frames longer than max_frame are
    skipped without being buffered and counted in `oversized`; feed()
    raises FramingError when a length is beyond HARD_LIMIT."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._skip = 0                  # bytes of an oversized frame still to throw away
        self.oversized = 0

    def __repr__(self) -> str:
        return f"StreamDecoder(buffered={len(self._buf)}, oversized={self.oversized})"

    def feed(self, data: bytes) -> list[bytes]:
        """The whole frames completed by data, in order. Each frame is one
        slice of the received bytes (a single copy); only an incomplete
        tail is kept in the buffer."""
        frames: list[bytes] = []
        if self._buf or self._skip:
            self._buf += data
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data if type(data) is bytes else bytes(data)     # frames must be hashable slices
        pos, end = 0, len(buf)
        unpack, limit = LENGTH.unpack_from, self.max_frame
        append = frames.append
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                if self._skip:
                    break
            if end - pos < 4:
                break
            (length,) = unpack(buf, pos)
            if length > limit:
                if length > HARD_LIMIT:
                    raise FramingError(f"frame length {length} is beyond {HARD_LIMIT}")
                self.oversized += 1
                self._skip = length
                pos += 4
                continue
            stop = pos + 4 + length
            if stop > end:
                break
            append(buf[pos + 4:stop])
            pos = stop
        if pos < end:
            self._buf += buf[pos:]
        return frames


def is_multicast(mac: bytes) -> bool:
    """Broadcast is multicast too: the group bit of the first octet."""
    return bool(mac[0] & 1)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Raises ValueError for anything but six colon-separated hex octets."""
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def vlan_of(frame: bytes) -> int | None:
    """The VLAN ID of an 802.1Q-tagged frame, None when untagged."""
    if len(frame) >= ETH_HLEN + VLAN_HLEN and frame[12] == 0x81 and frame[13] == 0x00:
        return ((frame[14] << 8) | frame[15]) & 0xFFF
    return None


def push_tag(frame: bytes, vlan: int) -> bytes:
    return frame[:12] + struct.pack(">HH", ETH_P_8021Q, vlan & 0xFFF) + frame[12:]


def pop_tag(frame: bytes) -> bytes:
    return frame[:12] + frame[16:]
