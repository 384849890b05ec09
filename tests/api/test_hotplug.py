"""blockdev-add/-del and virtio-blk hotplug (api/hotplug.py) on the counter
guest in-process: the new function answers in PCI config space, its drive
is listed and snapshotted, device_del takes it off with DEVICE_DELETED,
and a node in use cannot be deleted."""

from __future__ import annotations

import pytest

from pyvmm.api.commands import CommandError
from pyvmm.config import DriveConfig
from pyvmm.storage.create import create_image

from tests.storage.helpers import qemu_img

from .counterguest import CounterVm


def _vendor(vm: CounterVm, slot: int) -> int:
    bus = vm.machine.io_bus
    bus.write(0xCF8, 4, 0x80000000 | slot << 11)
    return bus.read(0xCFC, 4) & 0xFFFF


def test_hotplug_virtio_blk(tmp_path):
    disk, extra = tmp_path / "disk.qcow2", tmp_path / "extra.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    create_image(str(extra), "qcow2", 2 << 20)
    vm = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    try:
        vm.wait_counts(1)
        assert vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"},
                      file={"driver": "file", "filename": str(extra)}) == {}
        with pytest.raises(CommandError, match="Duplicate nodes"):
            vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
        with pytest.raises(CommandError, match="can't find value 'nope'"):
            vm.qmp("device_add", driver="virtio-blk-pci", drive="nope", id="hd1")
        with pytest.raises(CommandError, match="not a valid device model"):
            vm.qmp("device_add", driver="e1000", id="x")
        assert vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1") == {}
        with pytest.raises(CommandError, match="already in use by 'hd1'"):
            vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd2")
        with pytest.raises(CommandError, match="Duplicate device ID"):
            vm.qmp("device_add", driver="virtio-blk-pci", drive="disk0x", id="disk0")
        slot = next(d["slot"] for d in vm.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "hd1")
        assert _vendor(vm, slot) == 0x1AF4
        assert [b["device"] for b in vm.qmp("query-block")] == ["disk0", "hd1"]
        with pytest.raises(CommandError, match="busy"):
            vm.qmp("blockdev-del", **{"node-name": "n1"})
        vm.qmp("snapshot-save", **{"job-id": "s", "tag": "t", "vmstate": "disk0", "devices": ["disk0", "hd1"]})
        assert "error" not in vm.wait_job("s")

        assert vm.qmp("device_del", id="hd1") == {}
        assert vm.events[-1] == ("DEVICE_DELETED", {"device": "hd1", "path": "/machine/peripheral/hd1"})
        assert _vendor(vm, slot) == 0xFFFF
        assert all(d["qdev_id"] != "hd1" for d in vm.qmp("query-pci")[0]["devices"])
        with pytest.raises(CommandError, match="was not hotplugged"):
            vm.qmp("device_del", id="disk0")
        assert vm.qmp("blockdev-del", **{"node-name": "n1"}) == {}
        assert vm.qmp("query-status")["status"] == "running"
    finally:
        vm.close()
    assert qemu_img("check", extra).returncode == 0
    assert " t " in qemu_img("snapshot", "-l", extra).stdout


def _class_code(vm: CounterVm, slot: int) -> int:
    bus = vm.machine.io_bus
    bus.write(0xCF8, 4, 0x80000000 | slot << 11 | 8)
    return bus.read(0xCFC, 4) >> 8


