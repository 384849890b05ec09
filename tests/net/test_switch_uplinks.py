"""Uplinks to real kernel networking, inside a network namespace the test
makes and removes: AF_PACKET on one end of a veth pair and a TAP device
the switch creates, each answered by the namespace's own ARP (and VLAN)
stack. Every frame stays in that namespace or on the switch's Unix
sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests import hostfacts

from pyvmm.net.framing import vlan_of
from tests.net.switch_helpers import BROADCAST, SwitchProcess, arp_request, eth, mac, parse_arp

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              hostfacts.from_setup(programs=("ip",), package="iproute2")]


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, capture_output=True, timeout=20)


def link_mac(ns: str, dev: str) -> bytes:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/address"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return bytes.fromhex(out.replace(":", ""))


@pytest.fixture
def netns():
    name = f"pvsw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=20)


def arp_reply_for(client, target: str, timeout: float = 10.0) -> dict | None:
    frame = client.recv_until(lambda f: (a := parse_arp(f)) is not None and a["op"] == 2 and a["spa"] == target,
                              timeout)
    return None if frame is None else parse_arp(frame)


# Runs inside the namespace on host0, the veth end that is not the
# switch's: reports the 802.1Q tag of the frame the red client sent, then
# sends tagged frames back in (this kernel may lack the 8021q module, so
# the namespace side speaks VLAN by hand).
WIRE_PEER = """
import sys, time
from pyvmm.net.framing import vlan_of, pop_tag, push_tag
from pyvmm.net.uplink import PacketUplink
up = PacketUplink("host0")
print("ready", flush=True)
end = time.monotonic() + 10
while time.monotonic() < end:
    for f in up.read_frames():
        if f[6:12] == bytes([2, 0, 0, 0, 0, 2]) and b"red-out" in f:
            print("tag", vlan_of(f), flush=True)
            back = bytes([2, 0, 0, 0, 0, 2]) + bytes([2, 0, 0, 0, 0, 0x99]) + b"\\x88\\xb5"
            up.send(push_tag(back + b"red-in".ljust(46, b"\\0"), 10))
            up.send(push_tag(bytes([0xff] * 6) + back[6:] + b"vlan-20".ljust(46, b"\\0"), 20))
            sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
