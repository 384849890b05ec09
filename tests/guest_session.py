"""Driving a whole `pyvmm run` process (or a QEMU one) like a user at the
console: spawn, expect text, send input, wait for the exit code.

A thin layer over pyvmm.VM's console (pyvmm/vm.py's Console: one reader
of a guest's COM1 for the API and the tests): this adds the raw command
line, stderr, and failures as AssertionErrors that show what the guest
printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from pyvmm.errors import VmmError
from pyvmm.vm import Console

REPO = Path(__file__).resolve().parent.parent


def host_has_hardware_assist() -> bool:
    """True when KVM is backed by VT-x or AMD-V (guest kernel code runs natively)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", text, re.M))


class GuestSession:
    """One pyvmm process (`GuestSession("run", ...)`), or any other console
    program (`GuestSession(argv=[...])`). Output is collected by threads so
    expect() never blocks it."""

    def __init__(self, *args: str, env: dict | None = None, argv: list[str] | None = None):
        self.proc = subprocess.Popen(argv or [sys.executable, "-m", "pyvmm", *args], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.console = Console(self.proc)
        self._err = bytearray()
        self._err_thread = threading.Thread(target=self._pump_stderr, name="pyvmm-stderr", daemon=True)
        self._err_thread.start()

    def _pump_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._err += chunk

    @property
    def output(self) -> str:
        return self.console.output

    @property
    def errors(self) -> str:
        return bytes(self._err).decode(errors="replace")

    def mark(self) -> int:
        """Where stdout ends now: give it to expect(after=) so that only
        output that comes after (say, after a command was sent) matches."""
        return self.console.mark()

    def expect(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        """Waits until stdout from byte `after` on matches `pattern`; raises
        AssertionError with the output so far on timeout or if the process
        ended first."""
        try:
            return self.console.expect(pattern, timeout, after)
        except VmmError:
            if self.proc.poll() is not None:
                self._err_thread.join(2)
            raise AssertionError(f"{pattern!r} not seen (exit={self.proc.poll()})\n--- stdout tail:\n"
                                 f"{self.output[-3000:]}\n--- stderr:\n{self.errors[-3000:]}") from None

    def send(self, text: str) -> int:
        """Types `text` at the console; returns the mark before it (see mark())."""
        return self.console.send(text)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.console.join(5)
        self._err_thread.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "GuestSession":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
