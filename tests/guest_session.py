"""Driving a whole `pyvmm run` process like a user at the console:
spawn, expect text, send input, wait for the exit code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def host_has_hardware_assist() -> bool:
    """True when KVM is backed by VT-x or AMD-V (guest kernel code runs natively)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", text, re.M))


class GuestSession:
    """One pyvmm process. Output is collected by a thread so expect() never blocks it."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "pyvmm", *args], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            with self._cond:
                buf.extend(chunk)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def errors(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def mark(self) -> int:
        """Where stdout ends now: give it to expect(after=) so that only
        output that comes after (say, after a command was sent) matches."""
        with self._cond:
            return len(self._out)

    def expect(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        """Waits until stdout from byte `after` on matches `pattern`; raises
        AssertionError with the output so far on timeout or if the process
        ended first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._out[after:].decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(f"{pattern!r} not seen (exit={self.proc.poll()})\n--- stdout tail:\n"
                                         f"{self._out.decode(errors='replace')[-3000:]}\n--- stderr:\n"
                                         f"{self._err.decode(errors='replace')[-3000:]}")
                self._cond.wait(min(left, 0.5))

    def send(self, text: str) -> int:
        """Types `text` at the console; returns the mark before it (see mark())."""
        where = self.mark()
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()
        return where

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "GuestSession":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
