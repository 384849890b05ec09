"""TCP super-frames on AF_PACKET uplinks (pyvmm/net/gso.py): a veth hands
a packet socket the host's TCP unsegmented (up to 64 KiB a frame), which
no VM's receive buffer takes; the uplink cuts them into wire-sized frames
with complete checksums.

First segment_tcp() on frames built here (IPv4, IPv6, 802.1Q), then the
real thing: the kernel's TCP between two network namespaces the test makes
over a veth pair, read by a PacketUplink on the receiving end."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import uuid

import pytest

from pyvmm.devices.virtio.net_offload import l4_checksum_ok, ones_complement_sum
from pyvmm.net.gso import segment_tcp

from .team_ns import REPO

MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
PAYLOAD = bytes((i * 7 + i // 251) & 0xFF for i in range(5000))
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80


def tcp_header(seq: int, flags: int) -> bytes:
    # 20 bytes and a 12-byte timestamp option: the headers every segment repeats
    return struct.pack(">HHIIBBHHH", 40000, 5005, seq, 77, 8 << 4, flags, 500, 0, 0) + \
        b"\x01\x01\x08\x0a" + struct.pack(">II", 1, 2)


def ipv4_frame(payload: bytes, flags: int, seq: int = 0xFFFFF000, tag: bytes = b"") -> bytes:
    tcp = tcp_header(seq, flags)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0xFFFE, 0x4000, 64, 6, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    return MAC + tag + b"\x08\x00" + ip + tcp + payload        # checksums left zero, as GSO leaves them


def ipv6_frame(payload: bytes, flags: int, seq: int = 5) -> bytes:
    tcp = tcp_header(seq, flags)
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, b"\xfd" + bytes(14) + b"\x01",
                     b"\xfd" + bytes(14) + b"\x02")
    return MAC + b"\x86\xdd" + ip + tcp + payload


def tcp_of(frame: bytes, at: int, ihl: int) -> tuple[int, int, bytes]:
    """(sequence number, flags, payload) of a segment."""
    l4 = at + ihl
    return struct.unpack_from(">I", frame, l4 + 4)[0], frame[l4 + 13], frame[l4 + 32:]


@pytest.mark.parametrize("tag", [b"", b"\x81\x00\x00\x07"], ids=["untagged", "vlan7"])
def test_an_ipv4_super_frame_is_cut_into_mss_segments_with_complete_checksums(tag):
    at = 14 + len(tag)
    frames = segment_tcp(ipv4_frame(PAYLOAD, ACK | PSH | FIN | CWR, tag=tag), 1448)
    assert [len(f) - at - 52 for f in frames] == [1448, 1448, 1448, 656]
    joined = b""
    for i, f in enumerate(frames):
        assert f[:at] == MAC + tag + b"\x08\x00"
        assert l4_checksum_ok(f), i                                  # TCP checksum over the pseudo-header
        assert ones_complement_sum(f[at:at + 20]) == 0xFFFF, i        # IPv4 header checksum
        total, ip_id = struct.unpack_from(">HH", f, at + 2)
        assert total == len(f) - at and ip_id == (0xFFFE + i) & 0xFFFF
        seq, flags, data = tcp_of(f, at, 20)
        assert seq == (0xFFFFF000 + 1448 * i) & 0xFFFFFFFF             # wraps like the kernel's
        last = i == len(frames) - 1
        assert flags == ACK | (PSH | FIN if last else 0) | (CWR if i == 0 else 0), (i, hex(flags))
        joined += data
    assert joined == PAYLOAD


def test_an_ipv6_super_frame_is_cut_too():
    frames = segment_tcp(ipv6_frame(PAYLOAD, ACK), 1000)
    assert len(frames) == 5 and all(l4_checksum_ok(f) for f in frames)
    assert [struct.unpack_from(">H", f, 18)[0] for f in frames] == [1032] * 5
    assert b"".join(tcp_of(f, 14, 40)[2] for f in frames) == PAYLOAD
    assert [tcp_of(f, 14, 40)[0] for f in frames] == [5 + 1000 * i for i in range(5)]


def test_frames_that_fit_or_are_not_tcp_pass_unchanged():
    small = ipv4_frame(PAYLOAD[:1448], ACK)
    assert segment_tcp(small, 1448) == [small]
    udp = bytearray(ipv4_frame(PAYLOAD, ACK))
    udp[14 + 9] = 17
    assert segment_tcp(bytes(udp), 1448) == [bytes(udp)]
    assert segment_tcp(b"\xff" * 20, 1448) == [b"\xff" * 20]
    truncated = ipv4_frame(PAYLOAD, ACK)[:3000]                       # IPv4 length beyond the frame
    assert segment_tcp(truncated, 1448) == [truncated]


# Inside namespace B: a PacketUplink on x1 and a TCP listener; prints the
# sizes of the frames the uplink read, whether each TCP one verifies, and
# the bytes the listener received, as JSON.
READER = """
import json, select, socket, sys, time
from pyvmm.net.uplink import PacketUplink
from pyvmm.devices.virtio.net_offload import l4_checksum_ok
up = PacketUplink("x1")
up.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)   # keep every frame for the count
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.9.0.2", 7000)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.setblocking(False)
frames, got, end = [], 0, time.monotonic() + 20
while time.monotonic() < end:
    select.select([up.fd, c], [], [], 0.2)
    frames += up.read_frames()
    try:
        d = c.recv(1 << 20)
    except BlockingIOError:
        continue
    if not d:
        break
    got += len(d)