"""


def test_packet_uplink_on_veth_with_vlans(netns):
    ip(netns, "link", "add", "up0", "type", "veth", "peer", "name", "host0")
    ip(netns, "addr", "add", "10.77.0.1/24", "dev", "host0")
    for dev in ("up0", "host0"):
        ip(netns, "link", "set", dev, "up")
    sw = SwitchProcess({"groups": {"default": {"vlan": 0}, "red": {"vlan": 10}},
                        "uplinks": [{"type": "packet", "ifname": "up0"}]}, netns=netns)
    peer = None
    try:
        plain, red = sw.client(), sw.client("red")
        plain.send(arp_request(mac(1), "10.77.0.2", "10.77.0.1"))     # the namespace's own ARP answers
        reply = arp_reply_for(plain, "10.77.0.1")
        assert reply is not None and reply["tha"] == mac(1) and reply["sha"] == link_mac(netns, "host0")
        peer = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", WIRE_PEER],
                                stdout=subprocess.PIPE, text=True)
        assert peer.stdout.readline().strip() == "ready"
        red.send(eth(BROADCAST, mac(2), b"red-out"))
        assert peer.stdout.readline().strip() == "tag 10"            # tagged on the uplink
        assert peer.wait(15) == 0
        got = red.recv_until(lambda f: b"red-in" in f)
        assert got is not None and vlan_of(got) is None and got[0:6] == mac(2)   # untagged to the access port
        plain.send(eth(BROADCAST, mac(1), b"barrier"))
        assert red.recv(1.0) is None                                 # red never saw default's traffic
        assert plain.recv_until(lambda f: b"red-in" in f or b"vlan-20" in f, timeout=1.0) is None
        st = sw.status()
        up = sw.port_of(st, "packet:up0")
        assert up["counters"]["rx_vlan_dropped"] == 1                # VLAN 20: no group has it
        assert up["counters"]["tx_frames"] >= 2                      # the ARP request and red-out
        assert {(e["vlan"], e["port"]) for e in st["mac_table"]["entries"]} >= {(0, "packet:up0"), (10, "packet:up0")}
        ip(netns, "link", "del", "up0")                              # the uplink disappears
        end = time.monotonic() + 5
        while any(p["name"] == "packet:up0" for p in sw.status()["ports"]):
            assert time.monotonic() < end, "the deleted uplink was not removed"
            time.sleep(0.05)
        assert not any(e["port"] == "packet:up0" for e in sw.status()["mac_table"]["entries"])
        other = sw.client()
        plain.send(eth(BROADCAST, mac(1), b"after"))
        assert other.recv_until(lambda f: b"after" in f) is not None
        other.close()
        plain.close()
        red.close()
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait()
        assert sw.stop() == 0


def test_tap_uplink(netns):
    sw = SwitchProcess({"uplinks": [{"type": "tap", "ifname": "swtap0"}]}, netns=netns)
    try:
        ip(netns, "addr", "add", "10.78.0.1/24", "dev", "swtap0")
        ip(netns, "link", "set", "swtap0", "up")
        c = sw.client()
        c.send(arp_request(mac(3), "10.78.0.2", "10.78.0.1"))
        reply = arp_reply_for(c, "10.78.0.1")
        assert reply is not None and reply["tha"] == mac(3) and reply["sha"] == link_mac(netns, "swtap0")
        counters = sw.port_of(sw.status(), "tap:swtap0")["counters"]
        assert counters["rx_frames"] >= 1 and counters["tx_frames"] >= 1
        c.close()
    finally:
        assert sw.stop() == 0
    # the TAP device was the switch's: it goes with it
    out = subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "show", "swtap0"], capture_output=True)
    assert out.returncode != 0


def test_missing_uplink_is_a_one_line_error(netns):
    import json
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"uplinks": [{"type": "packet", "ifname": "nosuch0"}]}, f)
        f.flush()
        d = tempfile.mkdtemp(prefix="pvsw", dir="/tmp")
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "pyvmm", "switch", "run", "x",
                            "--config", f.name], env=dict(os.environ, PYVMM_SWITCH_DIR=d),
                           capture_output=True, text=True, timeout=30)
        shutil.rmtree(d)
    assert r.returncode == 1 and "nosuch0" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# Inside the namespace: a TCP SYN to the namespace's listener, sent in by
# the uplink on up0; the SYN-ACK the namespace's own stack sends back
# leaves with its checksum offload pending, and the uplink must finish it
# (a VM's stack drops a bad checksum: no TCP with the host at all).
SYN_ACK_PEER = """
import socket, struct, sys, time
from pyvmm.devices.virtio.net_offload import l4_checksum_ok, ones_complement_sum
from pyvmm.net.uplink import PacketUplink
listener = socket.socket()
listener.bind(("10.77.0.1", 5000))
listener.listen(1)
up = PacketUplink("up0")
src, dst = socket.inet_aton("10.77.0.2"), socket.inet_aton("10.77.0.1")
tcp = struct.pack(">HHIIBBHHH", 40000, 5000, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
csum = ~ones_complement_sum(src + dst + struct.pack(">BBH", 0, 6, len(tcp)) + tcp) & 0xFFFF
tcp = tcp[:16] + struct.pack(">H", csum) + tcp[18:]
ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack(">H", ~ones_complement_sum(ip) & 0xFFFF) + ip[12:]
host0 = bytes.fromhex(open("/sys/class/net/host0/address").read().strip().replace(":", ""))
up.send(host0 + bytes([2, 0, 0, 0, 0, 2]) + b"\\x08\\x00" + ip + tcp)
end = time.monotonic() + 10
while time.monotonic() < end:
    for f in up.read_frames():
        if f[12:14] == b"\\x08\\x00" and f[23] == 6 and f[47] & 0x12 == 0x12:
            print("syn-ack", "ok" if l4_checksum_ok(f) else "bad-checksum", flush=True)
            sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
"""


def test_packet_uplink_hands_on_the_hosts_tcp_with_finished_checksums(netns):
    ip(netns, "link", "add", "up0", "type", "veth", "peer", "name", "host0")
    ip(netns, "addr", "add", "10.77.0.1/24", "dev", "host0")
    for dev in ("up0", "host0"):
        ip(netns, "link", "set", dev, "up")
    ip(netns, "neigh", "add", "10.77.0.2", "lladdr", "02:00:00:00:00:02", "dev", "host0")
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SYN_ACK_PEER],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "syn-ack ok", (r.stdout, r.stderr[-2000:])
