"""The switch's parts without I/O: framing, MAC table, token buckets and
the forwarding rules, driven through Switch.receive() with recording ports."""

from __future__ import annotations

import pytest

from pyvmm.net.framing import FramingError, StreamDecoder, encode, push_tag, vlan_of
from pyvmm.net.mactable import MacTable
from pyvmm.net.ratelimit import RateLimiter, TokenBucket
from pyvmm.net.switch import Switch, SwitchPort
from pyvmm.net.switch_config import parse_config
from pyvmm.errors import ConfigError
from tests.net.switch_helpers import BROADCAST, eth, mac


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recording_port(name: str, **kw) -> SwitchPort:
    got: list[bytes] = []
    port = SwitchPort(name, lambda f: got.append(f) or True, **kw)
    port.got = got  # type: ignore[attr-defined]
    return port


# -- framing ------------------------------------------------------------------
def test_decoder_splits_frames_across_arbitrary_chunks():
    frames = [eth(BROADCAST, mac(i), bytes([i]) * i) for i in range(1, 40)]
    stream = b"".join(encode(f) for f in frames)
    dec = StreamDecoder()
    out = []
    for i in range(0, len(stream), 7):
        out += dec.feed(stream[i:i + 7])
    assert out == frames


def test_decoder_skips_oversized_and_stays_in_step():
    dec = StreamDecoder(max_frame=100)
    good = eth(BROADCAST, mac(1))
    stream = encode(bytes(5000)) + encode(good)
    out = dec.feed(stream[:3000]) + dec.feed(stream[3000:])
    assert out == [good] and dec.oversized == 1


def test_decoder_rejects_garbage_length():
    with pytest.raises(FramingError):
        StreamDecoder().feed(b"\xff\xff\xff\xff" + bytes(20))


def test_vlan_tag_round_trip():
    frame = eth(BROADCAST, mac(1))
    tagged = push_tag(frame, 42)
    assert len(tagged) == len(frame) + 4 and vlan_of(tagged) == 42 and vlan_of(frame) is None


# -- MAC table ----------------------------------------------------------------
def test_mac_table_learns_moves_and_ages():
    clock = Clock()
    t = MacTable(capacity=10, max_age=5, clock=clock)
    t.learn(mac(1), 0, "a")
    assert t.lookup(mac(1), 0) == "a" and t.lookup(mac(1), 7) is None
    assert not t.learn(mac(1), 0, "b")          # seen on "a" just now: a reflection, not a move
    assert t.lookup(mac(1), 0) == "a" and t.flaps == 1
    clock.now += t.move_hold
    assert t.learn(mac(1), 0, "b")
    assert t.lookup(mac(1), 0) == "b" and t.count("a") == 0 and t.count("b") == 1
    clock.now += 3
    t.learn(mac(2), 0, "a")
    clock.now += 3
    assert t.lookup(mac(1), 0) is None          # too old to trust even before age() runs
    assert t.age() == 1 and len(t) == 1 and t.lookup(mac(2), 0) == "a"


def test_mac_table_flood_by_one_port_only_evicts_its_own():
    t = MacTable(capacity=100, max_age=300, per_port=10, clock=Clock())
    t.learn(mac(1), 0, "victim")
    for i in range(1000, 6000):
        t.learn(mac(i), 0, "flooder")
    assert t.count("flooder") == 10 and len(t) == 11
    assert t.lookup(mac(1), 0) == "victim"


def test_mac_table_capacity_bound_drops_oldest():
    t = MacTable(capacity=4, max_age=300, clock=Clock())
    for i in range(6):
        t.learn(mac(i), 0, f"p{i}")
    assert len(t) == 4 and t.lookup(mac(0), 0) is None and t.lookup(mac(5), 0) == "p5"
    assert t.forget_port("p5") == 1 and t.lookup(mac(5), 0) is None


# -- token buckets ------------------------------------------------------------
def test_token_bucket_refills_at_size_per_refill_time():
    clock = Clock()
    b = TokenBucket(size=1000, refill_time=100, one_time_burst=500, clock=clock)
    assert b.reduce(1500)                       # burst, then the full bucket
    assert not b.reduce(1)
    clock.now += 0.05                           # half of refill_time: half the bucket
    assert b.reduce(500) and not b.reduce(1)
    clock.now += 10
    assert b.reduce(1000) and not b.reduce(1)   # never more than size


