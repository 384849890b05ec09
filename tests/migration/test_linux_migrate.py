"""A running Linux guest moves between two pyvmm processes (issue 20,
part 1): the stock kernel boots under bt with a shell loop counting into a
file, migrates over a Unix socket to a pyvmm started with `--incoming`
under another engine, and there the loop has gone on from where it was,
the guest's clock runs, and the shell answers.  Output checks match only
what came after each command was sent.  PYVMM_BT_BOOT_TIMEOUT bounds the
boot as in tests/test_linux_bt.py."""

from __future__ import annotations

import os
import time

import pytest

from pyvmm.api.client import QmpClient

from ..guest_session import GuestSession
from ..hostfacts import require_debian_cloud_kernel

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
COMMON = ("--no-reboot", "--mem", "256M", "--append", CMDLINE)


def _count(g: GuestSession) -> int:
    sent = g.send("cat /tmp/count\n")
    return int(g.expect(r"\n(\d+)\r?\n", timeout=600, after=sent).group(1))


def _uptime(g: GuestSession) -> float:
    sent = g.send("cut -d' ' -f1 /proc/uptime\n")
    return float(g.expect(r"\n(\d+\.\d+)\r?\n", timeout=600, after=sent).group(1))


def _wait_stderr(g: GuestSession, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in g.errors:
        assert g.proc.poll() is None and time.monotonic() < deadline, g.errors[-2000:]
        time.sleep(0.1)


def test_linux_guest_migrates_from_bt_to_hybrid_and_keeps_running(tmp_path):
    require_debian_cloud_kernel()
    qsock, msock = str(tmp_path / "src.qmp"), str(tmp_path / "mig.sock")
    with GuestSession("run", "--engine", "bt", *COMMON, "--qmp", f"unix:{qsock},server,wait=off") as src:
        src.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
        sent = src.send("(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) &"
                        " echo LOOP-STARTED\n")
        src.expect(r"\nLOOP-STARTED\r?\n", timeout=600, after=sent)
        time.sleep(2)
        before, clock_before = _count(src), _uptime(src)
        assert before > 0
        with GuestSession("run", "--engine", "hybrid", *COMMON, "--incoming", f"unix:{msock}") as dst:
            _wait_stderr(dst, "waiting for an incoming migration")
            qmp = QmpClient(qsock)
            qmp.execute("migrate", {"uri": f"unix:{msock}"})
            deadline = time.monotonic() + 600
            while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                assert time.monotonic() < deadline, info
                time.sleep(0.2)
            assert info["status"] == "completed", info
            assert qmp.execute("query-status")["status"] == "postmigrate"
            mark = len(dst.output)
            # The guest goes on where it was: the loop's count and the clock
            # move on from their values before the move, and the shell answers.
            after = _count(dst)
            assert after >= before, (before, after)
            time.sleep(2)
            later, clock_after = _count(dst), _uptime(dst)
            assert later > after, (after, later)
            assert clock_after > clock_before, (clock_before, clock_after)
            sent = dst.send("echo sum=$((6*7))\n")
            dst.expect(r"\nsum=42\r?\n", timeout=600, after=sent)
            assert "PYVMM-INIT-READY" not in dst.output[mark:]      # no reboot on the way
            dst.send("poweroff -f\n")
            assert dst.wait(timeout=600) == 0, dst.errors[-2000:]
            qmp.execute("quit")
            qmp.close()
        assert src.wait(timeout=120) == 0, src.errors[-2000:]
    assert "Traceback" not in src.errors and "Traceback" not in dst.errors
