"""Issue 14's x86-64-v3 check: a program built with `gcc -O2
-march=x86-64-v3` (tests/guests/v3loops.c) prints the same line natively
and inside a Linux guest.  The guest gets the static binary as a raw
virtio disk (no filesystem needed: it copies the first SIZE bytes of the
device), so the check rides on a boot that already has virtio disks."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .hostfacts import require_from_setup

SOURCE = Path(__file__).parent / "guests" / "v3loops.c"


@dataclass
class V3Program:
    disk: Path          # raw image: the binary, padded to whole sectors
    size: int           # bytes of the binary
    native: str         # the line the host CPU printed


def build_v3_program(workdir: Path) -> V3Program:
    """Builds the program, runs it on the host CPU (which must have AVX2 and
    FMA: checked against the binary's own output) and wraps it as a disk."""
    require_from_setup(programs=["gcc"], paths=["/usr/lib/x86_64-linux-gnu/libc.a"], package="gcc libc6-dev")
    binary = workdir / "v3loops"
    subprocess.run(["gcc", "-O2", "-march=x86-64-v3", "-static", "-o", str(binary), str(SOURCE)], check=True)
    code = binary.read_bytes()
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True,
                             text=True, check=True).stdout
    assert "ymm" in listing and "vfmadd" in listing, "gcc did not vectorise the loops with AVX2/FMA"
    native = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert native.startswith("V3 "), native
    disk = workdir / "v3loops.raw"
    disk.write_bytes(code + bytes(-len(code) % 512))
    return V3Program(disk, len(code), native)


def check_v3_program_in_guest(g, program: V3Program, device: str) -> None:
    """Copies the binary off `device` in guest session g, runs it and
    expects the host's line (matched only in output after the command)."""
    sent = g.send(f"head -c {program.size} {device} > /tmp/v3 && chmod +x /tmp/v3 && /tmp/v3\n")
    g.expect(rf"\n{program.native}\r?\n", timeout=900, after=sent)