def test_rate_limiter_needs_both_buckets():
    clock = Clock()
    rl = RateLimiter.from_config({"bandwidth": {"size": 100, "refill_time": 1000},
                                  "ops": {"size": 3, "refill_time": 1000}}, clock)
    assert rl.allow(60) and not rl.allow(60)    # bytes run out first; the op is given back
    assert rl.allow(10) and rl.allow(10) and not rl.allow(1)   # then ops
    with pytest.raises(ValueError):
        RateLimiter.from_config({"bandwidth": {"size": 1}})


# -- forwarding ---------------------------------------------------------------
def test_flooding_learning_and_no_hairpin():
    clock = Clock()
    sw = Switch(MacTable(clock=clock))
    a, b, c = (sw.add_port(recording_port(n)) for n in "abc")
    sw.receive(a, eth(BROADCAST, mac(1)))
    assert (len(a.got), len(b.got), len(c.got)) == (0, 1, 1)
    sw.receive(b, eth(mac(1), mac(2)))          # known: only to a
    assert (len(a.got), len(b.got), len(c.got)) == (1, 1, 1)
    sw.receive(c, eth(mac(99), mac(3)))         # unknown unicast: flooded
    assert (len(a.got), len(b.got), len(c.got)) == (2, 2, 1)
    sw.receive(a, eth(b"\x01\x00\x5e\x00\x00\x01", mac(1)))   # multicast: flooded
    assert (len(a.got), len(b.got), len(c.got)) == (2, 3, 2)
    clock.now += sw.macs.move_hold
    sw.receive(b, eth(mac(2), mac(1)))          # mac(1) moves to b; to itself: filtered
    assert b.counters["rx_filtered"] == 1 and len(b.got) == 3
    sw.remove_port(b)
    assert sw.macs.lookup(mac(2), 0) is None


def reflecting_port(sw: Switch, name: str, **kw) -> SwitchPort:
    """A port whose far end sends every frame straight back (a looping guest)."""
    port = SwitchPort(name, lambda f: sw.receive(port, f) or True, **kw)
    return port


def test_reflecting_guests_cause_no_storm_and_keep_no_stolen_address():
    sw = Switch()
    a, quiet = sw.add_port(recording_port("a")), sw.add_port(recording_port("q"))
    r1, r2 = sw.add_port(reflecting_port(sw, "r1")), sw.add_port(reflecting_port(sw, "r2"))
    # without loop protection each reflection floods again: endless recursion
    sw.receive(a, eth(BROADCAST, mac(1)))
    assert len(quiet.got) == 1
    assert r1.counters["rx_mac_flap"] == 1 and r2.counters["rx_mac_flap"] == 1
    assert sw.macs.lookup(mac(1), 0) is a and sw.macs.flaps == 2
    sw.receive(quiet, eth(mac(1), mac(7)))      # unicast to a still reaches a
    assert len(a.got) == 1 and r1.counters["tx_frames"] == 1


def test_uplinks_never_forward_to_uplinks_and_a_wired_pair_does_not_loop():
    sw = Switch()
    a = sw.add_port(recording_port("a"))
    up1 = sw.add_port(recording_port("up1", uplink=True))
    up2 = sw.add_port(recording_port("up2", uplink=True))
    sw.receive(up1, eth(BROADCAST, mac(50)))    # from the physical network
    assert (len(a.got), len(up2.got)) == (1, 0)
    sw.receive(up1, eth(mac(60), mac(50)))      # unknown unicast: clients only
    assert (len(a.got), len(up2.got)) == (2, 0)
    sw.receive(a, eth(BROADCAST, mac(1)))       # a client's broadcast leaves by both uplinks ...
    assert (len(up1.got), len(up2.got)) == (1, 1)
    sw.receive(up2, up1.got[0])                  # ... and one comes back in by the other (wired together)
    assert up2.counters["rx_mac_flap"] == 1 and len(a.got) == 2 and sw.macs.lookup(mac(1), 0) is a
    sw.receive(a, eth(mac(50), mac(1)))          # still known on up1 only
    assert (len(up1.got), len(up2.got)) == (2, 1)


