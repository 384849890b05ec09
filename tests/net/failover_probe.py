"""The failover gap of a `pyvmm switch` team, measured with frames (for
bench/switch.py and tests/net/test_switch_failover_gap.py): a
generator on one of the switch's client sockets sends a numbered frame
every millisecond to the bridge of a namespace the bench makes
(tests/net/team_ns.py: three veth uplinks, a failover team), a receiver
on that bridge timestamps what arrives. Then the active uplink fails:

- link: `ip link set a0 down` (netlink tells the switch);
- beacon: a0's far end leaves the bridge, both links stay up, and only
  beacon probing can find it (the bench uses a beacon every second, down
  after 3 missed, as issue 18 names them).

The gap is the pause in delivery where the standby took over: from the
last frame the old member delivered to the first the new one did (the
receiver also listens on the standby's far end to see which number came
that way first). Lost frames are the numbers that never arrived; every
one of them must fall inside that pause (no losses outside the failover
window).
Needs root (network namespaces)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time

from tests.net.switch_helpers import Client
from tests.net.team_ns import TeamNamespace, new_rundir

MAGIC = b"pyvmm-fo"
SEQ = struct.Struct(">8sI")
SRC = bytes.fromhex("020000000f05")
PERIOD = 0.001                 # one frame a millisecond

# Inside the namespace: every numbered frame that reaches br0, with its
# CLOCK_MONOTONIC arrival time, and the first number that came in by the
# standby a1 (seen on its far end ha1), as JSON on stdout once `seconds` pass.
RECEIVER = """
import json, select, socket, sys, time
def listen(dev, proto):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((dev, proto))
    s.setblocking(False)
    return s
# a bridge port's frames reach only ETH_P_ALL sockets (the bridge takes them first)
br, standby = listen("br0", 0x88B5), listen("ha1", 0x0003)
print(open("/sys/class/net/br0/address").read().strip(), flush=True)
got, first_standby, end = [], None, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for s in select.select([br, standby], [], [], 0.05)[0]:
        while True:
            try:
                f, addr = s.recvfrom(2048)
            except BlockingIOError:
                break
            if f[14:22] != b"pyvmm-fo" or addr[2] == socket.PACKET_OUTGOING:
                continue
            n = int.from_bytes(f[22:26], "big")
            if s is br:
                got.append((time.monotonic(), n))
            elif first_standby is None:
                first_standby = n
print(json.dumps({"got": got, "first_standby": first_standby}), flush=True)
"""


def measure(how: str, before: float = 1.0, after: float = 2.0, beacon: tuple[float, int] = (1.0, 3)) -> dict:
    """One failure of the active uplink (how: "link" or "beacon"): the gap
    in ms, frames sent, lost, and lost outside the gap."""
    rundir = new_rundir()
    window = beacon[0] * (beacon[1] + 1) if how == "beacon" else 0.0
    with TeamNamespace("bfo", rundir, members=3, beacon=beacon if how == "beacon" else None) as team:
        if how == "beacon":      # every member has heard the others before the clock starts
            while not all(m["beacons_heard"] >= 2 for m in team.team()["members"]):
                time.sleep(0.05)
        seconds = before + window + after
        rx = team.exec(sys.executable, "-c", RECEIVER, str(seconds + 1.0), stdout=subprocess.PIPE, text=True)
        dst = bytes.fromhex(rx.stdout.readline().strip().replace(":", ""))
        client = Client(team.socket_path)
        sent, t_fail, start = 0, 0.0, time.monotonic()
        try:
            while (now := time.monotonic()) < start + seconds:
                if not t_fail and now >= start + before:
                    t_fail = time.monotonic()
                    # in a thread: running `ip` takes tens of ms the generator must not pause for
                    fail = threading.Thread(target=team.link_down if how == "link" else team.cut, args=(0,))
                    fail.start()
                client.send(dst + SRC + b"\x88\xb5" + SEQ.pack(MAGIC, sent) + bytes(34))
                sent += 1
                time.sleep(max(0.0, start + sent * PERIOD - time.monotonic()))
            fail.join()
            heard = json.loads(rx.stdout.readline())
            status = team.team()
        finally:
            client.close()
            rx.wait(10)
    rundir.rmdir()
    got, switched = heard["got"], heard["first_standby"]
    seqs = {n for _, n in got}
    lost = sorted(set(range(sent)) - seqs)
    if switched is None:
        return {"gap_ms": float("inf"), "sent": sent, "lost": len(lost), "lost_outside": len(lost),
                "duplicates": len(got) - len(seqs)}
    # the pause in delivery where the standby took over: from the last frame
    # the old member delivered to the first the new one did
    last_old = max(((t, n) for t, n in got if n < switched), default=(0.0, -1))
    first_new = min(t for t, n in got if n >= switched)
    outside = [n for n in lost if not last_old[1] < n < switched]
    assert status["active"] == "a1", f"{how}: the team did not fail over: {status}"
    return {"gap_ms": round((first_new - last_old[0]) * 1000, 1), "sent": sent, "lost": len(lost),
            "lost_outside": len(outside), "duplicates": len(got) - len(seqs)}
