"""NIC teaming over two veth uplinks inside a network namespace the test
makes: the namespace's bridge joins the far ends, so it reaches the
switch's client through either. Taking the active member's far end down
must move traffic to the standby (seen by netlink), announce the client's
MAC there with RARP, and fail back when the link returns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib

import pytest

from tests import hostfacts

from tests.net.switch_helpers import BROADCAST, SwitchProcess, arp_request, eth, mac
from tests.net.test_switch_uplinks import arp_reply_for, ip, netns  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              hostfacts.from_setup(programs=("ip",), package="iproute2")]

# Inside the namespace on the standby's far end: prints when the switch's
# announce (gratuitous ARP or RARP) for the client arrives, with CLOCK_MONOTONIC (shared by
# all processes) so the test can measure the failover gap.
RARP_WATCH = """
import sys, time
from pyvmm.net.uplink import PacketUplink
up = PacketUplink(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + 10
while time.monotonic() < end:
    for f in up.read_frames():
        if f[12:14] in (b"\\x80\\x35", b"\\x08\\x06") and f[6:12] == bytes.fromhex(sys.argv[2]):
            kind = "rarp" if f[12:14] == b"\\x80\\x35" else "garp"
            print(kind, time.monotonic(), ".".join(map(str, f[28:32])), ".".join(map(str, f[38:42])), flush=True)
            sys.exit(0)
    time.sleep(0.001)
sys.exit(1)
"""


def team_status(sw: SwitchProcess) -> dict:
    return sw.status()["teams"][0]


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("failback", [True, False])
def test_failover_on_link_loss_announces_and_fails_back(netns, failback):  # noqa: F811
    ip(netns, "link", "add", "br0", "type", "bridge")
    for i in (0, 1):
        ip(netns, "link", "add", f"a{i}", "type", "veth", "peer", "name", f"ha{i}")
        ip(netns, "link", "set", f"ha{i}", "master", "br0")
        ip(netns, "link", "set", f"a{i}", "up")
        ip(netns, "link", "set", f"ha{i}", "up")
    ip(netns, "addr", "add", "10.79.0.1/24", "dev", "br0")
    ip(netns, "link", "set", "br0", "up")
    sw = SwitchProcess({"teams": [{"name": "t0", "policy": "failover", "failback": failback,
                                   "uplinks": [{"type": "packet", "ifname": "a0"},
                                               {"type": "packet", "ifname": "a1"}]}]}, netns=netns)
    watcher = None
    try:
        c = sw.client()
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None
        t = team_status(sw)
        assert t["active"] == "a0" and t["members"][0]["tx_frames"] >= 1 and t["members"][1]["tx_frames"] == 0

        watcher = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", RARP_WATCH,
                                    "ha1", mac(5).hex()], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
        t_down = time.monotonic()
        ip(netns, "link", "set", "ha0", "down")               # a0 loses carrier
        line = watcher.stdout.readline().split()
        # the switch saw 10.79.0.2 in the client's ARP: a gratuitous ARP for it, sender = target
        assert line[:1] == ["garp"] and line[2:] == ["10.79.0.2", "10.79.0.2"], \
            f"no gratuitous ARP on the standby: {line} {team_status(sw)}"
        gap_ms = (float(line[1]) - t_down) * 1000
        print(f"failover: link down to the announce on the standby in {gap_ms:.1f} ms (includes running ip)")
        assert gap_ms < 2000
        t = team_status(sw)
        assert t["active"] == "a1" and t["failovers"] == 1 and t["members"][1]["announced"] >= 1
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None        # through the standby now
        assert wait_for(lambda: team_status(sw)["members"][1]["tx_frames"] >= 1)   # announces count apart

        ip(netns, "link", "set", "ha0", "up")                 # failback, when on
        assert wait_for(lambda: team_status(sw)["members"][0]["up"]), team_status(sw)
        t = team_status(sw)
        if failback:
            assert t["active"] == "a0" and t["failovers"] == 2 and t["members"][0]["announced"] >= 1
        else:
            assert t["active"] == "a1" and t["failovers"] == 1 and t["members"][0]["announced"] == 0
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None
        r = sw.cli("status", sw.name)
        assert f"team t0 (failover, failback {'on' if failback else 'off'}): active {t['active']}" in r.stdout
        c.close()
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        assert sw.stop() == 0


@pytest.mark.parametrize("policy", ["port_id", "mac_hash"])
def test_load_balancing_spreads_by_policy_and_drops_looped_frames(netns, policy):  # noqa: F811
    ip(netns, "link", "add", "br0", "type", "bridge")
    for i in (0, 1):
        ip(netns, "link", "add", f"a{i}", "type", "veth", "peer", "name", f"ha{i}")
        ip(netns, "link", "set", f"ha{i}", "master", "br0")
        ip(netns, "link", "set", f"a{i}", "up")
        ip(netns, "link", "set", f"ha{i}", "up")
    ip(netns, "link", "set", "br0", "up")
    sw = SwitchProcess({"teams": [{"name": "t0", "policy": policy,
                                   "uplinks": [{"type": "packet", "ifname": "a0"},
                                               {"type": "packet", "ifname": "a1"}]}]}, netns=netns)
    try:
        clients = [sw.client() for _ in range(4)]
        names = sorted((p["name"] for p in sw.status()["ports"] if p["kind"] == "client"),
                       key=lambda n: int(n[1:]))
        expected = [0, 0]
        for n, (c, name) in enumerate(zip(clients, names)):
            for k in range(3):
                src = mac(0x900 + 16 * n + k)
                c.send(eth(BROADCAST, src, b"spread"))
                key = zlib.crc32(name.encode()) if policy == "port_id" else zlib.crc32(src)
                expected[key % 2] += 1
        for c in clients:                                      # each hears the others' 9 broadcasts
            for _ in range(9):
                assert c.recv_until(lambda f: b"spread" in f) is not None
        # the bridge floods each broadcast back in on the other member: dropped there, not delivered
        assert wait_for(lambda: sum(m["rx_loop_dropped"] for m in team_status(sw)["members"]) >= 12)
        t = team_status(sw)
        assert [m["tx_frames"] for m in t["members"]] == expected
        for c in clients:
            assert c.recv_until(lambda f: b"spread" in f, timeout=0.3) is None
            c.close()
    finally:
        assert sw.stop() == 0
