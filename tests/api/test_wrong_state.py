"""Control-plane commands given in a state that does not allow them (issue
19, bad input): one-line QMP errors and nothing changed. A machine not yet
started refuses what needs a running or paused one; while a live migration
runs, what would change the device set or load another state is refused
as QEMU refuses it (the destination would get a state its devices do not
match); bad argument shapes are errors, not coerced."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pyvmm.api.catalog import execute
from pyvmm.api.commands import CommandError, Target
from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import DriveConfig, VmConfig
from pyvmm.storage.create import create_image

from tests.api.counterguest import SOURCE, CounterVm
from tests.rawguest import build_guest, raw_boot


def test_a_machine_not_yet_started_refuses_what_needs_one_running(tmp_path):
    m = build_machine(VmConfig(mem_mib=16, engine="bt", no_reboot=True), lambda b: None,
                      boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))
    t = Target(name="t", machine=m)
    snap = str(tmp_path / "x.snap")
    try:
        for name, args in [("x-snapshot-file-save", {"path": snap}), ("x-snapshot-file-load", {"path": snap}),
                           ("snapshot-save", {"job-id": "j", "tag": "t", "vmstate": "d", "devices": []}),
                           ("device_add", {"driver": "virtio-blk-pci", "id": "a", "drive": "n"}),
                           ("device_del", {"id": "a"}), ("migrate", {"uri": f"unix:{tmp_path}/m"}),
                           ("stop", {}), ("cont", {})]:
            with pytest.raises(CommandError) as err:
                execute(t, name, args)
            assert str(err.value) == f"{name}: not while configured" and err.value.error_class == "GenericError"
        assert not (tmp_path / "x.snap").exists() and t.jobs == {}
    finally:
        destroy_machine(m)


def test_bad_argument_shapes_are_refused_not_coerced(tmp_path):
    m = build_machine(VmConfig(mem_mib=16, engine="bt", no_reboot=True), lambda b: None,
                      boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))
    t = Target(name="t", machine=m)
    try:
        cases = [("x-snapshot-file-save", {"path": 5}, "Invalid parameter type for 'path', expected: string"),
                 ("x-snapshot-file-load", {}, "Parameter 'path' is missing"),
                 ("device_del", {"id": "a", "force": True}, "Parameter 'force' is unexpected"),
                 ("netdev_add", {"type": "stream", "id": "n0", "addr": {"type": "unix", "path": 3}},
                  "netdev type 'stream' needs"),
                 ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": 7}, "Parameter 'file' must be")]
        for name, args, message in cases:
            with pytest.raises(CommandError) as err:
                execute(t, name, args)
            assert str(err.value).startswith(message) and "\n" not in str(err.value), (name, str(err.value))
        assert getattr(t, "net_backends", {}) == {} and getattr(t, "block_nodes", {}) == {}
    finally:
        destroy_machine(m)


class StalledDestination:
    """Accepts one migration connection and never reads it: the source's
    sends block and its migration stays active until cancelled."""

    def __init__(self, path: str):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=lambda: self.conns.append(self.listener.accept()[0]), daemon=True)
        self.thread.start()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.listener.close()


def test_a_running_migration_refuses_hotplug_and_loads(tmp_path):
    disk, extra = tmp_path / "disk.qcow2", tmp_path / "extra.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    create_image(str(extra), "qcow2", 1 << 20)
    vm = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    dest = StalledDestination(str(tmp_path / "mig.sock"))
    snap = str(tmp_path / "before.snap")
    try:
        vm.wait_counts(1)
        vm.machine.memory.fill(0x1000000, 8 << 20, 0x5A)      # more than a socket buffer holds
        vm.qmp("x-snapshot-file-save", path=snap)
        vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
        vm.qmp("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
        deadline = time.monotonic() + 10
        while vm.qmp("query-migrate").get("status") != "active":
            assert time.monotonic() < deadline, vm.qmp("query-migrate")
            time.sleep(0.01)
        refused = [("device_add", {"driver": "virtio-blk-pci", "drive": "n1", "id": "hd1"}),
                   ("device_del", {"id": "hd1"}), ("x-snapshot-file-load", {"path": snap}),
                   ("snapshot-load", {"job-id": "j", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]})]
        for name, args in refused:
            with pytest.raises(CommandError) as err:
                vm.qmp(name, **args)
            assert str(err.value) == f"{name} not allowed while migrating"
        assert "not allowed while migrating" in vm.hmp("loadvm t")
        assert vm.qmp("query-migrate")["status"] == "active" and vm.qmp("query-jobs") == []
        assert all(d["qdev_id"] != "hd1" for d in vm.qmp("query-pci")[0]["devices"])

        vm.qmp("migrate_cancel")
        deadline = time.monotonic() + 10
        while vm.qmp("query-migrate")["status"] != "cancelled":
            assert time.monotonic() < deadline, vm.qmp("query-migrate")
            time.sleep(0.01)
        assert vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1") == {}   # allowed again
        assert vm.qmp("query-status")["status"] == "running"
        vm.wait_counts(2, after=len(vm.output))
    finally:
        vm.close()
        dest.close()
