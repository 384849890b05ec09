#!/usr/bin/env python3
"""Forwarding rate of `pyvmm switch` in frames/s, for 64- and 1,500-byte
frames, each with its reference from the same run:

- core: the forwarding path on one core (frames per CPU-second, so a
  busy host does not count against it), in one process (StreamDecoder
  cutting a received chunk into frames, Switch.receive learning and
  looking up, the egress client's framed output queue), no sockets.
- switch: end to end through a `pyvmm switch run` process: a generator
  process sends known unicast frames on one client socket, a receiver
  process counts what arrives on another; by the wall clock, and per
  CPU-second of the switch process.
- relay (the reference): the same two processes with a plain Python
  process in the middle that only copies bytes from one socket to the
  other (recv/sendall, no framing, no switching): what any one-core
  Python process can move over these sockets.

--profile prints cProfile's top functions of the core path. --baseline
REV measures the core path of git revision REV's forwarding modules
(framing, mactable, ratelimit, switch) in the same run, for a before/after.
- failover (tests/net/failover_probe.py, needs root): the gap a team of
  veth uplinks into a namespace shows when its active member's link goes
  down, and when it breaks silently under beacon probing (1 s, 3 misses),
  with the frames lost inside and outside that gap.
- VM-to-VM TCP throughput (bench/switch_vms.py; minutes, --no-vms skips
  it, --vms-only runs only it, --one-pair boots one pair at a time): pyvmm
  guests under bt and hybrid, against two QEMU TCG guests on the same
  switch with the same kernel and initramfs.

Goals (issue 18): >= 300,000 frames/s on one core (64-byte frames through
the switch process, per CPU-second of that process), failover < 100 ms on
link loss and <= 3 s by beacon, no frames lost outside the failover window.
Ends with: RESULT key=value ... goal_300k_fps=met|missed goal_failover_link=...
goal_failover_beacon=... goal_no_loss_outside_failover=..."""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # its helper switch_vms

from pyvmm.net.framing import LENGTH  # noqa: E402

GOAL_FPS = 300_000
GOAL_FAILOVER_LINK_MS = 100
GOAL_FAILOVER_BEACON_MS = 3000
SRC, DST = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
CHUNK = 1 << 18            # what one recv hands the switch at most (switchd.RECV_SIZE)


def frame(size: int, src: bytes = SRC, dst: bytes = DST) -> bytes:
    return dst + src + b"\x88\xb5" + bytes(size - 14)


