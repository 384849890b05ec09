#!/usr/bin/env python3
"""virtio-blk cost, each figure with its reference from the same run
(issue 16's benchmark):

(a) Device cost per request: µs of host time per 4 KiB virtio-blk read and
    write and per 1,514-byte virtio-net frame each way, the virtqueues
    driven from the host side (tests/devices/virtio_driver.py) with no
    guest: the time of the notify write alone (bus dispatch, transport,
    device model, disk I/O, used ring), the driver's own descriptor work
    excluded.  Goal (issue 16): <= 10 µs per request.
(b) In the guest: the stock Debian kernel with pyvmm's default initramfs
    reads /dev/vda (a 1 GiB sparse raw disk) with busybox dd, O_DIRECT so
    that every block is one request: 4 KiB blocks (IOPS; sequential
    offsets, busybox has no random I/O) and 1 MiB blocks (MB/s), under the
    chosen engines, and under QEMU TCG with the same kernel, initramfs,
    disk and dd command.  Time is the host's, from sending the command to
    seeing its end marker.  Goal (issue 16): 1 MiB MB/s >= 50 % of QEMU TCG's.

`--engines ""` runs QEMU's side of (b) only.

Ends with: RESULT key=value ... goal_device_cost=met|missed goal_device_vs_qemu=met|missed
goal_seq_mbs=met|missed|not-measured
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.guest_session import GuestSession

CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
DISK_SIZE = 1 << 30
BLOCK_READS = (("4k", 4096, 2000), ("1m", 1 << 20, 128))   # (name, bs, count)
DEVICE_GOAL_US = 10.0
SEQ_GOAL = 0.5


# --- (a) the device alone ----------------------------------------------------------------

def device_cost(requests: int) -> dict[str, float]:
    """µs per request of the notify write, for blk read/write and net tx/rx."""
    from pyvmm.devices.virtio.block import HEADER, VirtioBlock
    from pyvmm.devices.virtio.device import F_VERSION_1
    from pyvmm.storage import open_image
    from tests.devices.virtio_driver import Driver

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.raw")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        image = open_image(path, "raw")
        try:
            d = Driver(lambda mem: VirtioBlock(mem, image, serial="bench"), 0x018000, mem_mib=64)
            d.init(features=F_VERSION_1, queue_size=256)
            for name, kind in (("blk_read_us", 0), ("blk_write_us", 1)):
                samples = []
                for i in range(requests):
                    d.buf_cursor = 0x100000          # reuse the same guest buffers
                    payload = 4096 if kind == 0 else b"\x5a" * 4096
                    d.submit([(HEADER.pack(kind, 0, (i * 8) % (60 << 11)), False), (payload, kind == 0),
                              (1, True)], notify=False)
                    t0 = time.perf_counter()
                    d.kick()
                    samples.append(time.perf_counter() - t0)
                out[name] = statistics.median(samples) * 1e6
        finally:
            stop = getattr(d.device, "stop_io", None) if "d" in locals() else None
            if stop is not None:
                stop()
            image.close()
    out.update(_net_cost(requests))
    return out


def _net_cost(requests: int) -> dict[str, float]:
    from pyvmm.devices.virtio.device import F_VERSION_1
    from pyvmm.devices.virtio.net import NET_HDR_SIZE, RX_HEADER, VirtioNet
    from tests.devices.test_virtio_net import FakePort, NetDriver

    port = FakePort()
    d = NetDriver(port)
    d.init(features=F_VERSION_1)
    frame = bytes(range(256)) * 5 + bytes(234)            # 1,514 bytes
    buf = 0x200000
    tx, rx = [], []
    for i in range(requests):
        d.memory.write(buf, RX_HEADER[:NET_HDR_SIZE] + frame)
        d.chain(1, [(buf, NET_HDR_SIZE + len(frame), False)], kick=False)
        t0 = time.perf_counter()
        d.kick(1)
        tx.append(time.perf_counter() - t0)
        d.chain(0, [(buf + 0x1000, 2048, True)], kick=True)
        t0 = time.perf_counter()
        port.inject(frame)
        rx.append(time.perf_counter() - t0)
        port.sent.clear()
    assert isinstance(d.device, VirtioNet)
    return {"net_tx_us": statistics.median(tx) * 1e6, "net_rx_us": statistics.median(rx) * 1e6}


# --- (b) in the guest --------------------------------------------------------------------------

class QemuSession(GuestSession):
    """GuestSession's expect/send over a qemu-system-x86_64 process."""

    def __init__(self, argv: list[str]):   # not super().__init__: that one starts pyvmm
        import threading
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._out, self._err = bytearray(), bytearray()
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._threads:
            t.start()