time.sleep(0.2)
frames += up.read_frames()
tcp = [f for f in frames if f[12:14] == b"\\x08\\x00" and f[23] == 6]
print(json.dumps({"sizes": [len(f) for f in frames], "tcp": len(tcp), "bad": sum(not l4_checksum_ok(f) for f in tcp),
                  "payload": sum(len(f) - 14 - (f[14] & 15) * 4 - (f[14 + (f[14] & 15) * 4 + 12] >> 4) * 4
                                 for f in tcp), "got": got}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_cut_or_corrupt_super_frames_never_raise_and_never_grow():
    """Whatever a socket hands over (cut short, header bytes changed), the
    segmenter returns frames, each no longer than its input's MSS allows,
    or the input unchanged; it never raises."""
    import random
    rng = random.Random(1818)
    bases = [ipv4_frame(PAYLOAD, ACK), ipv4_frame(PAYLOAD, ACK, tag=b"\x81\x00\x00\x07"), ipv6_frame(PAYLOAD, ACK)]
    cases = 0
    for base in bases:
        for cut in range(0, 120):
            cases += 1
            assert segment_tcp(base[:cut], 1448) == [base[:cut]]      # headers incomplete: passed on as is
        for _ in range(400):
            frame = bytearray(base[:rng.randrange(16, len(base) + 1)])
            for _ in range(rng.randrange(1, 4)):
                frame[rng.randrange(12, min(90, len(frame)))] = rng.randrange(256)
            out = segment_tcp(bytes(frame), 1448)
            cases += 1
            assert out and all(isinstance(f, bytes) for f in out)
            assert len(out) == 1 or max(len(f) for f in out) <= 14 + 4 + 60 + 60 + 1448
    assert cases == 3 * (120 + 400)


def test_a_packet_uplink_on_a_veth_reads_the_hosts_tcp_as_wire_sized_frames():
    a, b = (f"pvgs{x}-{uuid.uuid4().hex[:6]}" for x in "ab")
    ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)  # noqa: E731
    ip("netns", "add", a)
    try:
        ip("netns", "add", b)
        ip("link", "add", "x0", "netns", a, "type", "veth", "peer", "name", "x1", "netns", b)
        for ns, dev, addr in ((a, "x0", "10.9.0.1/24"), (b, "x1", "10.9.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        reader = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", READER], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            size = 1 << 20
            subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c",
                            f"import socket; s = socket.create_connection(('10.9.0.2', 7000)); "
                            f"s.sendall(bytes({size})); s.close()"], check=True, timeout=60)
            out, _ = reader.communicate(timeout=60)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        r = json.loads(out)
        assert r["got"] == size
        assert max(r["sizes"]) <= 1514, f"frames over the MTU: {sorted(r['sizes'])[-5:]}"
        assert r["bad"] == 0 and r["payload"] >= size, r
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
