"""Beacon probing in a network namespace the test makes: three veth
uplinks of one team whose far ends sit on the namespace's bridge. Taking
the active member's far end off the bridge breaks its path silently while
its link stays up, so netlink sees nothing; the beacons
must find it within interval x misses, move traffic to the next member,
and fail back once the port forwards again. With two members a silent
break is inconclusive, and link state keeps both up."""

from __future__ import annotations

import os
import time

import pytest

from tests import hostfacts
from tests.net.switch_helpers import SwitchProcess, arp_request, mac
from tests.net.test_switch_team import team_status, wait_for
from tests.net.test_switch_uplinks import arp_reply_for, ip, netns  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              hostfacts.from_setup(programs=("ip",), package="iproute2")]

INTERVAL, MISSES = 0.1, 3


def bridge(ns: str, members: int) -> None:
    ip(ns, "link", "add", "br0", "type", "bridge")
    for i in range(members):
        ip(ns, "link", "add", f"a{i}", "type", "veth", "peer", "name", f"ha{i}")
        ip(ns, "link", "set", f"ha{i}", "master", "br0")
        ip(ns, "link", "set", f"a{i}", "up")
        ip(ns, "link", "set", f"ha{i}", "up")
    ip(ns, "addr", "add", "10.79.0.1/24", "dev", "br0")
    ip(ns, "link", "set", "br0", "up")


def cut(ns: str, dev: str) -> None:
    """Takes the far end off the bridge: the path is gone, the carrier stays."""
    ip(ns, "link", "set", "dev", dev, "nomaster")


def mend(ns: str, dev: str) -> None:
    ip(ns, "link", "set", "dev", dev, "master", "br0")


def team_switch(ns: str, members: int) -> SwitchProcess:
    return SwitchProcess({"teams": [{"name": "t0", "policy": "failover", "failback": True,
                                     "beacon": {"interval": INTERVAL, "misses": MISSES},
                                     "uplinks": [{"type": "packet", "ifname": f"a{i}"} for i in range(members)]}]},
                         netns=ns)


def test_beacons_find_a_silent_break_fail_over_and_fail_back(netns):  # noqa: F811
    bridge(netns, 3)
    sw = team_switch(netns, 3)
    try:
        assert wait_for(lambda: all(m["beacons_heard"] >= 2 for m in team_status(sw)["members"]))
        c = sw.client()
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None
        assert team_status(sw)["active"] == "a0"

        t_break = time.monotonic()
        cut(netns, "ha0")
        assert wait_for(lambda: team_status(sw)["active"] == "a1", timeout=5), team_status(sw)
        gap = time.monotonic() - t_break
        print(f"beacon failover: {gap * 1000:.0f} ms (interval {INTERVAL} s, {MISSES} misses)")
        assert gap <= 3.0
        t = team_status(sw)
        a0, a1, a2 = t["members"]
        assert (a0["link"], a0["beacon_ok"], a0["up"]) == (True, False, False)    # netlink saw nothing
        assert a1["up"] and a2["up"] and t["beacon"]["failures"] == 1 and t["failovers"] == 1
        assert a1["announced"] >= 1
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None          # through a1 now

        mend(netns, "ha0")
        assert wait_for(lambda: team_status(sw)["active"] == "a0", timeout=5), team_status(sw)
        assert team_status(sw)["failovers"] == 2
        c.send(arp_request(mac(5), "10.79.0.2", "10.79.0.1"))
        assert arp_reply_for(c, "10.79.0.1") is not None
        c.close()
    finally:
        assert sw.stop() == 0


def test_with_two_members_a_silent_break_is_inconclusive(netns):  # noqa: F811
    bridge(netns, 2)
    sw = team_switch(netns, 2)
    try:
        assert wait_for(lambda: all(m["beacons_heard"] >= 2 for m in team_status(sw)["members"]))
        cut(netns, "ha0")
        heard = team_status(sw)["members"][1]["beacons_heard"]
        time.sleep(INTERVAL * (MISSES + 3))
        t = team_status(sw)
        assert t["members"][1]["beacons_heard"] == heard          # the beacons really stopped
        assert all(m["up"] for m in t["members"]) and t["active"] == "a0" and t["beacon"]["failures"] == 0
    finally:
        assert sw.stop() == 0