def test_hotplug_virtio_net_on_a_stream_backend(tmp_path):
    """netdev_add (QEMU's stream shape) + device_add virtio-net-pci: an
    Ethernet function in PCI config space on a connected backend;
    device_del unplugs it and closes the backend (the peer sees EOF);
    netdev_del then frees the name."""
    import socket
    disk = tmp_path / "disk.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "net.sock"))
    server.listen(1)
    server.settimeout(10)
    vm = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    try:
        vm.wait_counts(1)
        with pytest.raises(CommandError, match="needs"):
            vm.qmp("netdev_add", type="tap", id="n0")
        with pytest.raises(CommandError, match="can't find value 'n0'"):
            vm.qmp("device_add", driver="virtio-net-pci", netdev="n0", id="nic0")
        assert vm.qmp("netdev_add", type="stream", id="n0",
                      addr={"type": "unix", "path": str(tmp_path / "net.sock")}) == {}
        with pytest.raises(CommandError, match="Duplicate ID 'n0'"):
            vm.qmp("netdev_add", type="switch", id="n0", switch="sw")
        assert vm.qmp("device_add", driver="virtio-net-pci", netdev="n0", id="nic0",
                      mac="52:54:00:aa:bb:cc") == {}
        peer, _ = server.accept()
        with pytest.raises(CommandError, match="already in use by 'nic0'"):
            vm.qmp("device_add", driver="virtio-net-pci", netdev="n0", id="nic1")
        with pytest.raises(CommandError, match="in use by device 'nic0'"):
            vm.qmp("netdev_del", id="n0")
        slot = next(d["slot"] for d in vm.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "nic0")
        assert _vendor(vm, slot) == 0x1AF4 and _class_code(vm, slot) == 0x020000
        assert vm.machine.devices["nic0"].device.mac == bytes.fromhex("525400aabbcc")

        assert vm.qmp("device_del", id="nic0") == {}
        assert vm.events[-1] == ("DEVICE_DELETED", {"device": "nic0", "path": "/machine/peripheral/nic0"})
        assert _vendor(vm, slot) == 0xFFFF
        peer.settimeout(10)
        assert peer.recv(1) == b""                          # the backend was closed
        peer.close()
        assert vm.qmp("netdev_del", id="n0") == {}
        with pytest.raises(CommandError, match="not found"):
            vm.qmp("netdev_del", id="n0")
        assert vm.qmp("query-status")["status"] == "running"
        vm.wait_counts(2, after=len(vm.output))
    finally:
        vm.close()
        server.close()


def test_hotplug_waits_for_the_guest_to_eject_through_acpi(tmp_path):
    """A guest that enabled the hotplug GPE (as Linux's ACPI does for the
    DSDT's _E01) is told of device_add by GPE 1 and PCI_UP, is asked by
    device_del through PCI_DOWN, and the device goes, with DEVICE_DELETED,
    only when the guest writes the slot to PCI_EJ (its _EJ0)."""
    disk, extra = tmp_path / "disk.qcow2", tmp_path / "extra.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    create_image(str(extra), "qcow2", 1 << 20)
    vm = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    io, pm = vm.machine.io_bus, vm.machine.devices["acpi_pm"]
    try:
        vm.wait_counts(1)
        io.write(0x60E, 1, 0x2)                                     # GPE0_EN: GPE 1
        assert io.read(0xAE00, 4) == 0 and io.read(0x60C, 1) == 0
        vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
        assert vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1") == {}
        slot = next(d["slot"] for d in vm.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "hd1")
        assert io.read(0x60C, 1) == 0x2 and pm.sci.level == 1       # GPE 1 raised the SCI
        io.write(0x60C, 1, 0x2)                                     # the guest's ACPI clears it ...
        assert pm.sci.level == 0
        assert io.read(0xAE00, 4) == 1 << slot                      # ... and _E01 reads PCI_UP
        assert io.read(0xAE00, 4) == 0 and io.read(0xAE0C, 4) == 1 << slot

        assert vm.qmp("device_del", id="hd1") == {}
        assert io.read(0x60C, 1) == 0x2 and io.read(0xAE04, 4) == 1 << slot
        assert _vendor(vm, slot) == 0x1AF4                          # still there: the guest has not ejected
        assert not any(e == "DEVICE_DELETED" for e, _ in vm.events)
        with pytest.raises(CommandError, match="busy"):
            vm.qmp("blockdev-del", **{"node-name": "n1"})
        io.write(0xAE08, 4, 1 << 1)                                 # another slot's _EJ0: nothing happens
        assert _vendor(vm, slot) == 0x1AF4
        io.write(0xAE08, 4, 1 << slot)                              # this slot's _EJ0
        assert vm.events[-1] == ("DEVICE_DELETED", {"device": "hd1", "path": "/machine/peripheral/hd1"})
        assert _vendor(vm, slot) == 0xFFFF and io.read(0xAE04, 4) == 0
        assert all(d["qdev_id"] != "hd1" for d in vm.qmp("query-pci")[0]["devices"])
        assert vm.qmp("blockdev-del", **{"node-name": "n1"}) == {}
        assert vm.qmp("query-status")["status"] == "running"
        vm.wait_counts(2, after=len(vm.output))
    finally:
        vm.close()
