"""Guest resets: the i8042 reset line reboots the VM (a fresh machine, as a
power cycle would give), or ends pyvmm with code 0 under --no-reboot."""

import subprocess
import sys

import pytest

from pyvmm.runner import MAX_REBOOTS

from .asm import GUESTS_DIR, assemble
from .guest_session import REPO

# Multiboot kernel: print "boot" on COM1, then pulse the reset line (0xFE to 0x64).
RESETTER = """
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002
    .text
    .code32
    .globl _start
_start:
    mov $msg, %esi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
    hlt
msg: .asciz "boot\\n"
"""


@pytest.fixture(scope="module")
def kernel():
    return assemble(RESETTER, fmt="elf32", ld_script=GUESTS_DIR / "guest.ld")


def _run(kernel, *extra):
    return subprocess.run([sys.executable, "-m", "pyvmm", "run", "--engine", "bt", "--kernel", str(kernel),
                           "--mem", "32M", *extra], cwd=REPO, capture_output=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_no_reboot_ends_with_code_0(kernel):
    proc = _run(kernel, "--no-reboot", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"boot\n"
    assert b"guest stopped: reset i8042 reset" in proc.stderr


def test_reset_reboots_until_the_loop_limit(kernel):
    proc = _run(kernel)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"boot\n" * (MAX_REBOOTS + 1)
