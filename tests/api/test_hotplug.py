"""blockdev-add/-del and virtio-blk hotplug (api/hotplug.py) on the counter
guest in-process: the new function answers in PCI config space, its drive
is listed and snapshotted, device_del takes it off with DEVICE_DELETED,
and a node in use cannot be deleted."""

from __future__ import annotations

import shutil
import time

import pytest

from pyvmm.api.commands import CommandError
from pyvmm.config import DriveConfig
from pyvmm.storage.create import create_image

from tests.storage.helpers import qemu_img

from .counterguest import CounterVm

# Plugging devices back is the engine-independent part of a restore; the
# hybrid engine's saved state (KVM's registers, its bt side) must take it too.
ENGINES = ["bt", pytest.param("hybrid", marks=pytest.mark.kvm)]


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


def _pending_del(tmp_path, name: str, engine: str = "bt", copy_of: str | None = None) -> tuple[CounterVm, int]:
    """A counter VM whose guest enabled the hotplug GPE, with hd1 plugged
    and device_del asked for but not yet ejected by the guest; its images
    are new, or copies of VM `copy_of`'s (a snapshot file names its
    drives' internal snapshots, so the VM that loads it needs them)."""
    disk, extra = tmp_path / f"{name}-disk.qcow2", tmp_path / f"{name}-extra.qcow2"
    for role, path in (("disk", disk), ("extra", extra)):
        if copy_of:
            shutil.copy(tmp_path / f"{copy_of}-{role}.qcow2", path)
        else:
            create_image(str(path), "qcow2", 1 << 20)
    vm = CounterVm(engine, [DriveConfig(file=str(disk), id="disk0")])
    vm.wait_counts(1)
    vm.machine.io_bus.write(0x60E, 1, 0x2)                          # GPE0_EN: GPE 1
    vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
    assert vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1") == {}
    slot = next(d["slot"] for d in vm.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "hd1")
    return vm, slot


def _like_the_source(tmp_path, slot: int, engine: str = "bt") -> CounterVm:
    """What a destination is given before it takes the state: the source's
    devices, hd1 hotplugged into the same slot (as QEMU's destination is
    started with the source's devices) on copies of its images, but no
    removal asked for."""
    dest, dest_slot = _pending_del(tmp_path, "dest", engine, copy_of="src")
    assert dest_slot == slot and dest.machine.io_bus.read(0xAE04, 4) == 0
    dest.qmp("stop")
    return dest


def _guest_ejects(vm: CounterVm, slot: int) -> None:
    io = vm.machine.io_bus
    assert io.read(0xAE04, 4) == 1 << slot                          # _E01 still sees the request
    assert _vendor(vm, slot) == 0x1AF4 and not any(e == "DEVICE_DELETED" for e, _ in vm.events)
    io.write(0xAE08, 4, 1 << slot)                                  # the slot's _EJ0
    assert vm.events[-1] == ("DEVICE_DELETED", {"device": "hd1", "path": "/machine/peripheral/hd1"})
    assert _vendor(vm, slot) == 0xFFFF and io.read(0xAE04, 4) == 0
    assert vm.qmp("blockdev-del", **{"node-name": "n1"}) == {}      # the node is free again


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pending_device_del_survives_a_snapshot_file(tmp_path, engine):
    """device_del, then a snapshot before the guest ejected: loaded back
    into the same VM, and into another one given the same devices, the
    guest's eject still removes hd1 with DEVICE_DELETED from the VM that
    loaded it."""
    src, slot = _pending_del(tmp_path, "src", engine)
    dest = None
    try:
        assert src.qmp("device_del", id="hd1") == {}
        snap = str(tmp_path / "pending.snap")
        src.qmp("stop")
        src.qmp("x-snapshot-file-save", path=snap)
        src.qmp("x-snapshot-file-load", path=snap)
        _guest_ejects(src, slot)
        src.qmp("cont")

        dest = _like_the_source(tmp_path, slot, engine)
        dest.qmp("x-snapshot-file-load", path=snap)
        _guest_ejects(dest, slot)
        dest.qmp("cont")
        dest.wait_counts(2, after=len(dest.output))
    finally:
        src.close()
        if dest is not None:
            dest.close()


