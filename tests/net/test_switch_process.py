"""The real `pyvmm switch run` process with several clients speaking
QEMU's stream framing over its Unix sockets: learning, flooding, VLAN
groups, rate limits, malformed input, a MAC flood and a killed client.

"Nothing else arrived" is checked with a barrier: after the frame that
must not reach a client, a frame that must reach it is sent through the
same switch; the switch keeps order, so the client's next frame is the
barrier if and only if the first frame was not delivered."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.net.switch_helpers import BROADCAST, Client, SwitchProcess, eth, mac

CONFIG = {
    "mac_table": {"capacity": 256, "per_port": 32, "max_age": 300},
    "groups": {"default": {"vlan": 0}, "red": {"vlan": 10}, "blue": {"vlan": 20},
               "slow": {"vlan": 30, "rate_limit": {"ops": {"size": 5, "refill_time": 600000,
                                                           "one_time_burst": 3}}}},
}


@pytest.fixture(scope="module")
def switch():
    sw = SwitchProcess(CONFIG)
    yield sw
    assert sw.stop() == 0, "the switch must exit cleanly on SIGTERM"
    err = sw.proc.stderr.read()
    assert "Traceback" not in err and "failed" not in err, err


def hello(client: Client, src: bytes, others: list[Client]) -> None:
    """Makes the switch learn src on client's port; drains the flood."""
    client.send(eth(BROADCAST, src, b"hello"))
    for o in others:
        assert o.recv_until(lambda f: f[6:12] == src) is not None


def next_payload(client: Client) -> bytes | None:
    f = client.recv()
    return None if f is None else f[14:40].rstrip(b"\0")


def test_learning_flooding_and_no_echo(switch):
    a, b, c = (switch.client() for _ in range(3))
    try:
        a.send(eth(BROADCAST, mac(0xA), b"bcast"))
        assert next_payload(b) == b"bcast" and next_payload(c) == b"bcast"
        b.send(eth(mac(0xA), mac(0xB), b"to-a"))            # a is known: c must not see it
        assert next_payload(a) == b"to-a"
        c.send(eth(mac(0x99), mac(0xC), b"unknown"))        # unknown unicast: flooded to a and b
        assert next_payload(a) == b"unknown" and next_payload(b) == b"unknown"
        a.send(eth(BROADCAST, mac(0xA), b"barrier"))
        assert next_payload(c) == b"barrier"                 # not "to-a"
        a.send(eth(mac(0xC), mac(0xA), b"to-c"))
        assert next_payload(c) == b"to-c"
        # the sender never gets its own frames back
        b.send(eth(BROADCAST, mac(0xB), b"barrier2"))
        assert next_payload(a) == b"barrier2"
        st = switch.status()
        learned = {(e["mac"], e["vlan"]) for e in st["mac_table"]["entries"]}
        assert {("02:00:00:00:00:0a", 0), ("02:00:00:00:00:0b", 0), ("02:00:00:00:00:0c", 0)} <= learned
    finally:
        for x in (a, b, c):
            x.close()


def test_vlan_groups_are_isolated(switch):
    r1, r2, bl, df = switch.client("red"), switch.client("red"), switch.client("blue"), switch.client()
    try:
        r1.send(eth(BROADCAST, mac(0x101), b"red"))
        assert next_payload(r2) == b"red"
        bl.send(eth(mac(0x101), mac(0x201), b"blue-to-red-mac"))   # same MAC, other VLAN: unknown there
        df.send(eth(BROADCAST, mac(0x301), b"default"))
        r1.send(struct.pack(">6s6sHH", BROADCAST, mac(0x101), 0x8100, 20) + bytes(50))  # VLAN hop attempt
        r2.send(eth(BROADCAST, mac(0x102), b"red-barrier"))
        assert next_payload(r1) == b"red-barrier"
        bl2 = switch.client("blue")
        bl.send(eth(BROADCAST, mac(0x201), b"blue-barrier"))
        assert next_payload(bl2) == b"blue-barrier"
        bl2.send(eth(BROADCAST, mac(0x202), b"blue-barrier2"))
        assert next_payload(bl) == b"blue-barrier2"           # nothing from red or default before it
        st = switch.status()
        reds = [p for p in st["ports"] if p["group"] == "red"]
        assert sum(p["counters"]["rx_vlan_dropped"] for p in reds) == 1
        assert sum(p["counters"]["tx_frames"] for p in reds) == 2    # red + red-barrier, nothing from blue/default
        bl2.close()
    finally:
        for x in (r1, r2, bl, df):
            x.close()


