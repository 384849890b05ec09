"""Snapshots against a real `pyvmm run`, driven by the `qemu.qmp` client
library: snapshot-save as a job with QEMU's JOB_STATUS_CHANGE sequence,
inspection commands (query-block, query-pci, xp), and `pyvmm run --loadvm
TAG` starting from the saved point."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

pytest.importorskip("qemu.qmp", reason="qemu.qmp comes with pyvmm's test extras (pip install -e .[test])")
from qemu.qmp import QMPClient  # noqa: E402

from pyvmm.storage.create import create_image  # noqa: E402
from tests.api.counterguest import COUNTER, counter_kernel, counts  # noqa: E402
from tests.api.qmpvm import REPO, QmpVm  # noqa: E402
from tests.storage.helpers import qemu_img  # noqa: E402

TIMEOUT = 30.0


class Output:
    """A child's stdout (the guest's COM1), gathered on a thread."""

    def __init__(self, stream):
        self.data = bytearray()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            self.data += chunk


async def _wait_counts(out: Output, n: int) -> None:
    for _ in range(int(TIMEOUT / 0.02)):
        if len(counts(out.data)) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the guest printed {bytes(out.data[-80:])!r}")


async def _job_statuses(client: QMPClient, job: str) -> list[str]:
    seen = []
    while not seen or seen[-1] != "concluded":
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["id"] == job:
            seen.append(event["data"]["status"])
        elif event["event"] in ("STOP", "RESUME") and seen:
            seen.append(event["event"])
    return seen


def test_snapshot_save_over_qmp_then_loadvm_at_start(tmp_path):
    disk = tmp_path / "disk.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    sock = str(tmp_path / "qmp.sock")
    drive = f"file={disk},id=disk0"
    vm = QmpVm("bt", [f"unix:{sock},server,wait=off"], "--drive", drive, kernel=counter_kernel())
    out = Output(vm.proc.stdout)
    saved: list[int] = []

    async def session() -> None:
        vm.wait_for_path(sock)
        client = QMPClient("snap")
        await client.connect(sock)
        await _wait_counts(out, 2)
        block = await client.execute("query-block")
        assert [b["device"] for b in block] == ["disk0"]
        assert block[0]["inserted"]["file"] == str(disk) and block[0]["inserted"]["drv"] == "qcow2"
        assert block[0]["inserted"]["ro"] is False
        pci = (await client.execute("query-pci"))[0]["devices"]
        assert [d["qdev_id"] for d in pci if d["slot"]] == ["disk0"]
        assert pci[1]["id"]["vendor"] == 0x1AF4

        await client.execute("stop")
        dump = await client.execute("human-monitor-command", {"command-line": f"xp /1xw {COUNTER:#x}"})
        saved.append(int(dump.split()[1], 16))
        await client.execute("snapshot-save", {"job-id": "j", "tag": "t1", "vmstate": "disk0", "devices": ["disk0"]})
        assert await _job_statuses(client, "j") == ["created", "running", "waiting", "pending", "concluded"]
        assert (await client.execute("query-jobs")) == [{"id": "j", "type": "snapshot-save", "status": "concluded",
                                                         "current-progress": 1, "total-progress": 1}]
        await client.execute("job-dismiss", {"id": "j"})
        await client.execute("cont")
        await _wait_counts(out, len(counts(out.data)) + 3)      # runs on past the snapshot
        await client.execute("quit")
        try:
            await client.disconnect()
        except EOFError:
            pass

    try:
        asyncio.run(session())
        assert vm.wait() == 0, vm.stderr()
    finally:
        vm.close()
    assert max(counts(out.data)) > saved[0] + 2
    assert qemu_img("check", disk).returncode == 0
    assert " t1 " in qemu_img("snapshot", "-l", disk).stdout

    # --loadvm: the first count printed is the one after the saved counter.
    run = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(counter_kernel()), "--engine", "bt",
           "--mem", "32M", "--no-reboot", "--no-bt-cache", "--drive", drive]
    proc = subprocess.Popen([*run, "--loadvm", "t1"], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        loaded = Output(proc.stdout)
        asyncio.run(_wait_counts(loaded, 2))
        assert counts(loaded.data)[:2] == [saved[0] + 1, saved[0] + 2]
    finally:
        proc.kill()
        proc.wait(10)
    bad = subprocess.run([*run, "--loadvm", "nosuch"], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert lines[0].endswith("--loadvm nosuch: Snapshot 'nosuch' does not exist in one or more devices")
