"""VM-to-VM TCP throughput over one `pyvmm switch`, for bench/switch.py:
two pyvmm guests under bt, two under hybrid and, as the reference, two
QEMU TCG guests (QEMU's own `-netdev stream` client), all with the same
Debian cloud kernel and pyvmm's default initramfs, all on the same
switch (the first pyvmm guest's NIC starts it). They boot together; then
each pair in turn, the others idle, moves a file from tmpfs with busybox
nc: the time runs from the command reaching the sender's console to the
receiver's `nc -l` seeing the end of the stream, on the host's clock
(the guests' clocks are not trusted). No traffic leaves the switch."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.guest_session import GuestSession  # noqa: E402
from tests.hostfacts import debian_cloud_kernels  # noqa: E402
from tests.net.test_switch_vms import QemuGuest, stop_switch  # noqa: E402

from pyvmm.guest.initramfs import ensure_default_initramfs  # noqa: E402

CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
SWITCH = "bench"
PORT = 5007


def pyvmm_guest(rundir: Path, engine: str, n: int) -> GuestSession:
    return GuestSession("run", "--engine", engine, "--no-reboot", "--mem", "192M",
                        "--append", f"{CMDLINE} pyvmm.bench={engine}{n}", "--net", f"switch={SWITCH}",
                        env={"PYVMM_SWITCH_DIR": str(rundir)})


def qemu_guest(kernel: str, initrd: Path, sock: Path, n: int) -> QemuGuest:
    return QemuGuest(["qemu-system-x86_64", "-accel", "tcg", "-m", "192", "-nographic", "-no-reboot",
                      "-nodefaults", "-serial", "stdio", "-kernel", kernel, "-initrd", str(initrd),
                      # no_timer_check: on a loaded host TCG's PIT can miss Linux's IO-APIC timer check
                      "-append", f"{CMDLINE} no_timer_check pyvmm.bench=qemu{n}",
                      "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                      "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:98:00:0{n}"])


def run(g, command: str, pattern: str, timeout: float = 600) -> re.Match:
    return g.expect(pattern, timeout=timeout, after=g.send(command + "\n"))


def transfer(sender, receiver, addr: str, kib: int) -> float:
    """MB/s (10^6 bytes) of one nc transfer of a kib-KiB file."""
    run(sender, f"dd if=/dev/urandom of=/tmp/tx bs=1024 count={kib} 2>/dev/null && echo MADE", r"\nMADE\r?\n")
    mark = receiver.send(f"nc -l -p {PORT} | wc -c\n")
    time.sleep(1.0)         # the listener is up
    start = time.monotonic()
    sender.send(f"nc {addr} {PORT} </tmp/tx\n")
    got = receiver.expect(r"\n\s*(\d+)\r?\n", timeout=1200, after=mark)
    seconds = time.monotonic() - start
    assert int(got.group(1)) == kib * 1024, f"{got.group(1)} bytes of {kib * 1024} arrived"
    return kib * 1024 / seconds / 1e6


def _time_pair(name: str, pair: list, k: int, kib: int, result: dict[str, object]) -> None:
    """Addresses, one ping, then one timed transfer from pair[0] to pair[1]
    into result["<name>_tcp_mbps"] ("failed" when any step fails)."""
    a, b = f"10.0.9.{2 * k + 1}", f"10.0.9.{2 * k + 2}"
    try:
        for g, addr in zip(pair, (a, b)):
            run(g, f"ip addr add {addr}/24 dev eth0 && ip link set eth0 up && echo NET-UP", r"\nNET-UP\r?\n")
        run(pair[0], f"ping -c 1 -W 60 {b} >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
        result[f"{name}_tcp_mbps"] = round(transfer(pair[0], pair[1], b, kib), 4)
    except AssertionError as e:      # one pair's failure leaves the other rows standing
        print(f"VM-to-VM TCP, {name}: failed: {str(e).splitlines()[0]}", flush=True)
        result[f"{name}_tcp_mbps"] = "failed"
        return
    print(f"VM-to-VM TCP, {name}: {result[f'{name}_tcp_mbps']} MB/s ({kib} KiB)", flush=True)


def _pairs_in_turn(kernel: str, initrd: Path, rundir: Path, kib: int,
                   engines: tuple[str, ...]) -> dict[str, object]:
    """One pair of guests at a time (for a host that cannot hold six): the
    switch is started first, then each pair boots, is timed and is killed
    before the next one boots."""
    import subprocess
    env = dict(os.environ, PYVMM_SWITCH_DIR=str(rundir))
    subprocess.Popen([sys.executable, "-m", "pyvmm", "switch", "run", SWITCH], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    sock = rundir / f"{SWITCH}.sock"
    end = time.monotonic() + 60
    while not sock.exists():
        if time.monotonic() > end:
            raise SystemExit("the switch did not start")
        time.sleep(0.2)
    result: dict[str, object] = {}
    for k, name in enumerate((*engines, "qemu_tcg")):
        pair = ([qemu_guest(kernel, initrd, sock, n) for n in (1, 2)] if name == "qemu_tcg"
                else [pyvmm_guest(rundir, name, n) for n in (1, 2)])
        try:
            try:
                for g in pair:
                    g.expect("PYVMM-INIT-READY", timeout=3600)
            except AssertionError as e:
                print(f"VM-to-VM TCP, {name}: did not boot: {str(e).splitlines()[0]}", flush=True)
                result[f"{name}_tcp_mbps"] = "failed"
                continue
            _time_pair(name, pair, k, kib, result)
        finally:
            for g in pair:
                g.kill()
    return result


def measure(kib: int = 8192, engines: tuple[str, ...] = ("bt", "hybrid"),
            one_pair: bool = False) -> dict[str, object]:
    """{"<engine>_tcp_mbps": MB/s or "failed"} for each pyvmm engine and
    "qemu_tcg"; with one_pair, the pairs boot one after another."""
    kernels = debian_cloud_kernels()
    if not kernels:
        raise SystemExit("no Debian cloud kernel (scripts/setup.sh installs linux-image-cloud-amd64)")
    kernel = kernels[-1]
    initrd = ensure_default_initramfs(release=os.path.basename(kernel).removeprefix("vmlinuz-"))
    rundir = Path(tempfile.mkdtemp(prefix="pvbv", dir="/tmp"))
    if one_pair:
        try:
            return _pairs_in_turn(kernel, initrd, rundir, kib, engines)
        finally:
            stop_switch(SWITCH, rundir)
    guests: dict[str, list] = {}
    try:
        for engine in engines:
            guests[engine] = [pyvmm_guest(rundir, engine, n) for n in (1, 2)]
        sock = rundir / f"{SWITCH}.sock"
        end = time.monotonic() + 120
        while not sock.exists():
            if time.monotonic() > end:
                raise SystemExit("the pyvmm guests did not start the switch")
            time.sleep(0.2)
        guests["qemu_tcg"] = [qemu_guest(kernel, initrd, sock, n) for n in (1, 2)]
        booted = {}
        for name, pair in guests.items():       # all booted before any pair is timed
            try:
                for g in pair:
                    g.expect("PYVMM-INIT-READY", timeout=3600)
                booted[name] = True
            except AssertionError as e:
                print(f"VM-to-VM TCP, {name}: did not boot: {str(e).splitlines()[0]}", flush=True)
        result: dict[str, object] = {}
        for k, (name, pair) in enumerate(guests.items()):
            if not booted.get(name):
                result[f"{name}_tcp_mbps"] = "failed"
                continue
            _time_pair(name, pair, k, kib, result)
        return result
    finally:
        for pair in guests.values():
            for g in pair:
                g.kill()
        stop_switch(SWITCH, rundir)
