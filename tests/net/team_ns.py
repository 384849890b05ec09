"""A team of veth uplinks into a network namespace, shared by the guest
test (tests/net/test_switch_vms.py) and bench/switch.py: the namespace
(made and removed here) has a bridge br0 at 10.79.0.1/24 joining the far
ends ha0..haN-1 of the uplinks a0..aN-1, and `pyvmm switch run` runs
inside it with one failover team over them. What happens to the team is
what a test does to a cable: `ip link set aI down` (link loss, netlink
sees it) or taking haI off the bridge (a silent break only beacons see).

Every frame stays inside the namespace, on the switch's Unix sockets or
in a guest on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pyvmm.net.switchd import SwitchError, query_status

REPO = Path(__file__).resolve().parent.parent.parent
BRIDGE_ADDR = "10.79.0.1"
BRIDGE_MAC = "02:00:00:79:00:01"


def ns_ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, capture_output=True, timeout=20)


class TeamNamespace:
    """The namespace, its bridge and veths, and switch `name` (sockets in
    rundir) with team t0 over a0..a{members-1}."""

    def __init__(self, name: str, rundir: Path, members: int = 3, failback: bool = True,
                 beacon: tuple[float, int] | None = None):
        self.name, self.rundir, self.members = name, rundir, members
        self.ns = f"pvtm-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None
        self.log = rundir / f"{name}.stderr"
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=20)
        try:
            self._wire(members)
            team: dict = {"name": "t0", "policy": "failover", "failback": failback,
                          "uplinks": [{"type": "packet", "ifname": f"a{i}"} for i in range(members)]}
            if beacon is not None:
                team["beacon"] = {"interval": beacon[0], "misses": beacon[1]}
            rundir.mkdir(parents=True, exist_ok=True)
            cfg = rundir / f"{name}.json"
            cfg.write_text(json.dumps({"teams": [team]}))
            # stderr to a file, never a pipe: a pipe nobody drains fills with the
            # switch's warnings (links, beacons) and then blocks its one loop
            self.log = rundir / f"{name}.stderr"
            with open(self.log, "wb") as err:
                self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "pyvmm", "switch",
                                              "run", name, "--config", str(cfg)], cwd=REPO,
                                             env=dict(os.environ, PYVMM_SWITCH_DIR=str(rundir)),
                                             stdout=subprocess.DEVNULL, stderr=err)
            end = time.monotonic() + 30
            while not (rundir / f"{name}.ctl").exists():
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"team switch did not start: "
                                       f"{self.log_tail() if self.proc.poll() is not None else 'timeout'}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def _wire(self, members: int) -> None:
        ns_ip(self.ns, "link", "set", "lo", "up")
        # a fixed address: by default a bridge takes its lowest port's, which
        # changes when a test takes that port off
        ns_ip(self.ns, "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge")
        for i in range(members):
            ns_ip(self.ns, "link", "add", f"a{i}", "type", "veth", "peer", "name", f"ha{i}")
            ns_ip(self.ns, "link", "set", f"ha{i}", "master", "br0")
            ns_ip(self.ns, "link", "set", f"a{i}", "up")
            ns_ip(self.ns, "link", "set", f"ha{i}", "up")
        ns_ip(self.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
        ns_ip(self.ns, "link", "set", "br0", "up")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the switch wrote to stderr."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def socket_path(self) -> Path:
        return self.rundir / f"{self.name}.sock"

    def exec(self, *argv: str, **kw) -> subprocess.Popen:
        """argv inside the namespace, from the repository root."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], cwd=REPO, **kw)

    def team(self) -> dict:
        return query_status(self.name, self.rundir)["teams"][0]

    def wait_active(self, ifname: str, timeout: float = 10.0) -> float:
        """Seconds until member ifname carries the traffic; raises AssertionError on timeout."""
        start = time.monotonic()
        while self.team()["active"] != ifname:
            assert time.monotonic() - start < timeout, f"{ifname} never became active: {self.team()}"
            time.sleep(0.01)
        return time.monotonic() - start

    # -- what happens to the cables -----------------------------------------------------
    def link_down(self, i: int) -> None:
        ns_ip(self.ns, "link", "set", f"a{i}", "down")

    def link_up(self, i: int) -> None:
        ns_ip(self.ns, "link", "set", f"a{i}", "up")

    def cut(self, i: int) -> None:
        """The far end leaves the bridge: frames vanish, both carriers stay up."""
        ns_ip(self.ns, "link", "set", "dev", f"ha{i}", "nomaster")

    def mend(self, i: int) -> None:
        ns_ip(self.ns, "link", "set", "dev", f"ha{i}", "master", "br0")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                query_status(self.name, self.rundir, request=b"stop")
                self.proc.wait(10)
            except (SwitchError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], timeout=20)
        for suffix in (".json", ".sock", ".ctl", ".lock", ".log", ".stderr"):
            (self.rundir / f"{self.name}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> "TeamNamespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_rundir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pvtm", dir="/tmp"))


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """(the longest pause between successive arrivals that ends in [start, end], when it began)."""
    best, at = 0.0, start
    for before, after in zip(times, times[1:]):
        if start <= after <= end and after - before > best:
            best, at = after - before, before
    return best, at