def test_rate_limit_drops_over_budget_and_counts(switch):
    fast, slow = switch.client("slow"), switch.client("slow")
    try:
        for i in range(20):
            fast.send(eth(BROADCAST, mac(0x401), b"n%02d" % i))
        got = []
        while (p := next_payload(slow)) is not None and len(got) < 20:
            got.append(p)
            if len(got) == 8:
                break
        assert got == [b"n%02d" % i for i in range(8)]       # burst 3 + bucket 5
        slow.send(eth(BROADCAST, mac(0x402), b"barrier"))
        assert next_payload(fast) == b"barrier"               # the other port is not limited by fast's bucket
        st = switch.status()
        p = next(p for p in st["ports"] if p["group"] == "slow" and p["counters"]["rx_rate_limited"])
        assert p["counters"]["rx_rate_limited"] == 12 and p["counters"]["rx_frames"] == 8
    finally:
        fast.close()
        slow.close()


def test_malformed_frames_dropped_and_garbage_stream_disconnected(switch):
    bad, good = switch.client(), switch.client()
    try:
        bad.send(b"\x01\x02\x03")                            # runt
        bad.send(eth(BROADCAST, mac(0x501), bytes(3000)))    # oversized
        bad.send(eth(BROADCAST, BROADCAST))                  # multicast source
        bad.send(eth(BROADCAST, mac(0x501), b"fine"))
        assert next_payload(good) == b"fine"
        st = switch.status()
        names_before = {p["name"] for p in st["ports"]}
        c = next(p for p in st["ports"] if p["counters"]["rx_oversized"])["counters"]
        assert (c["rx_runt"], c["rx_oversized"], c["rx_bad_source"], c["rx_frames"]) == (1, 1, 1, 1)
        bad.send_raw(b"\xff\xff\xff\xf0" + bytes(64))        # a length no stream can mean
        assert bad.recv(2.0) is None                          # closed by the switch
        st = switch.status()
        assert len(st["ports"]) == len(names_before) - 1
        good2 = switch.client()
        good.send(eth(BROADCAST, mac(0x502), b"still"))
        assert next_payload(good2) == b"still"
        good2.close()
    finally:
        bad.close()
        good.close()


def test_mac_flood_stays_bounded_and_others_keep_working(switch):
    victim, flooder, peer = switch.client(), switch.client(), switch.client()
    try:
        hello(victim, mac(0x601), [flooder, peer])
        rng = random.Random(18)
        burst = b"".join(
            struct.pack(">I", 60) + eth(mac(0x601) if i % 2 else BROADCAST,
                                        bytes([0x02]) + rng.randbytes(5), b"flood")
            for i in range(3000))
        flooder.send_raw(burst)
        peer.send(eth(mac(0x601), mac(0x602), b"to-victim"))
        assert victim.recv_until(lambda f: f[14:23] == b"to-victim", timeout=10) is not None
        st = switch.status()
        assert st["mac_table"]["size"] <= st["mac_table"]["capacity"]
        assert max(p["learned"] for p in st["ports"]) <= CONFIG["mac_table"]["per_port"]
        assert any(e["mac"] == "02:00:00:00:06:01" for e in st["mac_table"]["entries"])
        assert st["mac_table"]["evicted"] >= 3000 - 32
    finally:
        for x in (victim, flooder, peer):
            x.close()


KILLED_CLIENT = """
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
f = b"\\xff" * 6 + bytes([2, 0, 0, 0, 7, 1]) + b"\\x88\\xb5" + b"dying".ljust(46, b"\\0")
s.sendall(struct.pack(">I", len(f)) + f + struct.pack(">I", 60) + b"half")   # dies mid-frame
print("sent", flush=True); time.sleep(60)
"""