def test_a_pending_device_del_survives_a_migration(tmp_path):
    """The same through the migration stream, into a destination given only
    the source's command line: the stream's CONFIG record plugs hd1 back
    into its slot, the QMP server that then takes the machine (as `pyvmm
    run --incoming` without --qmp attaches it after the load) handles the guest's eject,
    and DEVICE_DELETED comes from the destination only."""
    import io
    from pyvmm.api.qmp import QmpServer
    from pyvmm.migration.receiver import load_stream
    from tests.migration.test_stream import Recorder
    src, slot = _pending_del(tmp_path, "src")
    disk = tmp_path / "dest.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    dest = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    server = QmpServer([], name="dest")
    try:
        assert src.qmp("device_del", id="hd1") == {}
        rec = Recorder(str(tmp_path / "mig.sock"))
        src.qmp("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
        rec.thread.join(30)
        deadline = time.monotonic() + 30
        while (status := src.qmp("query-migrate")["status"]) != "completed":
            assert status not in ("failed", "cancelled") and time.monotonic() < deadline, status
            time.sleep(0.01)
        dest.wait_counts(1)
        dest.qmp("stop")
        assert "hd1" not in dest.machine.devices
        load_stream(dest.machine, io.BytesIO(bytes(rec.data)))
        assert dest.machine.devices["hd1"].device.image.path == str(tmp_path / "src-extra.qcow2")
        server.target.emit = lambda event, data: dest.events.append((event, data))
        server.attach(dest.machine)
        dest.target = server.target
        _guest_ejects(dest, slot)
        assert not any(e == "DEVICE_DELETED" for e, _ in src.events)
        dest.qmp("cont")
        dest.wait_counts(2, after=len(dest.output))
    finally:
        server.close()
        src.close()
        dest.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_vm_without_the_hotplugged_device_plugs_it_back_from_the_snapshot(tmp_path, engine):
    """A VM given only the source's command line (no hd1: what a new
    `pyvmm run --restore` is) loads a file saved with hd1 plugged and its
    device_del pending: hd1 goes back into its slot on the same image,
    the guest's eject removes it with DEVICE_DELETED there, and its node
    is known by name (blockdev-del). With hd1's image gone the file is
    refused in one line and nothing is plugged."""
    import os
    src, slot = _pending_del(tmp_path, "src", engine)
    other = None
    try:
        assert src.qmp("device_del", id="hd1") == {}
        snap = str(tmp_path / "with-hd1.snap")
        src.qmp("stop")
        src.qmp("x-snapshot-file-save", path=snap)
        src.close()                                     # as a killed source: its images are free
        # The source's disk0, which holds the file's internal snapshot.
        other = CounterVm(engine, [DriveConfig(file=str(tmp_path / "src-disk.qcow2"), id="disk0")])
        other.wait_counts(1)
        other.qmp("stop")
        assert "hd1" not in other.machine.devices and _vendor(other, slot) == 0xFFFF

        other.qmp("x-snapshot-file-load", path=snap)
        assert other.machine.devices["hd1"].device.image.path == str(tmp_path / "src-extra.qcow2")
        assert [b["device"] for b in other.qmp("query-block")] == ["disk0", "hd1"]
        _guest_ejects(other, slot)
        other.qmp("cont")
        other.wait_counts(2, after=len(other.output))

        os.unlink(tmp_path / "src-extra.qcow2")
        other.qmp("stop")
        before = other.counter()
        with pytest.raises(CommandError) as err:
            other.qmp("x-snapshot-file-load", path=snap)
        assert other.counter() == before and "hd1" not in other.machine.devices
        assert _vendor(other, slot) == 0xFFFF
        assert str(err.value).startswith(f"vmstate: hotplugged device hd1 (slot {slot}): ")
        assert "no such file" in str(err.value) and "\n" not in str(err.value)
        other.qmp("cont")
        assert other.wait_counts(2, after=len(other.output))[0] in (before, before + 1)
    finally:
        src.close()
        if other is not None:
            other.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_pyvmm_run_restore_brings_back_a_hotplugged_disk(tmp_path, engine):
    """A second `pyvmm run --restore` process, started with the source's
    options only, has the hotplugged disk in its slot and under its node
    name: query-pci and query-block list it, the guest reads its config
    space, and device_del / blockdev-del work on it there."""
    from pyvmm import VM
    from tests.api.counterguest import counter_kernel
    kernel, snap = str(counter_kernel()), str(tmp_path / "hd1.snap")
    disk, extra = tmp_path / "disk.qcow2", tmp_path / "extra.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    create_image(str(extra), "qcow2", 1 << 20)
    opts = {"kernel": kernel, "engine": engine, "mem": 32, "drives": [{"file": str(disk), "id": "disk0"}]}
    with VM(**opts, extra_args=["--no-reboot", "--no-bt-cache"]) as vm:
        vm.start()
        vm.console.expect(r"00000002\r?\n", timeout=30)
        vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
        vm.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1")
        slot = next(d["slot"] for d in vm.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "hd1")
        vm.pause()
        vm.save(snap)
    with VM.from_snapshot(snap, **opts, extra_args=["--no-reboot"]) as vm:
        vm.start()
        devices = {d["qdev_id"]: d["slot"] for d in vm.qmp("query-pci")[0]["devices"]}
        assert devices.get("hd1") == slot, devices
        assert [b["device"] for b in vm.qmp("query-block")] == ["disk0", "hd1"]
        assert vm.qmp("device_del", id="hd1") == {}                 # no ACPI in this guest: at once
        vm.wait_event("DEVICE_DELETED", timeout=10, device="hd1")
        assert vm.qmp("blockdev-del", **{"node-name": "n1"}) == {}
        assert vm.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_hotplugged_nic_is_plugged_back_on_its_backend_with_its_mac(tmp_path, engine):
    """A snapshot of a VM with nic0 hotplugged on a stream backend, loaded
    by a VM without it: nic0 comes back in its slot with the same MAC,
    connected to the same backend, and device_del / netdev_del work."""
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "net.sock"))
    server.listen(2)
    server.settimeout(10)
    disks = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    create_image(str(disks[0]), "qcow2", 1 << 20)
    src = CounterVm(engine, [DriveConfig(file=str(disks[0]), id="disk0")])
    other = None
    peers = []
    try:
        src.wait_counts(1)
        src.qmp("netdev_add", type="stream", id="n0", addr={"type": "unix", "path": str(tmp_path / "net.sock")})
        src.qmp("device_add", driver="virtio-net-pci", netdev="n0", id="nic0", mac="52:54:00:aa:bb:cc")
        peers.append(server.accept()[0])
        slot = next(d["slot"] for d in src.qmp("query-pci")[0]["devices"] if d["qdev_id"] == "nic0")
        mac = src.machine.devices["nic0"].device.mac
        assert mac == bytes.fromhex("525400aabbcc")
        snap = str(tmp_path / "nic.snap")
        src.qmp("stop")
        src.qmp("x-snapshot-file-save", path=snap)
        shutil.copy(disks[0], disks[1])         # disk0 with the file's internal snapshot, for a second VM
        other = CounterVm(engine, [DriveConfig(file=str(disks[1]), id="disk0")])
        other.wait_counts(1)
        other.qmp("stop")
        other.qmp("x-snapshot-file-load", path=snap)
        peers.append(server.accept()[0])                            # the new nic0's backend connected
        assert other.machine.devices["nic0"].device.mac == mac
        assert _vendor(other, slot) == 0x1AF4 and _class_code(other, slot) == 0x020000
        assert other.qmp("device_del", id="nic0") == {}             # the guest has no ACPI: at once
        assert other.events[-1] == ("DEVICE_DELETED", {"device": "nic0", "path": "/machine/peripheral/nic0"})
        peers[1].settimeout(10)
        assert peers[1].recv(1) == b""                              # its backend closed
        assert other.qmp("netdev_del", id="n0") == {}
        other.qmp("cont")
        other.wait_counts(2, after=len(other.output))
    finally:
        src.close()
        if other is not None:
            other.close()
        for p in peers:
            p.close()
        server.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_loadvm_plugs_a_hotplugged_disk_back_and_reverts_it_with_the_others(tmp_path, engine):
    """HMP savevm with hd1 hotplugged snapshots its disk too; a VM started
    on the same disk0 without hd1 loads the tag: hd1 is plugged back and
    its disk reverted to the tag like disk0's (memory and disks agree)."""
    disk, extra = tmp_path / "disk.qcow2", tmp_path / "extra.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    create_image(str(extra), "qcow2", 1 << 20)
    src = CounterVm(engine, [DriveConfig(file=str(disk), id="disk0")])
    other = None
    try:
        src.wait_counts(1)
        src.qmp("blockdev-add", driver="qcow2", **{"node-name": "n1"}, file=str(extra))
        src.qmp("device_add", driver="virtio-blk-pci", drive="n1", id="hd1")
        assert src.hmp("savevm t") == ""
        src.machine.devices["hd1"].device.image.write(0, b"after the snapshot".ljust(512, b"\0"))
        src.close()

        other = CounterVm(engine, [DriveConfig(file=str(disk), id="disk0")])
        other.wait_counts(1)
        assert "hd1" not in other.machine.devices
        assert other.hmp("loadvm t") == ""
        assert [b["device"] for b in other.qmp("query-block")] == ["disk0", "hd1"]
        assert other.machine.devices["hd1"].device.image.read(0, 512) == bytes(512)
        other.wait_counts(2, after=len(other.output))
    finally:
        src.close()
        if other is not None:
            other.close()
    for path in (disk, extra):
        assert qemu_img("check", path).returncode == 0
