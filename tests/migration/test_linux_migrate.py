"""A running Linux guest moves between pyvmm processes (issue 20, part 1):
the stock kernel boots under bt with a shell loop counting into a file,
then migrates over Unix sockets bt -> hybrid -> bt -> hybrid -> bt, each
hop to a fresh pyvmm started with `--incoming`.  On every destination the
loop has gone on from where it was, the guest's clocks run (uptime, and the
wall clock user space reads through the vDSO, which must not jump: under
hybrid, user-mode rdtsc would read the host's counter), and the shell
answers.  Output checks match only what came after each command was sent.
PYVMM_BT_BOOT_TIMEOUT bounds the boot as in tests/test_linux_bt.py."""

from __future__ import annotations

import os
import time

import pytest


from ..guest_session import GuestSession
from .moves import migrate, wait_stderr
from ..hostfacts import require_debian_cloud_kernel

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
COMMON = ("--no-reboot", "--mem", "256M", "--append", CMDLINE)
HOPS = ("hybrid", "bt", "hybrid", "bt")
ANSWER_S = 600


def _count(g: GuestSession) -> int:
    """The loop's count.  `echo $i > /tmp/count` truncates the file before it
    writes, so a read in between finds it empty (under load that window is
    wide): the read is repeated then."""
    for _ in range(20):
        sent = g.send("echo C=$(cat /tmp/count)\n")
        found = g.expect(r"\nC=(\d*)\r?\n", timeout=ANSWER_S, after=sent).group(1)
        if found:
            return int(found)
        time.sleep(0.5)
    raise AssertionError("/tmp/count stayed empty")


def _clocks(g: GuestSession) -> tuple[float, int]:
    """(uptime, wall-clock seconds) as the guest reads them."""
    sent = g.send("echo T=$(cut -d' ' -f1 /proc/uptime)/$(date +%s)\n")
    m = g.expect(r"\nT=(\d+\.\d+)/(\d+)\r?\n", timeout=ANSWER_S, after=sent)
    return float(m.group(1)), int(m.group(2))


def test_linux_guest_migrates_between_bt_and_hybrid_and_keeps_running(tmp_path):
    require_debian_cloud_kernel()
    qsock = str(tmp_path / "q0.sock")
    sessions: list[GuestSession] = []
    try:
        src = GuestSession("run", "--engine", "bt", *COMMON, "--qmp", f"unix:{qsock},server,wait=off")
        sessions.append(src)
        src.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
        sent = src.send("(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) &"
                        " echo LOOP-STARTED\n")
        src.expect(r"\nLOOP-STARTED\r?\n", timeout=ANSWER_S, after=sent)
        time.sleep(2)
        before, host_wall = _count(src), time.time()        # host time before the guest reads its clock
        uptime, wall = _clocks(src)
        assert before > 0
        for hop, engine in enumerate(HOPS, 1):
            uri, next_q = f"unix:{tmp_path}/m{hop}.sock", str(tmp_path / f"q{hop}.sock")
            dst = GuestSession("run", "--engine", engine, *COMMON, "--incoming", uri,
                               "--qmp", f"unix:{next_q},server,wait=off")
            sessions.append(dst)
            wait_stderr(dst, "waiting for an incoming migration")
            migrate(qsock, uri)
            assert src.wait(timeout=120) == 0, src.errors[-2000:]
            mark = len(dst.output)
            # The guest goes on where it was: the loop's count and the clocks
            # move on from their values before the move, and the shell answers.
            after = _count(dst)
            assert after >= before, (hop, before, after)
            time.sleep(2)
            later, host_now = _count(dst), time.time()
            uptime_now, wall_now = _clocks(dst)
            assert later > after, (hop, after, later)
            assert uptime_now > uptime, (hop, uptime, uptime_now)
            # The wall clock did not go back and ran no faster than the host's
            # between the two readings (host times taken before each command
            # was sent and after its answer; 2 s for date's whole seconds).
            assert wall <= wall_now <= wall + (time.time() - host_wall) + 2, (hop, wall, wall_now)
            sent = dst.send("echo sum=$((6*7))\n")
            dst.expect(r"\nsum=42\r?\n", timeout=ANSWER_S, after=sent)
            assert "PYVMM-INIT-READY" not in dst.output[mark:]      # no reboot on the way
            src, qsock, before, uptime, wall, host_wall = dst, next_q, later, uptime_now, wall_now, host_now
        src.send("poweroff -f\n")
        assert src.wait(timeout=ANSWER_S) == 0, src.errors[-2000:]
        for g in sessions:
            assert "Traceback" not in g.errors, g.errors[-2000:]
    finally:
        for g in sessions:
            g.kill()
