"""A miswired uplink pair, in a network namespace the test makes: two
plain AF_PACKET uplinks whose far ends sit on one bridge, a physical
loop. A client's broadcast leaves by both uplinks, the bridge floods
each copy back in by the other one, and the switch must neither send
them out again (no uplink to uplink) nor hand the client its own frame
back (its address is pinned to its port: rx_mac_flap), so the storm
never starts while the bridge's host still answers."""

from __future__ import annotations

import os
import time

import pytest

from tests import hostfacts
from tests.net.switch_helpers import SwitchProcess, arp_request, mac
from tests.net.test_switch_uplinks import arp_reply_for, ip, netns  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              hostfacts.from_setup(programs=("ip",), package="iproute2")]


def test_a_looped_uplink_pair_does_not_storm(netns):  # noqa: F811
    ip(netns, "link", "add", "br0", "type", "bridge")
    for i in (0, 1):
        ip(netns, "link", "add", f"u{i}", "type", "veth", "peer", "name", f"hu{i}")
        ip(netns, "link", "set", f"hu{i}", "master", "br0")
        ip(netns, "link", "set", f"u{i}", "up")
        ip(netns, "link", "set", f"hu{i}", "up")
    ip(netns, "addr", "add", "10.78.0.1/24", "dev", "br0")
    ip(netns, "link", "set", "br0", "up")
    sw = SwitchProcess({"uplinks": [{"type": "packet", "ifname": "u0"}, {"type": "packet", "ifname": "u1"}]},
                       netns=netns)
    try:
        c = sw.client()
        c.send(arp_request(mac(8), "10.78.0.2", "10.78.0.1"))
        assert arp_reply_for(c, "10.78.0.1") is not None           # the network is still reachable
        time.sleep(1.0)
        echoes = 0
        while (f := c.recv(timeout=0.2)) is not None:
            echoes += f[6:12] == mac(8)
        st = sw.status()
        ups = [p for p in st["ports"] if p["kind"] == "uplink"]
        assert echoes == 0, "the client got its own broadcast back"
        assert sum(p["counters"]["rx_mac_flap"] for p in ups) >= 1      # the looped copies, dropped
        # a storm would have the uplinks carrying the broadcast thousands of times
        assert all(p["counters"]["tx_frames"] < 20 for p in ups), ups
    finally:
        assert sw.stop() == 0