def guest_reads(session: GuestSession, boot_timeout: float) -> dict[str, float]:
    """Seconds of each dd of BLOCK_READS, after the boot marker."""
    session.expect("PYVMM-INIT-READY", timeout=boot_timeout)
    times = {}
    for name, bs, count in BLOCK_READS:
        cmd = f"dd if=/dev/vda of=/dev/null bs={bs} count={count} iflag=direct 2>/dev/null; echo DD-$((6*7))-{name}\n"
        where = session.send(cmd)
        t0 = time.monotonic()
        session.expect(rf"DD-42-{name}", timeout=1800, after=where)
        times[name] = time.monotonic() - t0
    session.send("poweroff -f\n")
    try:
        session.wait(timeout=120)
    except subprocess.TimeoutExpired:
        session.kill()
    return times


def rates(times: dict[str, float]) -> dict[str, float]:
    (_, _, small_n), (_, big_bs, big_n) = BLOCK_READS
    return {"iops_4k": small_n / times["4k"], "mbs_1m": big_n * big_bs / (1 << 20) / times["1m"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="bt", help="comma-separated pyvmm engines for (b) (default bt)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per figure in (a)")
    ap.add_argument("--device-only", action="store_true", help="only (a)")
    ap.add_argument("--boot-timeout", type=float, default=3600)
    args = ap.parse_args()

    result: dict[str, object] = {}
    cost = device_cost(args.requests)
    for k, v in cost.items():
        print(f"(a) {k}: {v:.1f}", flush=True)
        result[k] = f"{v:.1f}"
    result["goal_device_cost"] = "met" if max(cost.values()) <= DEVICE_GOAL_US else "missed"
    if args.device_only:
        print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
        return 0

    from pyvmm.guest.initramfs import ensure_default_initramfs
    kernels = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not kernels:
        print("no Debian cloud kernel in /boot (linux-image-cloud-amd64)", file=sys.stderr)
        return 2
    kernel = str(kernels[-1])
    initrd = str(ensure_default_initramfs(release=kernel.partition("vmlinuz-")[2]))
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "vda.raw")
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        ours = {}
        for engine in filter(None, args.engines.split(",")):
            with GuestSession("run", "--engine", engine, "--no-reboot", "--mem", "256M", "--kernel", kernel,
                              "--initrd", initrd, "--append", CMDLINE,
                              "--drive", f"file={disk},format=raw,cache=none") as g:
                ours[engine] = rates(guest_reads(g, args.boot_timeout))
            for k, v in ours[engine].items():
                print(f"(b) pyvmm {engine} {k}: {v:.1f}", flush=True)
                result[f"{engine}_{k}"] = f"{v:.1f}"
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            print("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)", file=sys.stderr)
            result["goal_seq_mbs"] = "missed"
        else:
            with QemuSession([qemu, "-accel", "tcg", "-m", "256M", "-nographic", "-no-reboot", "-kernel", kernel,
                              "-initrd", initrd, "-append", CMDLINE,
                              "-drive", f"file={disk},format=raw,if=virtio,cache=none"]) as q:
                theirs = rates(guest_reads(q, args.boot_timeout))
            for k, v in theirs.items():
                print(f"(b) qemu-tcg {k}: {v:.1f}", flush=True)
                result[f"qemu_tcg_{k}"] = f"{v:.1f}"
            # the device's own cost against the time one 4 KiB request takes a QEMU TCG guest
            qemu_request_us = 1e6 / theirs["iops_4k"]
            result["qemu_tcg_request_us"] = f"{qemu_request_us:.1f}"
            result["goal_device_vs_qemu"] = ("met" if max(cost["blk_read_us"], cost["blk_write_us"]) < qemu_request_us
                                             else "missed")
            if ours:
                worst = min(r["mbs_1m"] for r in ours.values())
                result["seq_ratio"] = f"{worst / theirs['mbs_1m']:.2f}"
                result["goal_seq_mbs"] = "met" if worst >= SEQ_GOAL * theirs["mbs_1m"] else "missed"
            else:
                result["goal_seq_mbs"] = "not-measured"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