def test_vlans_are_isolated_and_tagged_on_uplinks():
    sw = Switch(vlans={0, 10, 20})
    red1, red2 = sw.add_port(recording_port("r1", vlan=10)), sw.add_port(recording_port("r2", vlan=10))
    blue = sw.add_port(recording_port("b", vlan=20))
    up = sw.add_port(recording_port("up", uplink=True))
    sw.receive(red1, eth(BROADCAST, mac(1)))
    assert len(red2.got) == 1 and not blue.got and vlan_of(up.got[0]) == 10
    assert vlan_of(red2.got[0]) is None
    sw.receive(up, push_tag(eth(mac(1), mac(50)), 10))      # tag stripped, to red1 only
    assert len(red1.got) == 1 and vlan_of(red1.got[0]) is None and len(red2.got) == 1
    sw.receive(up, push_tag(eth(BROADCAST, mac(51)), 30))   # a VLAN no group has
    assert up.counters["rx_vlan_dropped"] == 1
    sw.receive(blue, push_tag(eth(BROADCAST, mac(2)), 10))  # a guest picking a VLAN
    assert blue.counters["rx_vlan_dropped"] == 1 and len(red1.got) == 1
    sw.receive(blue, eth(mac(1), mac(2)))                   # red's MAC is unknown in blue: flood blue
    assert len(red1.got) == 1 and len(up.got) == 2 and vlan_of(up.got[1]) == 20


def test_malformed_frames_are_counted_not_forwarded():
    sw = Switch()
    a, b = sw.add_port(recording_port("a")), sw.add_port(recording_port("b"))
    sw.receive(a, b"\x00" * 10)
    sw.receive(a, eth(BROADCAST, BROADCAST))
    sw.receive(a, eth(BROADCAST, bytes(6)))
    assert not b.got
    assert a.counters["rx_runt"] == 1 and a.counters["rx_bad_source"] == 2 and len(sw.macs) == 0


def test_config_is_checked():
    cfg = parse_config({"groups": {"default": {}, "red": {"vlan": 10}},
                        "uplinks": [{"type": "tap", "ifname": "tap0"}]})
    assert cfg.groups["red"].vlan == 10 and cfg.uplinks[0].ifname == "tap0"
    for bad in ({"groups": {"a": {"vlan": 1}, "b": {"vlan": 1}}}, {"mac_table": {"capacity": 0}},
                {"uplinks": [{"type": "wifi", "ifname": "x"}]}, {"nope": 1},
                {"groups": {"a": {"rate_limit": {"ops": {"size": 1}}}}}):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_ipv4_learned_from_clients_arp_only_for_announces():
    from pyvmm.net.team import gratuitous_arp, rarp_announce
    from tests.net.switch_helpers import arp_request, parse_arp
    sw = Switch()
    a, up = sw.add_port(recording_port("a")), sw.add_port(recording_port("up", uplink=True))
    sw.receive(a, arp_request(mac(1), "10.0.0.7", "10.0.0.1"))
    sw.receive(up, arp_request(mac(2), "10.0.0.9", "10.0.0.1"))   # outside stations are not announced
    sw.receive(a, arp_request(mac(3), "0.0.0.0", "10.0.0.3"))     # an ARP probe claims nothing
    assert sw.macs.ipv4_of(mac(1), 0) == bytes([10, 0, 0, 7])
    assert sw.macs.ipv4_of(mac(2), 0) is None and sw.macs.ipv4_of(mac(3), 0) is None
    g = parse_arp(gratuitous_arp(mac(1), bytes([10, 0, 0, 7])))
    assert (g["op"], g["sha"], g["spa"], g["tpa"], g["dst"]) == (1, mac(1), "10.0.0.7", "10.0.0.7", BROADCAST)
    r = rarp_announce(mac(1))
    assert len(r) == 60 and r[12:14] == b"\x80\x35" and r[6:12] == mac(1) and r[22:28] == mac(1) and r[32:38] == mac(1)
