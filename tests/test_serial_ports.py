"""COM1..COM4 from VmConfig.serials (`--serial stdio|null|file:PATH`, QEMU's
-serial): each UART at its PC port and IRQ, its output where the spec says."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError

from .asm import multiboot_kernel
from .guest_session import REPO

# A Multiboot kernel that writes 'A' to COM1 and 'B' to COM2, then exits with 21.
TWO_UARTS = """
    mov $0x3f8, %dx
    mov $'A', %al
    out %al, %dx
    mov $0x2f8, %dx
    mov $'B', %al
    out %al, %dx
    mov $21, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", "run", *args], cwd=REPO, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_each_uart_writes_where_its_spec_says(tmp_path):
    kernel = multiboot_kernel(TWO_UARTS)
    log = tmp_path / "com2.log"
    common = ["--kernel", str(kernel), "--engine", "bt", "--mem", "32M", "--debug-exit", "--no-reboot",
              "--no-bt-cache"]
    ran = _run(*common, "--serial", "stdio", "--serial", f"file:{log}")
    assert ran.returncode == (21 << 1) | 1, ran.stderr
    assert ran.stdout == b"A" and log.read_bytes() == b"B"
    # COM1 to nowhere, and no COM2 at all: its port reads all-ones and drops writes
    ran = _run(*common, "--serial", "null")
    assert ran.returncode == (21 << 1) | 1, ran.stderr
    assert ran.stdout == b""


@pytest.mark.parametrize("serials,message", [
    (["tcp:1"], "bad serial port 'tcp:1'"),
    (["file:"], "bad serial port 'file:'"),
    (["null"] * 5, "at most 4"),
])
def test_bad_serial_specs_are_refused(serials, message):
    with pytest.raises(ConfigError, match=message):
        VmConfig(serials=serials).validate()


def test_an_unwritable_serial_file_is_one_line(tmp_path):
    ran = _run("--kernel", str(multiboot_kernel(TWO_UARTS)), "--engine", "bt",
               "--serial", f"file:{tmp_path}/no/such/dir/x")
    lines = ran.stderr.decode().strip().splitlines()
    assert ran.returncode == 1 and len(lines) == 1 and "serial port file" in lines[0], ran.stderr
