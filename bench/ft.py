"""FT (record and replay under bt): overhead and failover time.

Overhead: a guest that computes and prints (its console goes through
output commit) runs to its end without FT (`--engine bt --deterministic`)
and as an FT primary with a backup replaying beside it; the figure is the
ratio of the primary's wall time (guest start to guest end, the end
acknowledged by the backup) to the plain run's, best of --repeat each;
cpu_overhead compares the primary's CPU time alone (on this host the
backup competes with the primary for the same cores).

Failover: --failovers times, a backup and a primary run the FT test guest
(tests/ft/guest.py) while a client types into it; the primary is killed
(SIGKILL) at a random moment while a byte is on its way in.  Each time the
backup must go live, the client's console must hold every echoed byte
once, with no gap, and the time from the kill to the backup going live is
recorded.  --busy more kills land while the computing guest runs, where
the backup lags most; its console must then equal a plain run's.

Ends with: RESULT overhead=X cpu_overhead=X failover_max_ms=N failover_median_ms=N
failovers=N goal_overhead=met|missed goal_failover=met|missed
(goals: overhead <= 2x, every failover < 1 s)."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.asm import multiboot_kernel  # noqa: E402
from tests.ft.guest import kernel as ft_guest, timer_prologue  # noqa: E402
from tests.ft.members import GUEST_OPTS, Pair  # noqa: E402

# ~14M instructions of arithmetic, a '.' every 64K iterations, PIT interrupts at 1 kHz of guest time.
WORK = timer_prologue(0x04A9) + r"""
    sti
    mov ecx, 2000000
1:  add eax, ecx
    xor ebx, eax
    rol ebx, 3
    test ecx, 0x3fff
    jnz 2f
    mov al, '.'
    mov dx, 0x3f8
    out dx, al
2:  dec ecx
    jnz 1b
    mov al, 10
    mov dx, 0x3f8
    out dx, al
    mov al, 0
    out 0xf4, al
    hlt
timer:
    push eax
    mov al, 0x20
    out 0x20, al
    pop eax
    iret
.align 8
idtr:
    .word 256 * 8 - 1
    .long 0x200000
"""


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one pyvmm run that must end with the guest's exit 1."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 1:
        raise SystemExit(f"bench/ft.py: {' '.join(cmd[:6])}... ended with {p.returncode}, not the guest's exit 1")
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime


def overhead(repeat: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """((wall, CPU) seconds plain, (wall, CPU) seconds of the FT primary), best of `repeat` each."""
    kernel = str(multiboot_kernel(WORK))
    base = [sys.executable, "-m", "pyvmm", "run", "--kernel", kernel, *GUEST_OPTS]
    plain, ft = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            plain.append(_timed(base + ["--deterministic", "--no-paravirt", "--serial", f"file:{d}/plain.txt"]))
            chan = ["--ft-channel", f"unix:{d}/ft.sock", "--serial", f"file:{d}/ft.txt"]
            backup = subprocess.Popen(base + chan + ["--ft", "backup"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)            # the backup listening: its start is not the primary's cost
            ft.append(_timed(base + chan + ["--ft", "primary"]))
            backup.wait(timeout=120)
            if Path(f"{d}/ft.txt").read_bytes() != Path(f"{d}/plain.txt").read_bytes():
                raise SystemExit("bench/ft.py: the FT console differs from the plain run's")
    return min(plain), min(ft)


def failovers_busy(count: int, seed: int) -> list[float]:
    """Kills during the computing guest (the backup's replay lag is largest
    there); its console must equal a plain run's byte for byte."""
    kernel = str(multiboot_kernel(WORK))
    base = [sys.executable, "-m", "pyvmm", "run", "--kernel", kernel, *GUEST_OPTS]
    rng = random.Random(seed)
    times = []
    with tempfile.TemporaryDirectory() as d:
        _timed(base + ["--deterministic", "--no-paravirt", "--serial", f"file:{d}/plain.txt"])
        want = Path(f"{d}/plain.txt").read_bytes()
    for n in range(count):
        with tempfile.TemporaryDirectory() as d:
            pair = Pair(kernel, Path(d))
            try:
                pair.wait_running()
                time.sleep(rng.uniform(0, 2.0))
                pair.kill_primary()
                times.append(pair.failover_s())
                if pair.backup.wait(timeout=120) != 1 or pair.text() != want:
                    raise SystemExit(f"bench/ft.py: busy failover {n}: console {pair.text()!r} is not {want!r}")
            finally:
                pair.close()
        print(f"busy failover {n + 1}/{count}: {times[-1] * 1000:.0f} ms", flush=True)
    return times


