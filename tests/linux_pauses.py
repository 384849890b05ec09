"""The Linux pause/resume check of the run state (issue 15), for a Linux
guest some other test boots anyway: `pyvmm run` with a QMP socket
(pause_qmp_args()) is paused up to LINUX_PAUSES times at random moments with
QMP's stop and cont while a shell loop runs for LOOP_GUEST_S seconds of
guest time (/proc/uptime).  The loop ends, the shell goes on answering,
and the guest's uptime advanced by the host time minus the time paused.
(It was tests/test_runstate.py's own bt and hybrid Linux boots.)"""

from __future__ import annotations

import json
import random
import socket
import threading
import time

LINUX_PAUSES = 20
MIN_PAUSES_IN_LOOP = 10          # a loaded host may fit fewer of them into the loop
LINUX_PAUSED_S = 0.25            # 5 s paused in all: a leak into guest time is plain to see
LOOP_GUEST_S = 20                # the shell loop runs this long in guest time, beyond the pauses
QMP_TIMEOUT_S = 60.0

# Counts rounds until /proc/uptime (the kernel's own clock) has gone SECONDS
# on; builtins only (a fork per round would make it crawl under bt).
SHELL_LOOP = ("read u r < /proc/uptime; echo START-$u; end=$(( ${u%.*} + SECONDS )); i=0; "
              "while :; do i=$((i+1)); read u r < /proc/uptime; [ ${u%.*} -ge $end ] && break; done; "
              "echo END-$u-LOOPS-$i\n")


def pause_qmp_args(path: str) -> list[str]:
    """The `pyvmm run` options for the QMP socket the check pauses through."""
    return ["--qmp", f"unix:{path},server=on,wait=off"]


class QmpLine:
    """A minimal synchronous QMP client: execute() sends one command and
    returns its "return" value, skipping events."""

    def __init__(self, path: str, timeout: float = QMP_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._buf = ""
        self._decoder = json.JSONDecoder()
        assert "QMP" in self._next(), "no QMP greeting"
        self.execute("qmp_capabilities")

    def _next(self) -> dict:
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    obj, end = self._decoder.raw_decode(text)
                    self._buf = text[end:]
                    return obj
                except json.JSONDecodeError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self._buf += chunk.decode()

    def execute(self, command: str):
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\r\n")
        while True:
            reply = self._next()
            if "event" in reply:
                continue
            assert "error" not in reply, f"{command}: {reply['error']}"
            return reply["return"]

    def close(self) -> None:
        self.sock.close()


def check_pauses_keep_clock_and_workload(g, qmp_path: str, seed: int = 20) -> None:
    """Runs the check on GuestSession `g` at its shell, booted with
    pause_qmp_args(qmp_path). Fails on any lost work or leaked time."""
    qmp = QmpLine(qmp_path)
    try:
        where = g.send(SHELL_LOOP.replace("SECONDS", str(LOOP_GUEST_S)))
        start = g.expect(r"START-(\d+\.\d+)", 600, after=where)
        start_at = time.monotonic()
        ended: list = []          # (match, host time it arrived), from a watcher
        watcher = threading.Thread(target=lambda: ended.append(
            (g.expect(r"END-(\d+\.\d+)-LOOPS-(\d+)", 600, after=where), time.monotonic())), daemon=True)
        watcher.start()
        rng = random.Random(seed)
        paused: list[tuple[float, float]] = []      # (host time it began, seconds)
        for _ in range(LINUX_PAUSES):
            time.sleep(rng.uniform(0.05, 0.35))
            if ended:              # the guest cannot print while paused: this pause would come after END
                break
            qmp.execute("stop")
            t = time.monotonic()
            assert qmp.execute("query-status")["status"] == "paused"
            time.sleep(LINUX_PAUSED_S)
            qmp.execute("cont")
            paused.append((t, time.monotonic() - t))
        watcher.join(600)
        assert ended, "no END from the shell loop"
        (end, end_at), = ended
        inside = [s for t, s in paused if t < end_at]     # not one that raced with END
        pauses, paused_s = len(inside), sum(inside)
        assert pauses >= MIN_PAUSES_IN_LOOP, f"only {pauses} pauses before the loop ended"
        where = g.send("echo $((6*7))-ANSWER\n")
        g.expect(r"\n42-ANSWER", 600, after=where)     # the answer, not the echo
    finally:
        qmp.close()
    guest_s = float(end.group(1)) - float(start.group(1))
    host_s = end_at - start_at
    print(f"loop {guest_s:.2f} s guest, {host_s:.2f} s host, {paused_s:.2f} s of it paused "
          f"({pauses} pauses); "
          f"{int(end.group(2))} rounds")
    assert int(end.group(2)) > 0 and guest_s >= LOOP_GUEST_S - 1     # the loop compares whole seconds
    # The pauses left guest time alone: what the guest saw is what ran.
    assert abs(guest_s - (host_s - paused_s)) < 1.0, (guest_s, host_s, paused_s)
    for bad in ("soft lockup", "rcu_sched self-detected stall", "clocksource watchdog", "hung_task"):
        assert bad not in g.output, bad
