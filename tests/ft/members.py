"""Two `pyvmm run --ft` processes around the FT test guest, and a client
that types into whichever is live and reads the console file they share."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

GUEST_OPTS = ["--engine", "bt", "-m", "16", "--append", "", "--debug-exit", "iobase=0xf4,iosize=1",
              "--no-kvmclock"]
START_WAIT_S = 60.0
ECHO_WAIT_S = 3.0


class Pair:
    """A backup and a primary on a unix channel in `work`."""

    def __init__(self, kernel: str, work: Path, guest_opts: list[str] | None = None):
        self.work = work
        self.console = work / "console.txt"
        channel = f"unix:{work / 'ft.sock'}"
        opts = [*(guest_opts or ["--kernel", kernel, *GUEST_OPTS]), "--serial", f"file:{self.console}"]
        cmd = [sys.executable, "-m", "pyvmm", "run", "--ft-channel", channel, *opts]
        self.backup = subprocess.Popen(cmd + ["--ft", "backup"], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=open(work / "backup.err", "wb"))
        self.primary = subprocess.Popen(cmd + ["--ft", "primary"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=open(work / "primary.err", "wb"))
        self.live = self.primary
        self.killed_at: float | None = None
        self.sent_to_backup = False

    def text(self) -> bytes:
        try:
            return self.console.read_bytes()
        except FileNotFoundError:
            return b""

    def echoes(self) -> bytes:
        return self.text().split(b"SUM=")[0].replace(b".", b"")

    def wait_running(self) -> None:
        """Until the guest's timer printed (both members are up)."""
        deadline = time.monotonic() + START_WAIT_S
        while b"." not in self.text():
            if time.monotonic() > deadline or self.primary.poll() is not None:
                raise AssertionError(f"FT guest did not start: {self.errors()}")
            time.sleep(0.02)

    def type(self, byte: bytes, kill_after_s: float | None = None) -> None:
        """Sends one byte to the live member until the console echoes it
        (again to the backup if the primary died before logging it);
        `kill_after_s`: SIGKILL the primary that long after the first send."""
        want = self.echoes().count(byte) + 1
        while True:
            try:
                self.live.stdin.write(byte)
                self.live.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            if kill_after_s is not None:
                time.sleep(kill_after_s)
                self.kill_primary()
                kill_after_s = None
            deadline = time.monotonic() + ECHO_WAIT_S
            while time.monotonic() < deadline:
                if self.echoes().count(byte) >= want:
                    return
                time.sleep(0.01)
            if self.live is self.backup and self.primary.poll() is not None and self.sent_to_backup:
                raise AssertionError(f"no echo of {byte!r} from the live backup: {self.errors()}")
            self.live = self.backup          # the primary died before logging it: type again
            self.sent_to_backup = True

    def kill_primary(self) -> None:
        self.killed_at = time.monotonic()
        self.primary.send_signal(signal.SIGKILL)
        self.primary.wait()
        self.live = self.backup

    def failover_s(self) -> float:
        """From the kill to the backup going live (the CLOCK_MONOTONIC time it prints)."""
        deadline = time.monotonic() + 10
        err = self.work / "backup.err"
        while not (m := re.search(rb"backup live .*monotonic ([0-9.]+)", err.read_bytes())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the backup did not go live: {self.errors()}")
            time.sleep(0.01)
        return float(m.group(1)) - self.killed_at

    def finish(self) -> int:
        """Types 'q' and returns the live member's exit code."""
        self.type(b"q")
        for p in (self.primary, self.backup):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(f"an FT member did not end: {self.errors()}")
        return self.live.returncode

    def close(self) -> None:
        for p in (self.primary, self.backup):
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdin:
                try:
                    p.stdin.close()
                except OSError:
                    pass

    def errors(self) -> str:
        return " | ".join(f"{n}: {(self.work / f'{n}.err').read_text(errors='replace')[-400:]}"
                          for n in ("primary", "backup"))
