"""A guest's TCP stream through a team (tests/net/team_ns.py) while its
active member fails and comes back, for tests/net/test_switch_vms.py.

The guest streams a 60 KB block (`seq 1 12000`, no period shorter than
the block, so a lost or repeated piece shows) again and again with busybox
nc to tests/net/stream_receiver.py on the namespace's bridge:

    while [ ! -e STOP ]; do cat BLOCK; done | nc BRIDGE PORT

Big writes from few processes on purpose: under bt and hybrid a guest
context switch costs milliseconds, and a line-per-write pipeline
(`seq | tee | nc`) moved 4-8 bytes per TCP segment, a few hundred bytes a
second on a loaded host (issue 18: such a stream needed 600 s for 228 KB
and looked stalled).  The stream runs while the active member a0's link
goes down (failover), comes back (failback), breaks silently (beacons
only) and mends; after each event it must move on within PHASE_TIMEOUT,
or the test fails then, saying where it stood, instead of waiting out a
long timeout.  Every byte that arrived must be the block repeated, in
order; the longest pause in arrivals after each event is the gap."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from .team_ns import BRIDGE_ADDR, TeamNamespace, longest_gap

BLOCK = "".join(f"{i}\n" for i in range(1, 12001)).encode()     # what `seq 1 12000` prints: 60,894 bytes
PHASE_TIMEOUT = 60.0        # seconds the stream may take to move PHASE_BYTES after an event
PHASE_BYTES = 16 << 10


class Progress:
    """The receiver's `bytes N` lines, read by a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.bytes, self.lines = proc, 0, []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.strip())
                if line.startswith("bytes "):
                    self.bytes = int(line.split()[1])
                self.cond.notify_all()
        with self.cond:
            self.lines.append("EOF")
            self.cond.notify_all()

    def wait(self, pred, timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self), timeout), f"{what}; the receiver said {self.lines[-3:]}"

    def flowing(self, phase: str, timeout: float = PHASE_TIMEOUT, more: int = PHASE_BYTES) -> None:
        """Waits until `more` bytes beyond those that had arrived arrive."""
        start = self.bytes
        self.wait(lambda p: p.bytes >= start + more, timeout,
                  f"{phase}: fewer than {more} bytes in {timeout:.0f} s after {start} had arrived")


def expected_md5(total: int) -> str:
    """The md5 of the first `total` bytes of BLOCK repeated."""
    h = hashlib.md5()
    whole, rest = divmod(total, len(BLOCK))
    for _ in range(whole):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def stream_across_failovers(guest, run, team: TeamNamespace, dev: str, port: int, beacon: tuple[float, int],
                            out: Path) -> dict:
    """Runs the stream from `guest` (a GuestSession whose NIC `dev` is on
    the team's switch, already up with an address on the bridge's subnet;
    `run(guest, command, pattern)` types a command and waits for its
    answer) across the four events. Returns the figures; raises
    AssertionError when the stream stalls, the bytes differ, or the team
    did not fail over as it should."""
    assert team.team()["active"] == "a0", team.team()
    run(guest, "seq 1 12000 >/tmp/block && rm -f /tmp/stop && echo BLOCK-MADE", r"\nBLOCK-MADE\r?\n")
    receiver = team.exec(sys.executable, "-m", "tests.net.stream_receiver", BRIDGE_ADDR, str(port), str(out),
                         stdout=subprocess.PIPE, text=True)
    events: dict[str, float] = {}
    switch_ms: dict[str, float] = {}
    try:
        assert receiver.stdout.readline().strip() == "ready"
        progress = Progress(receiver)
        mark = guest.send(f"(while [ ! -e /tmp/stop ]; do cat /tmp/block; done | nc {BRIDGE_ADDR} {port}; "
                          "echo STREAM-END) &\n")
        # the first bytes wait for the guest to fork the pipeline and connect
        progress.flowing("start", timeout=PHASE_TIMEOUT * 3)
        progress.flowing("before the events")
        sent_before = {m["ifname"]: m["tx_frames"] for m in team.team()["members"]}

        events["link down"] = time.monotonic()          # netlink sees a0 go down: a1 takes over
        team.link_down(0)
        switch_ms["link down"] = team.wait_active("a1") * 1000
        progress.flowing("after a0's link went down")
        carried = {m["ifname"]: m["tx_frames"] for m in team.team()["members"]}
        assert carried["a1"] > sent_before["a1"], f"the standby a1 sent nothing: {team.team()}"

        events["failback"] = time.monotonic()
        team.link_up(0)
        switch_ms["failback"] = team.wait_active("a0") * 1000
        progress.flowing("after a0's link came back")

        events["beacon"] = time.monotonic()             # a0's link stays up: only the beacons notice
        team.cut(0)
        switch_ms["beacon"] = team.wait_active("a1", timeout=beacon[0] * beacon[1] + 10) * 1000
        progress.flowing("after a0 broke silently")

        events["mend"] = time.monotonic()
        team.mend(0)
        team.wait_active("a0", timeout=beacon[0] * beacon[1] + 10)
        progress.flowing("after a0 was mended")
        events["end"] = time.monotonic()

        guest.send("touch /tmp/stop\n")
        guest.expect(r"(?<!echo )STREAM-END", timeout=PHASE_TIMEOUT * 2, after=mark)  # not the echoed command
        progress.wait(lambda p: p.lines[-1:] == ["EOF"], PHASE_TIMEOUT, "the receiver did not see the end")
    except AssertionError as e:
        raise AssertionError(f"{e}\nteam: {json.dumps(team.team())}\nswitch log: {team.log_tail()}") from None
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()
        guest.send("touch /tmp/stop\n")
    got = json.loads(out.read_text())
    out.unlink()
    assert got["bytes"] > 0 and got["md5"] == expected_md5(got["bytes"]), \
        f"the {got['bytes']} bytes that arrived are not the block repeated in order"
    t = team.team()
    assert t["failovers"] == 4 and t["beacon"]["failures"] == 1, t
    times = [at for at, _n in got["arrivals"]]
    base, _ = longest_gap(times, times[0], events["link down"])
    figures = {"bytes": got["bytes"], "seconds": times[-1] - times[0], "pause_before_ms": base * 1000,
               "switch_ms": switch_ms, "gap_ms": {}}
    names = list(events)
    for name, nxt in zip(names, names[1:]):
        if name == "mend":
            break
        gap, _at = longest_gap(times, events[name], events[nxt])
        figures["gap_ms"][name] = gap * 1000
    return figures


__all__ = ["stream_across_failovers", "expected_md5", "BLOCK", "Progress"]
