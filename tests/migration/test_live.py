"""Live migration between two `pyvmm run` processes: the counter guest
(tests/api/counterguest.py) keeps counting on the destination from where
the source stopped, over unix: and tcp:, idle and dirtying memory; a
cancelled migration and a corrupt stream leave the source running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.api.client import QmpClient
from pyvmm.migration import stream

from tests.api.counterguest import SOURCE, counts
from tests.api.qmpvm import REPO, free_tcp_port
from tests.asm import multiboot_kernel

LOG: list[str] = []
DIRTY_BASE, DIRTY_PAGES = 0x400000, 512     # 2 MiB the dirtying guest rewrites every count

DIRTY_SOURCE = SOURCE.replace("    jmp 1b\n", f"""
    mov ${DIRTY_BASE:#x}, %edi
    mov ${DIRTY_PAGES}, %ecx
5:  mov %ebx, (%edi)
    add $4096, %edi
    loop 5b
    jmp 1b
""")

_kernels: dict[str, object] = {}


def kernel(dirty: bool):
    key = "dirty" if dirty else "idle"
    if key not in _kernels:
        _kernels[key] = multiboot_kernel(DIRTY_SOURCE if dirty else SOURCE)
    return _kernels[key]


class Vm:
    """A `pyvmm run` child whose console output is collected on a thread."""

    def __init__(self, dirty: bool, *extra: str, engine: str = "bt"):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvmm", *LOG, "run", "--kernel", str(kernel(dirty)), "--engine", engine,
             "--mem", "32M", "--no-bt-cache", "--no-reboot", *extra],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(f, buf: bytearray) -> None:
        while chunk := f.read1(65536):
            buf.extend(chunk)

    def wait_counts(self, n: int, timeout: float = 60.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(counts(self.out)) < n:
            assert self.proc.poll() is None or len(counts(self.out)) >= n, f"exited {self.proc.returncode}: {bytes(self.err)!r}"
            assert time.monotonic() < deadline, f"{bytes(self.out[-80:])!r} {bytes(self.err)!r}"
            time.sleep(0.02)
        return counts(self.out)

    def wait_stderr(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.err:
            assert self.proc.poll() is None, bytes(self.err)
            assert time.monotonic() < deadline, bytes(self.err)
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def vms():
    """Vm(...) children, killed at the end if still there."""
    made: list[Vm] = []
    yield lambda *a, **k: made.append(Vm(*a, **k)) or made[-1]
    for vm in made:
        vm.close()


def _uri(kind: str, tmp_path) -> str:
    return f"unix:{tmp_path}/mig.sock" if kind == "unix" else f"tcp:127.0.0.1:{free_tcp_port()}"


def _refuses_an_oversized_record(dst: Vm, path: str) -> None:
    """Once `dst` listens at unix `path`, send it a stream whose first
    record claims 1 GiB: it must answer ERR and exit 1."""
    dst.wait_stderr(b"waiting for an incoming migration")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(stream.header() + stream.RECORD.pack(stream.CONFIG, 1 << 30, 0))
        assert s.makefile("rb").readline().startswith(b"ERR ")
    assert dst.proc.wait(30) == 1

def _wait_done(qmp: QmpClient, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def migrate_once(vms, tmp_path, kind: str, dirty: bool, dest_engine: str = "bt", params: dict | None = None) -> dict:
    qsock = str(tmp_path / "src.qmp")
    src = vms(dirty, "--qmp", f"unix:{qsock},server,wait=off")
    src.wait_counts(3)
    uri = _uri(kind, tmp_path)
    dst = vms(dirty, "--incoming", uri, engine=dest_engine)
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    if params:
        qmp.execute("migrate-set-parameters", params)
    qmp.execute("migrate", {"uri": uri})
    info = _wait_done(qmp)
    assert info["status"] == "completed", info
    assert qmp.execute("query-status")["status"] == "postmigrate"
    with pytest.raises(Exception, match="postmigrate"):
        qmp.execute("cont")
    statuses = [e["data"]["status"] for e in qmp.events if e["event"] == "MIGRATION"]
    assert statuses[0] == "setup" and statuses[-1] == "completed" and "active" in statuses
    last_src = counts(src.out)[-1]
    time.sleep(0.3)
    assert counts(src.out)[-1] == last_src, "the source must stay paused"
    dst.wait_counts(5)
    # The destination prints on from the very character the source stopped
    # at: the two outputs together count 1, 2, 3... with nothing lost or repeated.
    joined = counts(bytes(src.out) + bytes(dst.out))
    assert joined == list(range(1, len(joined) + 1)), (last_src, joined[last_src - 3:last_src + 3])
    assert len(joined) > last_src + 3
    qmp.execute("quit")
    assert src.proc.wait(30) == 0
    qmp.close()
    return info


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_idle_counter_migrates(vms, tmp_path, kind):
    info = migrate_once(vms, tmp_path, kind, dirty=False)
    assert info["downtime"] < 2000


def test_dirtying_guest_needs_several_passes(vms, tmp_path):
    # 2 MiB rewritten all the time cannot go in one 5 ms stop: pre-copy repeats passes
    info = migrate_once(vms, tmp_path, "unix", dirty=True, params={"downtime-limit": 5})
    assert info["dirty-sync-count"] > 1, info
    assert info["ram"]["transferred"] > 2 * DIRTY_PAGES * 4096, info


def test_cancel_leaves_the_source_running(vms, tmp_path):
    qsock = str(tmp_path / "src.qmp")
    src = vms(True, "--qmp", f"unix:{qsock},server,wait=off")
    src.wait_counts(2)
    uri = _uri("unix", tmp_path)
    dst = vms(True, "--incoming", uri)
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    qmp.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})   # slow enough to cancel mid-way
    qmp.execute("migrate", {"uri": uri})
    time.sleep(0.5)
    assert qmp.execute("query-migrate")["status"] == "active"
    qmp.execute("migrate_cancel")
    info = _wait_done(qmp)
    assert info["status"] == "cancelled"
    assert qmp.execute("query-status")["status"] == "running"
    n = len(counts(src.out))
    src.wait_counts(n + 3)
    assert dst.proc.wait(30) == 1
    assert b"Traceback" not in dst.err and dst.err.strip().count(b"\n") <= 1, bytes(dst.err)
    qmp.close()


def test_corrupt_stream_is_one_line_and_source_continues(vms, tmp_path):
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off")
    src.wait_counts(2)
    # a destination with other RAM refuses the stream at its config record
    uri = _uri("tcp", tmp_path)
    dst = Vm(False, "--incoming", uri, "--mem", "48M")
    try:
        dst.wait_stderr(b"waiting for an incoming migration")
        qmp = QmpClient(qsock)
        qmp.execute("migrate", {"uri": uri})
        info = _wait_done(qmp)
        assert info["status"] == "failed" and "RAM" in info["error-desc"], info
        assert dst.proc.wait(30) == 1
        err = bytes(dst.err).strip().splitlines()
        assert len(err) == 2 and err[1].startswith(b"pyvmm: error: ") and b"RAM" in err[1], err
        n = len(counts(src.out))
        src.wait_counts(n + 3)
        qmp.close()
    finally:
        dst.close()
    # garbage straight into a destination
    path = str(tmp_path / "junk.sock")
    junk = vms(False, "--incoming", f"unix:{path}")
    _refuses_an_oversized_record(junk, path)
    assert b"over its limit" in junk.err and b"Traceback" not in junk.err


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="hybrid needs /dev/kvm")
@pytest.mark.parametrize("engines", [("bt", "hybrid"), ("hybrid", "bt"), ("bt", "hw"), ("hw", "bt")])
def test_across_engines(vms, tmp_path, engines):
    src_engine, dst_engine = engines
    qsock = str(tmp_path / "src.qmp")
    src = vms(True, "--qmp", f"unix:{qsock},server,wait=off", engine=src_engine)
    src.wait_counts(3)
    uri = _uri("unix", tmp_path)
    dst = vms(True, "--incoming", uri, engine=dst_engine)
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    qmp.execute("migrate", {"uri": uri})
    info = _wait_done(qmp)
    assert info["status"] == "completed", info
    last_src = counts(src.out)[-1]
    dst.wait_counts(5)
    joined = counts(bytes(src.out) + bytes(dst.out))
    assert joined == list(range(1, len(joined) + 1)) and len(joined) > last_src + 3
    qmp.close()


def test_cli_drives_a_migration_and_quits_the_source(vms, tmp_path):
    import json
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off")
    src.wait_counts(3)
    uri = _uri("tcp", tmp_path)
    dst = vms(False, "--incoming", uri)
    dst.wait_stderr(b"waiting for an incoming migration")
    bad = subprocess.run([sys.executable, "-m", "pyvmm", "migrate", qsock, "exec:cat"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "bad migration URI" in bad.stderr
    run = subprocess.run([sys.executable, "-m", "pyvmm", "migrate", qsock, uri, "--json", "--quit",
                          "--downtime-limit", "100"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.splitlines()[0])
    assert info["status"] == "completed" and "migrated: total" in run.stdout
    assert src.proc.wait(30) == 0
    dst.wait_counts(3)
    joined = counts(bytes(src.out) + bytes(dst.out))
    assert joined == list(range(1, len(joined) + 1))


class FrameCatcher:
    """The far end of a `-netdev stream` NIC: collects the frames it sends."""

    def __init__(self, path: str):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.frames: list[tuple[float, bytes]] = []
        threading.Thread(target=self._main, daemon=True).start()

    def _main(self) -> None:
        from pyvmm.net.framing import StreamDecoder
        conn, _ = self.listener.accept()
        decoder = StreamDecoder()
        while chunk := conn.recv(65536):
            for frame in decoder.feed(chunk):
                self.frames.append((time.monotonic(), frame))


def test_destination_announces_the_mac(vms, tmp_path):
    """The MAC travels with the NIC's state; the destination sends five
    RARP rounds with growing gaps on its backend (QEMU's announce-self)."""
    mac = "52:54:00:aa:bb:cc"     # not the default a NIC without mac= gets
    nic = lambda path: ["-netdev", f"stream,id=n0,addr.type=unix,addr.path={path}",
                        "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    src_net, dst_net = FrameCatcher(str(tmp_path / "src.net")), FrameCatcher(str(tmp_path / "dst.net"))
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off", *nic(tmp_path / "src.net"))
    src.wait_counts(2)
    uri = _uri("unix", tmp_path)
    # the destination is started with another MAC: the source's comes with the NIC's state
    dst = vms(False, "--incoming", uri, *nic(tmp_path / "dst.net")[:3], "virtio-net-pci,netdev=n0")
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    qmp.execute("migrate", {"uri": uri})
    assert _wait_done(qmp)["status"] == "completed"
    deadline = time.monotonic() + 10
    while len(dst_net.frames) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    rarp = [(t, f) for t, f in dst_net.frames if f[12:14] == b"\x80\x35"]
    assert len(rarp) == 5, dst_net.frames
    want = bytes.fromhex(mac.replace(":", ""))
    assert all(f[6:12] == want and f[22:28] == want for _, f in rarp)
    gaps = [b[0] - a[0] for a, b in zip(rarp, rarp[1:])]
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert not [f for _, f in src_net.frames if f[12:14] == b"\x80\x35"]
    qmp.close()


def test_shared_disk_goes_with_the_guest(vms, tmp_path):
    """Both sides open the same image; the source flushes before the
    destination runs, and incremental block migration is refused."""
    disk = tmp_path / "shared.img"
    disk.write_bytes(bytes(1 << 20))
    drive = ["--drive", f"file={disk},format=raw,id=disk0"]
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off", *drive)
    src.wait_counts(2)
    uri = _uri("unix", tmp_path)
    dst = vms(False, "--incoming", uri, *drive)
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    with pytest.raises(Exception, match="block migration \\(inc\\) is not supported"):
        qmp.execute("migrate", {"uri": uri, "inc": True})
    qmp.execute("migrate", {"uri": uri})
    assert _wait_done(qmp)["status"] == "completed"
    dst.wait_counts(3)
    joined = counts(bytes(src.out) + bytes(dst.out))
    assert joined == list(range(1, len(joined) + 1))
    qmp.close()


def test_block_migration_copies_the_disk(vms, tmp_path):
    """migrate with "blk": the destination's own, empty image ends up with
    the source's contents (QEMU's block migration)."""
    data = os.urandom(256 << 10)
    src_disk, dst_disk = tmp_path / "src.img", tmp_path / "dst.img"
    src_disk.write_bytes(bytes(1 << 20) + data + bytes(3 << 20))
    dst_disk.write_bytes(bytes(src_disk.stat().st_size))
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off", "--drive", f"file={src_disk},format=raw,id=disk0")
    src.wait_counts(2)
    uri = _uri("unix", tmp_path)
    dst = vms(False, "--incoming", uri, "--drive", f"file={dst_disk},format=raw,id=disk0")
    dst.wait_stderr(b"waiting for an incoming migration")
    qmp = QmpClient(qsock)
    qmp.execute("migrate", {"uri": uri, "blk": True})
    assert _wait_done(qmp)["status"] == "completed"
    dst.wait_counts(3)
    qmp.execute("quit")
    qmp.close()
    dst.close()
    assert dst_disk.read_bytes() == src_disk.read_bytes()