def linux_failovers(kernel: str, count: int, seed: int) -> list[float]:
    """A Linux guest (busybox initramfs) under FT: a command before the kill,
    the kill while the shell runs, a command to the live backup after it;
    each command's output must appear exactly once, with no gap."""
    from pyvmm.guest.initramfs import READY_MARKER, ensure_default_initramfs
    initrd = str(ensure_default_initramfs())
    rng = random.Random(seed)
    opts = ["--engine", "bt", "-m", "256", "--kernel", kernel, "--initrd", initrd]
    times = []
    for n in range(count):
        with tempfile.TemporaryDirectory() as d:
            pair = Pair(kernel, Path(d), opts)
            try:
                _expect(pair, READY_MARKER.encode(), 900)
                time.sleep(0.5)
                _command(pair, b"echo one-$((6*7))\n", b"one-42")
                time.sleep(rng.uniform(0, 1.0))
                pair.kill_primary()
                times.append(pair.failover_s())
                _command(pair, b"echo two-$((6*8))\n", b"two-48")
                text = pair.text()
                if b"\0" in text or text.count(b"one-42\r\n") != 1 or text.count(b"two-48\r\n") != 1:
                    raise SystemExit(f"bench/ft.py: Linux failover {n}: console {text[-300:]!r}")
                pair.backup.stdin.write(b"poweroff -f\n")
                pair.backup.stdin.flush()
                pair.backup.wait(timeout=120)
            finally:
                pair.close()
        print(f"Linux failover {n + 1}/{count}: {times[-1] * 1000:.0f} ms", flush=True)
    return times


def _expect(pair: Pair, text: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in pair.text():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/ft.py: no {text!r} on the FT console: {pair.errors()}")
        time.sleep(0.1)


def _command(pair: Pair, line: bytes, answer: bytes) -> None:
    pair.live.stdin.write(line)
    pair.live.stdin.flush()
    _expect(pair, answer + b"\r\n", 300)


def failovers(count: int, seed: int) -> list[float]:
    kernel = str(ft_guest())
    rng = random.Random(seed)
    times = []
    text = b"abcdefgh"
    for n in range(count):
        with tempfile.TemporaryDirectory() as d:
            pair = Pair(kernel, Path(d))
            try:
                pair.wait_running()
                kill_at = rng.randrange(len(text))
                for i, b in enumerate(text):
                    pair.type(bytes([b]), rng.uniform(0, 0.05) if i == kill_at else None)
                    if i == kill_at:
                        times.append(pair.failover_s())
                if pair.finish() != 1:
                    raise SystemExit(f"bench/ft.py: failover {n}: the backup did not end with the guest's exit")
                console = pair.text()
                if b"\0" in console or pair.echoes() != text + b"q":
                    raise SystemExit(f"bench/ft.py: failover {n}: console {console!r} lost or repeated output")
            finally:
                pair.close()
        print(f"failover {n + 1}/{count}: {times[-1] * 1000:.0f} ms", flush=True)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failovers", type=int, default=50)
    ap.add_argument("--busy", type=int, default=5, help="failovers while the guest computes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--linux", metavar="BZIMAGE", help="also kill FT primaries running this Linux kernel")
    ap.add_argument("--linux-kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ratio = cpu_ratio = float("nan")
    if args.repeat:
        (plain, plain_cpu), (ft, ft_cpu) = overhead(args.repeat)
        ratio, cpu_ratio = ft / plain, ft_cpu / plain_cpu
        print(f"guest run (wall): plain bt {plain:.2f} s, FT primary {ft:.2f} s (its backup on the same host): "
              f"overhead {ratio:.2f}x; primary CPU {ft_cpu:.2f} s vs {plain_cpu:.2f} s: {cpu_ratio:.2f}x", flush=True)
    times = failovers_busy(args.busy, args.seed) + (failovers(args.failovers, args.seed) if args.failovers else [])
    if args.linux:
        times += linux_failovers(args.linux, args.linux_kills, args.seed)
    times = times or [0.0]
    worst, median = max(times) * 1000, statistics.median(times) * 1000
    print(f"RESULT overhead={ratio:.2f} cpu_overhead={cpu_ratio:.2f} failover_max_ms={worst:.0f} failover_median_ms={median:.0f} "
          f"failovers={args.failovers + args.busy + (args.linux_kills if args.linux else 0)} goal_overhead={'met' if ratio <= 2 else 'missed' if args.repeat else 'unmeasured'} "
          f"goal_failover={'met' if worst < 1000 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
