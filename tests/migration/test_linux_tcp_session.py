"""A Linux guest keeps a live TCP session, a counter, its clocks and its
disk writes across live migrations both ways between bt and hybrid
(issue 20, part 3) and across snapshot, kill -9 and restore under the same
engine and under the other one (issue 19, part 5), all on one boot.

The fitted kernel (tests/linux_echo.py's kernel_args: the subject here is
the VM's state, not the stock kernel's boot) boots under bt on a `pyvmm
switch` whose TAP uplink sits in a network namespace the test makes
(tests/linux_echo.py).  The guest
serves TCP echo to a client in that namespace, which streams numbered
lines and checks every byte that comes back, and counts in a loop that
writes one record per count to its raw disk.  While all three run:

1. it migrates bt -> hybrid, to a fresh pyvmm started with `--incoming`
   and the source's --net and --drive (the image is shared storage);
2. and back hybrid -> bt the same way;
3. QMP `stop` and `x-snapshot-file-save`, kill -9, and `pyvmm run
   --restore FILE` under bt (the engine that saved);
4. the same again, restored under hybrid (the other engine).

The VM stays stopped from a save to the kill, so nothing the outside saw
happened after the snapshot: the client's unacknowledged bytes are simply
retransmitted by its TCP to the restored guest.  After each step the same
connection goes on (no byte lost, changed or repeated), the switch learns
the MAC on the new VM's port, the count goes on from at least where it
was, uptime goes on and the wall clock never goes back (after a live
migration it also runs no faster than the host's: under hybrid, user-mode
rdtsc in the vDSO would read the host's counter), and the disk, read past
the guest's page cache, holds the record of that count.  At the end every
record up to the final count is in the image.  PYVMM_BT_BOOT_TIMEOUT
bounds the boot as in tests/test_linux_bt.py."""

from __future__ import annotations

import os
import time

import pytest

from pyvmm.api.client import QmpClient

from ..guest_session import GuestSession
from .moves import migrate, wait_stderr
from ..linux_echo import (
    ANSWER_S,
    EchoNet,
    check_image,
    clocks,
    count,
    disk_matches_count,
    kernel_args,
    make_disk,
    run,
    start_workload,
    stop_loop_and_count,
)

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
# (how the VM moves on, the engine that runs it next)
STEPS = (("migrate", "hybrid"), ("migrate", "bt"), ("restore", "bt"), ("restore", "hybrid"))


def _save_stopped(qsock: str, path: str) -> None:
    """stop, then the whole VM into `path`; the VM stays stopped."""
    qmp = QmpClient(qsock)
    try:
        qmp.execute("stop")
        qmp.execute("x-snapshot-file-save", {"path": path}, timeout=300)
        assert qmp.execute("query-status")["status"] == "paused"
    finally:
        qmp.close()


def _wait_echoed_or_explain(client, g: GuestSession, at_least: int, where) -> None:
    """client.wait_echoed; when the stream stalls, the failure also says
    whether the guest's shell still answers and what the VM printed last,
    so a stalled NIC tells itself apart from a stalled guest."""
    try:
        client.wait_echoed(at_least)
    except AssertionError as stalled:
        try:
            run(g, "echo ALIVE-$((20+22))", r"\nALIVE-42\r?\n", timeout=60)
            shell = "the shell answers"
        except Exception as e:      # noqa: BLE001  (any failure of the probe is the answer)
            shell = f"the shell does not answer ({type(e).__name__})"
        raise AssertionError(f"{where}: {stalled}; {shell}; console tail {g.output[-1500:]!r}; "
                             f"stderr tail {g.errors[-1500:]!r}") from None


def test_tcp_echo_counter_and_disk_survive_migration_and_kill_restore(tmp_path):
    boot = kernel_args()
    net = EchoNet()
    disk = make_disk(tmp_path / "disk.raw")
    net_args, env = net.guest_args()
    common = (*boot, "--no-reboot", "--mem", "192M", "--append", CMDLINE, *net_args,
              "--drive", f"file={disk},format=raw,id=disk0")
    qsock = str(tmp_path / "q0.sock")
    sessions: list[GuestSession] = []
    client = None
    try:
        g = GuestSession("run", "--engine", "bt", *common, "--qmp", f"unix:{qsock},server,wait=off", env=env)
        sessions.append(g)
        g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
        client = start_workload(g, net)
        port = net.mac_port()
        assert port is not None                 # the switch learned the guest where it booted
        for step, (how, engine) in enumerate(STEPS, 1):
            before = disk_matches_count(g)
            host_wall = time.time()                  # before the guest reads its clock
            uptime, wall = clocks(g)
            next_q = str(tmp_path / f"q{step}.sock")
            if how == "migrate":
                uri = f"unix:{tmp_path}/m{step}.sock"
                nxt = GuestSession("run", "--engine", engine, *common, "--incoming", uri,
                                   "--qmp", f"unix:{next_q},server,wait=off", env=env)
                sessions.append(nxt)
                wait_stderr(nxt, "waiting for an incoming migration")
                echoed = client.echoed
                migrate(qsock, uri)                 # the stream runs all along
                assert g.wait(timeout=120) == 0, g.errors[-2000:]
            else:
                snap = str(tmp_path / f"s{step}.snap")
                _save_stopped(qsock, snap)
                g.proc.kill()                        # kill -9: no goodbye to the switch, no flush
                g.wait(timeout=60)
                check_image(disk, before)            # what the guest wrote before the save outlived it
                echoed = client.echoed
                nxt = GuestSession("run", "--engine", engine, *common, "--restore", snap,
                                   "--qmp", f"unix:{next_q},server,wait=off", env=env)
                sessions.append(nxt)
            g, qsock = nxt, next_q
            mark = len(g.output)
            # The same connection goes on: 50 more lines back intact, from the new VM.
            _wait_echoed_or_explain(client, g, echoed + 50, (step, how, engine))
            moved = net.mac_port()
            assert moved not in (None, port), (step, how, port, moved)
            after = disk_matches_count(g)
            assert after >= before, (step, how, before, after)
            time.sleep(1)
            assert count(g) > after, (step, how)               # the loop goes on
            uptime_now, wall_now = clocks(g)
            assert uptime_now > uptime, (step, how, uptime, uptime_now)
            assert wall_now >= wall, (step, how, wall, wall_now)
            if how == "migrate":    # 2 s for date's whole seconds
                assert wall_now <= wall + (time.time() - host_wall) + 2, (step, how, wall, wall_now)
            run(g, "echo sum=$((6*7))", r"\nsum=42\r?\n")
            assert "PYVMM-INIT-READY" not in g.output[mark:]     # resumed, not rebooted
            port = moved
        lines = client.finish()
        assert lines >= 20 + 50 * len(STEPS), lines
        final = stop_loop_and_count(g)
        g.send("poweroff -f\n")
        assert g.wait(timeout=ANSWER_S) == 0, g.errors[-2000:]
        check_image(disk, final)
        for s in sessions:
            assert "Traceback" not in s.errors, s.errors[-2000:]
    finally:
        if client is not None:
            client.kill()
        for s in sessions:
            s.kill()
        net.close()
