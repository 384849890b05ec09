"""`pyvmm run --restore FILE` announces each NIC's MAC as a migration
destination does (five RARP rounds, QEMU's announce-self): the restored VM
sits on a new switch port or TAP, often because the saved one died, and
the network must learn where the MAC went before the guest's TCP peers'
retransmits reach it.  The counter guest of tests/api/counterguest.py is
saved with x-snapshot-file-save, killed, and restored on a stream backend
whose far end collects the frames."""

from __future__ import annotations

import time

from pyvmm.api.client import QmpClient
from tests.migration.test_live import FrameCatcher, vms  # noqa: F401  (fixture)

MAC = "52:54:00:19:00:05"


def _nic(path) -> list[str]:
    return ["-netdev", f"stream,id=n0,addr.type=unix,addr.path={path}",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]


def _rarps(catcher: FrameCatcher, want: int, timeout: float = 20.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for _, f in catcher.frames if f[12:14] == b"\x80\x35"]
        if len(found) >= want:
            time.sleep(0.3)         # no sixth round comes
            return [f for _, f in catcher.frames if f[12:14] == b"\x80\x35"]
        time.sleep(0.05)
    return [f for _, f in catcher.frames if f[12:14] == b"\x80\x35"]


def test_a_restored_vm_announces_its_mac(vms, tmp_path):   # noqa: F811
    first, second = FrameCatcher(str(tmp_path / "a.net")), FrameCatcher(str(tmp_path / "b.net"))
    qsock, snap = str(tmp_path / "q.sock"), str(tmp_path / "vm.snap")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off", *_nic(tmp_path / "a.net"))
    src.wait_counts(2)
    qmp = QmpClient(qsock)
    qmp.execute("stop")
    qmp.execute("x-snapshot-file-save", {"path": snap}, timeout=120)
    qmp.close()
    src.proc.kill()
    src.proc.wait(30)
    assert not [f for _, f in first.frames if f[12:14] == b"\x80\x35"]     # a booted VM does not announce
    restored = vms(False, "--restore", snap, *_nic(tmp_path / "b.net"))
    restored.wait_counts(1)
    rarp = _rarps(second, 5)
    assert len(rarp) == 5, second.frames
    want = bytes.fromhex(MAC.replace(":", ""))
    assert all(f[6:12] == want and f[22:28] == want for f in rarp)
