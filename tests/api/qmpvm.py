"""A real `pyvmm run` process with QMP sockets, running a tiny Multiboot
guest that idles forever (sti; hlt loop: no interrupt source is set up, so
nothing wakes it, and it costs no host CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.asm import multiboot_kernel

REPO = Path(__file__).resolve().parents[2]

IDLE_KERNEL = """
    sti
1:  hlt
    jmp 1b
"""

_kernel: list[Path] = []


def idle_kernel() -> Path:
    if not _kernel:
        _kernel.append(multiboot_kernel(IDLE_KERNEL))
    return _kernel[0]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QmpVm:
    """`pyvmm run --qmp ...` as a child process; close() kills what is left."""

    def __init__(self, engine: str, qmp: list[str], *extra: str, reboot: bool = False, kernel: Path | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel or idle_kernel()), "--engine", engine,
             "--mem", "32M", "--no-bt-cache", *([] if reboot else ["--no-reboot"]), *[a for spec in qmp for a in ("--qmp", spec)], *extra],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for_path(self, path: str, timeout: float = 30.0) -> None:
        """Waits for a unix socket to appear (the VM is built by then)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise AssertionError(f"pyvmm exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no socket at {path} after {timeout} s")
            time.sleep(0.05)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.proc.stderr.read().decode() if self.proc.poll() is not None else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def raw_connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connects, retrying while the socket file exists but is not listening
    yet (bind() makes the file before listen() runs)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