def framed_chunk(size: int) -> bytes:
    one = LENGTH.pack(size) + frame(size)
    return one * max(1, CHUNK // len(one))


# -- core: one process, no sockets ---------------------------------------------
def load_baseline(rev: str):
    """The forwarding modules of git revision rev, as a package of their own."""
    import importlib
    root = Path(tempfile.mkdtemp(prefix="pvbb"))
    pkg = root / "baseline_net"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    repo = Path(__file__).resolve().parent.parent
    for name in ("framing", "mactable", "ratelimit", "switch"):
        text = subprocess.run(["git", "show", f"{rev}:pyvmm/net/{name}.py"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("baseline_net.framing"), importlib.import_module("baseline_net.mactable"), \
        importlib.import_module("baseline_net.switch")


def core_rate(size: int, seconds: float, profile: bool = False, modules=None) -> float:
    if modules is not None:
        framing, mactable, switch = modules
        Switch, SwitchPort, MacTable, StreamDecoder = (switch.Switch, switch.SwitchPort,
                                                       mactable.MacTable, framing.StreamDecoder)
    else:
        from pyvmm.net.framing import StreamDecoder
        from pyvmm.net.mactable import MacTable
        from pyvmm.net.switch import Switch, SwitchPort
    sw = Switch(MacTable())
    out = bytearray()

    def sink(f: bytes) -> bool:         # what StreamClient.send does with a frame
        out.extend(LENGTH.pack(len(f)))
        out.extend(f)
        return True

    a = sw.add_port(SwitchPort("a", lambda f: True))
    b = sw.add_port(SwitchPort("b", sink))
    sw.receive(b, frame(size, DST, SRC))            # b's address is known: unicast from a to b
    decoder = StreamDecoder()
    chunk = framed_chunk(size)
    receive = getattr(sw, "receive_many", None)
    prof = cProfile.Profile() if profile else None
    frames = 0
    # CPU time, not wall time: the rate of one core however busy the host is
    start = time.process_time()
    end = start + seconds
    if prof:
        prof.enable()
    while time.process_time() < end:
        batch = decoder.feed(chunk)
        if receive is not None:
            receive(a, batch)
        else:
            for f in batch:
                sw.receive(a, f)
        frames += len(batch)
        out.clear()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    rate = frames / (time.process_time() - start)
    assert b.counters["tx_frames"] == frames, "frames were not forwarded"
    return rate


# -- end to end: generator and receiver processes ------------------------------
def _generate(path: str, size: int, seconds: float, ready) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    chunk = framed_chunk(size)
    ready.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(chunk)
    s.close()


def _receive(path: str, size: int, hello: bool, ready, result) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if hello:          # teach the switch this client's address
        s.sendall(LENGTH.pack(size) + frame(size, DST, SRC))
    time.sleep(0.3)
    ready.set()
    s.settimeout(1.0)
    got = 0
    first = last = None
    while True:
        try:
            n = len(s.recv(1 << 20))
        except TimeoutError:
            break
        if not n:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        got += n
    result.put((got // (size + 4), (last - first) if first and last else 0.0))


def _measure(gen_path: str, recv_path: str, size: int, seconds: float, hello: bool) -> float:
    ctx = mp.get_context("fork")
    ready, result = ctx.Event(), ctx.Queue()
    rx = ctx.Process(target=_receive, args=(recv_path, size, hello, ready, result))
    rx.start()
    tx = ctx.Process(target=_generate, args=(gen_path, size, seconds, ready))
    tx.start()
    frames, span = result.get(timeout=seconds + 60)
    tx.join()
    rx.join()
    _measure.frames = frames
    return frames / span if span else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def archive_baseline(rev: str) -> Path:
    """Git revision rev's pyvmm package, unpacked in a temporary directory
    (the working tree is not touched), to run its `pyvmm switch`."""
    root = Path(tempfile.mkdtemp(prefix="pvba"))
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "archive", rev, "pyvmm"], cwd=repo, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    return root


def switch_rate(size: int, seconds: float, pythonpath: Path | None = None) -> tuple[float, float]:
    """(frames/s by the wall clock, frames per CPU second of the switch process)."""
    rundir = Path(tempfile.mkdtemp(prefix="pvbs", dir="/tmp"))
    env = dict(os.environ, PYVMM_SWITCH_DIR=str(rundir))
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "switch", "run", "bench"], env=env,
                            stderr=subprocess.DEVNULL, cwd=pythonpath or Path(__file__).resolve().parent.parent)
    try:
        sock = rundir / "bench.sock"
        while not (rundir / "bench.ctl").exists():
            time.sleep(0.02)
        before = cpu_seconds(proc.pid)
        wall = _measure(str(sock), str(sock), size, seconds, hello=True)
        used = cpu_seconds(proc.pid) - before
        return wall, (_measure.frames / used if used else 0.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        for p in rundir.iterdir():
            p.unlink()
        rundir.rmdir()


def _relay(listen_in: socket.socket, listen_out: socket.socket) -> None:
    a, _ = listen_in.accept()
    b, _ = listen_out.accept()
    while data := a.recv(CHUNK):
        b.sendall(data)
    b.close()


def relay_rate(size: int, seconds: float) -> float:
    rundir = Path(tempfile.mkdtemp(prefix="pvbr", dir="/tmp"))
    paths = [str(rundir / "in.sock"), str(rundir / "out.sock")]
    listeners = []
    for p in paths:
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        s.listen(1)
        listeners.append(s)
    relay = mp.get_context("fork").Process(target=_relay, args=tuple(listeners))
    relay.start()
    try:
        # the receiver connects first so the relay accepts in order
        return _measure(paths[0], paths[1], size, seconds, hello=False)
    finally:
        relay.join(10)
        for s in listeners:
            s.close()
        for p in paths:
            os.unlink(p)
        rundir.rmdir()


def failover_rows() -> dict[str, object]:
    if os.geteuid() != 0:
        print("failover: skipped (network namespaces need root)", flush=True)
        return {}
    from tests.net import failover_probe
    rows: dict[str, object] = {}
    for how in ("link", "beacon"):
        r = failover_probe.measure(how)
        rows.update({f"failover_{how}_ms": r["gap_ms"], f"failover_{how}_lost": r["lost"],
                     f"failover_{how}_lost_outside": r["lost_outside"]})
        print(f"failover on {'link loss' if how == 'link' else 'a silent break (beacons 1 s x 3)'}: "
              f"gap {r['gap_ms']} ms, {r['lost']} of {r['sent']} frames (1 per ms) lost, "
              f"{r['lost_outside']} outside the gap, {r['duplicates']} duplicated", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--profile", action="store_true", help="cProfile the core path (64-byte frames)")
    ap.add_argument("--baseline", metavar="REV", help="also measure git revision REV's core path (before/after)")
    ap.add_argument("--no-vms", action="store_true", help="skip the VM-to-VM TCP rows (they boot six guests)")
    ap.add_argument("--vm-kib", type=int, default=8192, help="KiB each VM-to-VM transfer moves")
    ap.add_argument("--vms-only", action="store_true", help="only the VM-to-VM TCP rows")
    ap.add_argument("--one-pair", action="store_true",
                    help="boot the VM pairs one after another (bt, hybrid, QEMU), not all six at once")
    args = ap.parse_args()
    if args.vms_only:
        import switch_vms
        result = switch_vms.measure(args.vm_kib, one_pair=args.one_pair)
        print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
        return 0
    if args.profile:
        core_rate(64, args.seconds, profile=True)
    result: dict[str, object] = {}
    if args.baseline:
        old = load_baseline(args.baseline)
        old_tree = archive_baseline(args.baseline)
        for size in (64, 1500):
            before = round(core_rate(size, args.seconds, modules=old))
            after = round(core_rate(size, args.seconds))
            result[f"baseline_core_{size}_fps"] = before
            print(f"{size:>5}-byte frames, core path: {args.baseline} {before:>10,} fps   now {after:>10,} fps "
                  f"({after / before:.2f}x)", flush=True)
            before = round(switch_rate(size, args.seconds, old_tree)[1])
            after = round(switch_rate(size, args.seconds)[1])
            result[f"baseline_switch_{size}_fps_per_cpu_s"] = before
            print(f"{size:>5}-byte frames, switch process per CPU-second: {args.baseline} {before:>10,} fps   "
                  f"now {after:>10,} fps ({after / before:.2f}x)", flush=True)
        shutil.rmtree(old_tree)
        shutil.rmtree(Path(old[0].__file__).parent.parent)
    for size in (64, 1500):
        result[f"core_{size}_fps"] = round(core_rate(size, args.seconds))
        wall, per_cpu = switch_rate(size, args.seconds)
        result[f"switch_{size}_fps"] = round(wall)
        result[f"switch_{size}_fps_per_cpu_s"] = round(per_cpu)
        result[f"relay_{size}_fps"] = round(relay_rate(size, args.seconds))
        print(f"{size:>5}-byte frames: core {result[f'core_{size}_fps']:>10,} fps   "
              f"switch {result[f'switch_{size}_fps']:>10,} fps ({result[f'switch_{size}_fps_per_cpu_s']:,} "
              f"per switch CPU-second)   "
              f"relay (reference) {result[f'relay_{size}_fps']:>10,} fps", flush=True)
    result.update(failover_rows())
    if not args.no_vms:
        import switch_vms
        result.update(switch_vms.measure(args.vm_kib, one_pair=args.one_pair))
    result["goal_300k_fps"] = "met" if result["switch_64_fps_per_cpu_s"] >= GOAL_FPS else "missed"
    if "failover_link_ms" in result:
        result["goal_failover_link"] = "met" if result["failover_link_ms"] < GOAL_FAILOVER_LINK_MS else "missed"
        result["goal_failover_beacon"] = ("met" if result["failover_beacon_ms"] <= GOAL_FAILOVER_BEACON_MS
                                          else "missed")
        result["goal_no_loss_outside_failover"] = ("met" if result["failover_link_lost_outside"] == 0
                                                   and result["failover_beacon_lost_outside"] == 0 else "missed")
    else:
        result.update(goal_failover_link="untested", goal_failover_beacon="untested",
                      goal_no_loss_outside_failover="untested")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
