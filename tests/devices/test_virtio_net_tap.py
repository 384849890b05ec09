"""virtio-net on a real host TAP device: the queues are driven from the
host as a guest driver would, frames go through tap.py to the host kernel
and its answers come back on the event loop into the receive queue.

The TAP lives in a network namespace this test creates and removes, with
the only address (10.0.2.2/24) on it there, so no frame reaches any other
interface of the host.  Creating TAPs and namespaces needs root and
/dev/net/tun: without them the test skips with that host fact."""

from __future__ import annotations

import os
import struct
import subprocess
import time

import pytest

from pyvmm.loop import EventLoop
from pyvmm.net.port import NetError
from pyvmm.net.tap import TUN_PATH, TapPort

from .test_virtio_net import NetDriver

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP, HOST_IP = bytes((10, 0, 2, 15)), bytes((10, 0, 2, 2))


def host_fact() -> str | None:
    if os.geteuid() != 0:
        return "creating TAP devices and network namespaces needs root"
    if not os.path.exists(TUN_PATH):
        return f"the host has no {TUN_PATH}"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def netns():
    fact = host_fact()
    if fact:
        pytest.skip(fact)
    name = f"pyvmm-net-{os.getpid()}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        ip("netns", "del", name, check=False)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request() -> bytes:
    return (b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + bytes(6) + HOST_IP)


def echo_request(dst_mac: bytes, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, GUEST_IP, HOST_IP)
    iph = iph[:10] + struct.pack("!H", checksum(iph)) + iph[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + iph + icmp


def is_arp_reply(f: bytes) -> bool:
    return f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == HOST_IP


def is_echo_reply(f: bytes) -> bool:
    return f[12:14] == b"\x08\x00" and f[23] == 1 and f[26:30] == HOST_IP and f[34] == 0


def test_frames_cross_a_real_tap_both_ways(netns):
    ifname = f"pvt{os.getpid() % 100000}"
    loop = EventLoop()
    try:
        tap = TapPort(ifname, loop)
        d = NetDriver(tap, mac=GUEST_MAC)
        assert d.init() & 4
        # Into the namespace, where the host side gets its only address.
        ip("link", "set", "dev", ifname, "netns", netns)
        ip("-n", netns, "addr", "add", "10.0.2.2/24", "dev", ifname)
        ip("-n", netns, "link", "set", ifname, "up")
        loop.start()

        received: list[bytes] = []

        def wait_for(match, timeout: float = 10.0) -> bytes:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with loop.lock:
                    new = d.received(len(received))
                    for _ in new:
                        d.post_rx(1526)           # keep the ring stocked, as a driver does
                received.extend(new)
                for f in received:
                    if match(f):
                        return f
                time.sleep(0.02)
            raise AssertionError(f"no such frame in {len(received)} received")

        with loop.lock:
            for _ in range(8):
                d.post_rx(1526)
            d.transmit(arp_request())
        reply = wait_for(is_arp_reply)
        host_mac = reply[22:28]
        assert reply[:6] == GUEST_MAC and reply[32:38] == GUEST_MAC and reply[38:42] == GUEST_IP

        payload = os.urandom(1400)
        with loop.lock:
            d.transmit(echo_request(host_mac, payload))
        pong = wait_for(is_echo_reply)
        assert pong[:6] == GUEST_MAC and pong[42:] == payload
        assert tap.tx_frames == 2 and d.device.tx_frames == 2 and d.device.rx_frames >= 2

        tap.close()     # a TAP pyvmm created goes away with it
        assert ip("-n", netns, "link", "show", ifname, check=False).returncode != 0
    finally:
        loop.close()


def test_tap_errors_are_one_line(netns):
    with pytest.raises(NetError) as e:
        TapPort("lo")                                    # exists, and is no TAP
    assert "tap=lo" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NetError):
        TapPort("bad/name")


def test_builder_puts_a_nic_on_pci_and_closes_its_tap(netns):
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import VmConfig, parse_net
    from pyvmm.cpu import CpuState
    ifname = f"pvb{os.getpid() % 100000}"
    cfg = VmConfig(engine="bt", mem_mib=32, nets=[parse_net(f"tap={ifname},mac=52:54:00:00:00:42,id=lan")])
    machine = build_machine(cfg, lambda b: None, boot=lambda memory: BootResult(cpu=CpuState(), protocol="test"))
    try:
        assert ip("link", "show", ifname, check=False).returncode == 0     # created, down, no address
        assert "inet" not in ip("addr", "show", ifname).stdout
        ip("link", "set", "dev", ifname, "netns", netns)                   # out of the host's way
        fn = machine.devices["lan"]
        assert "lan-bar4" in [name for _, _, name in machine.mmio_bus.devices()]
        assert fn.device.config_bytes()[:6] == bytes.fromhex("525400000042")
        # frames arrive on the loop thread: the BAR is dispatched under the machine's lock
        assert [m.serialize for m in machine.mmio_bus._maps if m.name == "lan-bar4"] == [True]
        fn.restore(fn.save())
    finally:
        destroy_machine(machine)
    assert ip("-n", netns, "link", "show", ifname, check=False).returncode != 0   # closed with the machine