def test_killed_client_is_removed_and_switch_survives(switch):
    watcher = switch.client()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(switch.socket_path())],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        assert next_payload(watcher) == b"dying"
        ports_with_it = len(switch.status()["ports"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + 5
        while len((st := switch.status())["ports"]) != ports_with_it - 1:
            assert time.monotonic() < end, "the dead client's port was not removed"
            time.sleep(0.05)
        assert not any(e["mac"] == "02:00:00:00:07:01" for e in st["mac_table"]["entries"])
        other = switch.client()
        watcher.send(eth(BROADCAST, mac(0x702), b"alive"))
        assert next_payload(other) == b"alive"
        # the VM restarts and reattaches with its old MAC: learned on its new port
        hello(other, bytes([2, 0, 0, 0, 7, 1]), [watcher])
        watcher.send(eth(bytes([2, 0, 0, 0, 7, 1]), mac(0x702), b"welcome-back"))
        assert next_payload(other) == b"welcome-back"
        other.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.close()


def test_cli_status_text_and_errors(switch):
    r = switch.cli("status", switch.name)
    assert r.returncode == 0 and "MAC table:" in r.stdout and "port" in r.stdout
    r = switch.cli("status", "no-such-switch")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not running" in r.stderr
    r = switch.cli("run", switch.name)                      # the name is taken
    assert r.returncode == 1 and "already running" in r.stderr and "Traceback" not in r.stderr


def test_mac_entries_age_out():
    sw = SwitchProcess({"mac_table": {"max_age": 0.3}}, name="aging")
    try:
        a, b = sw.client(), sw.client()
        hello(a, mac(0x801), [b])
        assert any(e["mac"] == "02:00:00:00:08:01" for e in sw.status()["mac_table"]["entries"])
        time.sleep(1.6)                                       # max_age plus at least one tick
        st = sw.status()
        assert st["mac_table"]["size"] == 0 and st["mac_table"]["aged"] >= 1
        a.close()
        b.close()
    finally:
        assert sw.stop() == 0


def test_a_client_that_stops_reading_does_not_stall_the_others(switch):
    stuck, sender, reader = switch.client(), switch.client(), switch.client()
    try:
        n = 3000                                                  # 4.5 MB: past the stuck port's queue
        frame = eth(BROADCAST, mac(0x901), b"bulk".ljust(1486, b"x"))
        batch = (struct.pack(">I", len(frame)) + frame) * 100
        got = 0
        for _ in range(n // 100):
            sender.send_raw(batch)
            for _ in range(100):                                  # a live VM keeps reading
                got += reader.recv() is not None
        assert got == n
        st = switch.status()
        stuck_port = max(st["ports"], key=lambda p: p["counters"]["tx_dropped"])
        assert stuck_port["counters"]["tx_dropped"] > 0
        reader.send(eth(BROADCAST, mac(0x902), b"still-fine"))
        assert next_payload(sender) == b"still-fine"
    finally:
        for x in (stuck, sender, reader):
            x.close()


def test_a_reflecting_client_is_dropped_and_counted(switch):
    a, r, w = switch.client(), switch.client(), switch.client()
    try:
        a.send(eth(BROADCAST, mac(0x3A), b"hello"))
        echoed = r.recv()
        assert echoed is not None and next_payload(w) == b"hello"
        r.send(echoed)                                          # a looping guest sends it straight back
        w.send(eth(mac(0x3A), mac(0x3C), b"to-a"))              # still reaches a, not the reflector
        assert next_payload(a) == b"to-a"
        a.send(eth(BROADCAST, mac(0x3A), b"barrier"))
        assert next_payload(w) == b"barrier"                    # the echo never reached w
        st = switch.status()
        names = {p["name"]: p for p in st["ports"]}
        flapped = [p for p in names.values() if p["counters"]["rx_mac_flap"] == 1]
        assert len(flapped) == 1 and st["mac_table"]["flaps"] >= 1
    finally:
        for x in (a, r, w):
            x.close()
