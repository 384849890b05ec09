"""Under hw, a virtio function plugged in at run time (QMP device_add, or
a snapshot load / incoming migration plugging one back) gets the eventfds
of the functions the machine was built with (devices/virtio/
kvm_eventfds.py attach_function): its queue notify reaches the device
through KVM_IOEVENTFD without an exit, its interrupts (INTx for the
virtio-blk here, MSI-X for the virtio-net) leave through KVM_IRQFD without
an ioctl from pyvmm; device_del takes them off the VM, and the function
device_add plugs in again gets fresh ones.

A small protected-mode guest kicks the queue whose notify address the
host left at POINTER, spins until the used ring moves, reports at a
checkpoint and waits for the host's go to do it again."""

from __future__ import annotations

import os
import socket
import struct
from contextlib import contextmanager

import pytest

from pyvmm import hotplugged
from pyvmm.api import hotplug
from pyvmm.api.commands import Target
from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.devices.pci.msix import CTRL_ENABLE
from pyvmm.devices.virtio.block import HEADER, S_OK, T_IN
from pyvmm.devices.virtio.net import NET_HDR
from pyvmm.devices.virtio.transport.pci import (BAR_INDEX, COMMON_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_MULTIPLIER,
                                                NOTIFY_OFFSET)
from pyvmm.engines.kvm import abi
from pyvmm.migrate import switch_engine

from ..rawguest import build_guest, raw_boot, require_kvm, run_until_stop
from .test_virtio_kvm_eventfds import Checkpoint

pytestmark = pytest.mark.kvm

CHECKPOINT = 0xE0
POINTER, QUEUE_AT, GO = 0x8000, 0x8004, 0x8008
DESC, AVAIL, USED, BUF = 0x10000, 0x11000, 0x12000, 0x13000
SECTOR = b"hotplugged disk, sector 0 ".ljust(512, b".")
FRAME = bytes.fromhex("ffffffffffff525400aabbcc0800") + b"hotplugged nic".ljust(46, b"!")
MSI_ADDRESS, MSI_DATA = 0xFEE00000, 0x41

GUEST = f"""
top:
    mov {POINTER}, %ebx
    movzwl {QUEUE_AT}, %eax
    movw %ax, (%ebx)
1:  cmpw $0, {USED + 2}
    je 1b
    out %al, ${CHECKPOINT}
2:  cmpl $0, {GO}
    je 2b
    movl $0, {GO}
    jmp top
"""


@contextmanager
def hw_machine():
    """A hw machine with the in-kernel irqchip and a PCI bus (virtio-rng),
    running GUEST; destroyed on exit."""
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True, virtio_rng=True)
    m = build_machine(cfg, lambda data: None, boot=raw_boot(build_guest(GUEST, "prot"), "prot"))
    m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
    try:
        yield m
    finally:
        destroy_machine(m)


def plugged(m, ident: str):
    bridge = m.devices["pci_host"]
    slot = next(s for s, n in bridge.names.items() if n == ident)
    return bridge.functions[slot], bridge.mapping(slot, BAR_INDEX)


def set_up_queue(m, fn, base: int, queue: int, chain: list[tuple[int, int, int]], msix: bool) -> None:
    """Drives the function's common config as a driver would: VERSION_1,
    queue `queue` of 8 holding `chain` ((address, length, flags) each),
    DRIVER_OK; with `msix`, the queue's interrupts on MSI-X vector 0.
    Leaves the queue's notify address and index for GUEST."""
    common = base + COMMON_OFFSET

    def w(off, size, value):
        m.mmio_bus.write(common + off, size, value)
    m.memory.write(AVAIL, bytes(0x100))                  # rings as a new driver has them
    m.memory.write(USED, bytes(0x100))
    for status in (0, 1, 3):
        w(0x14, 1, status)
    w(0x08, 4, 1)
    w(0x0C, 4, 1)                                        # VERSION_1 (bit 32)
    w(0x14, 1, 0xB)
    w(0x16, 2, queue)
    w(0x18, 2, 8)
    for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
        w(off, 4, addr)
        w(off + 4, 4, 0)
    if msix:
        fn.config_write(fn._msix_control, 2, CTRL_ENABLE)
        for off, value in enumerate((MSI_ADDRESS, 0, MSI_DATA, 0)):   # entry 0, unmasked
            m.mmio_bus.write(base + MSIX_TABLE_OFFSET + 4 * off, 4, value)
        w(0x1A, 2, 0)
    w(0x1C, 2, 1)
    w(0x14, 1, 0xF)
    for i, (addr, length, flags) in enumerate(chain):
        last = i == len(chain) - 1
        m.memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags | (0 if last else 1), i + 1))
    m.memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    m.memory.write_u32(POINTER, base + NOTIFY_OFFSET + queue * NOTIFY_MULTIPLIER)
    m.memory.write_u16(QUEUE_AT, queue)


class Disk:
    """virtio-blk on a raw image: reads sector 0; INTx."""
    msix, queue = False, 0

    def __init__(self, t: Target, tmp_path):
        path = tmp_path / "disk.raw"
        path.write_bytes(SECTOR + bytes(1 << 20))
        assert hotplug.blockdev_add(t, {"driver": "raw", "node-name": "n1", "file": str(path)}) == {}
        self.path = str(path)

    def add(self, t: Target, ident: str) -> None:
        assert hotplug.device_add(t, {"driver": "virtio-blk-pci", "id": ident, "drive": "n1"}) == {}

    @staticmethod
    def chain(m) -> list:
        m.memory.write(BUF, HEADER.pack(T_IN, 0, 0) + bytes(512) + b"\xff")
        return [(BUF, HEADER.size, 0), (BUF + HEADER.size, 512, 2), (BUF + HEADER.size + 512, 1, 2)]

    @staticmethod
    def check(m) -> None:
        assert m.memory.read(BUF + HEADER.size, 513) == SECTOR + bytes([S_OK])

    def close(self) -> None:
        pass


class Nic:
    """virtio-net on a stream backend: sends one frame; MSI-X."""
    msix, queue = True, 1

    def __init__(self, t: Target, tmp_path):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(tmp_path / "net.sock"))
        self.server.listen(1)
        self.server.settimeout(10)
        self.peer = None
        assert hotplug.netdev_add(t, {"type": "stream", "id": "n0",
                                      "addr": {"type": "unix", "path": str(tmp_path / "net.sock")}}) == {}

    def add(self, t: Target, ident: str) -> None:
        assert hotplug.device_add(t, {"driver": "virtio-net-pci", "id": ident, "netdev": "n0"}) == {}
        if self.peer is not None:
            self.peer.close()
        self.peer, _ = self.server.accept()
        self.peer.settimeout(10)

    def chain(self, m) -> list:
        m.memory.write(BUF, NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + FRAME)
        return [(BUF, NET_HDR.size + len(FRAME), 0)]

    def check(self, m) -> None:
        got = b""
        while FRAME not in got:
            data = self.peer.recv(4096)
            assert data, "the backend closed before the frame came"
            got += data

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.server.close()


def mmio_exits(m) -> int:
    return sum(c[abi.EXIT_MMIO] for c in m.engine.exit_counts)


def notify_is_free(m, addr: int) -> bool:
    """Whether KVM takes a new 2-byte ioeventfd at `addr` (EEXIST: one is still there)."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        m.engine.vm.ioeventfd(addr, 2, fd)
        m.engine.vm.ioeventfd(addr, 2, fd, deassign=True)
        return True
    except FileExistsError:
        return False
    finally:
        os.close(fd)


def do_io(m, backend, ident: str, first: bool):
    """One request on `ident` by GUEST; checks it went by eventfds both
    ways and returns the function."""
    fn, base = plugged(m, ident)
    set_up_queue(m, fn, base, backend.queue, backend.chain(m), backend.msix)
    exits, injections = mmio_exits(m), m.engine.irq_injections
    sent = m.msi_irqfds.sent if getattr(m, "msi_irqfds", None) is not None else 0
    if not first:
        m.clear_stop()
        m.memory.write_u32(GO, 1)
    run_until_stop(m, 60)
    assert m.stop_status.detail == "checkpoint", m.stop_status
    assert m.memory.read_u16(USED + 2) == 1
    backend.check(m)
    # No exit for the kick and no interrupt ioctl for the completion ...
    assert (mmio_exits(m) - exits, m.engine.irq_injections - injections) == (0, 0)
    # ... which went by this function's ioeventfd and irqfd.
    record = m.attached_eventfds[fn]
    assert record.notify.kicks == 1 and record.notify.base == base
    if backend.msix:
        assert m.msi_irqfds.sent - sent == 1 and record.intx.raised == 0
    else:
        assert record.intx.line is fn.irq and record.intx.raised == 1
    return fn


@pytest.mark.parametrize("kind", [Disk, Nic], ids=["virtio-blk", "virtio-net"])
def test_a_hotplugged_function_uses_eventfds_again_after_device_del_and_add(tmp_path, kind):
    with hw_machine() as m:
        t = Target(machine=m)
        backend = kind(t, tmp_path)
        try:
            for first in (True, False):
                backend.add(t, "dev1")
                fn = do_io(m, backend, "dev1", first)
                notify = m.attached_eventfds[fn].notify
                addr = notify.base + NOTIFY_OFFSET + backend.queue * NOTIFY_MULTIPLIER
                assert not notify_is_free(m, addr)
                assert hotplug.device_del(t, {"id": "dev1"}) == {}   # no ACPI eject here: at once
                # Off the VM, closed, and the function's own paths back.
                assert fn not in m.attached_eventfds and notify_is_free(m, addr) and notify.fds == []
                assert [type(f).__name__ for f in m.devices["pci_host"].functions.values()
                        if f in m.attached_eventfds] == ["VirtioPci"]   # the rng's alone
                assert len(m.eventfds) == len(m.intx_irqfds) == 1
                assert fn.irq.sink != m.intx_irqfds[0]._sink
        finally:
            backend.close()


def test_a_function_a_restore_plugs_back_gets_eventfds(tmp_path):
    """hotplugged.replug, which a snapshot load and an incoming migration
    run with the saved records, then unplug (a load that failed later)."""
    with hw_machine() as m:
        path = tmp_path / "disk.raw"
        path.write_bytes(SECTOR + bytes(1 << 20))
        record = {"id": "hd1", "driver": "virtio-blk-pci", "slot": 7, "node-name": "n1", "format": "raw",
                  "filename": str(path), "read-only": False}
        with m.lock:
            assert hotplugged.replug(m, [record]) == ["hd1"]
        fn = do_io(m, Disk, "hd1", True)          # its requests need no node of a Target
        with m.lock:
            assert hotplugged.unplug(m, "hd1") == 7
        assert fn not in m.attached_eventfds and len(m.eventfds) == 1


def test_after_a_move_to_bt_a_hotplugged_function_interrupts_through_the_new_engine(tmp_path):
    with hw_machine() as m:
        t = Target(machine=m)
        Disk(t, tmp_path).add(t, "hd1")
        fn, _ = plugged(m, "hd1")
        record = m.attached_eventfds[fn]
        switch_engine(m, "bt")
        seen = []
        m.engine.set_irq = lambda g, level: seen.append((g, level))
        m.engine.signal_msi = lambda address, data: seen.append((address, data))
        fn._interrupt(1)                                  # MSI-X off: INTx
        fn.msi(MSI_ADDRESS, MSI_DATA)
        assert seen == [(fn.irq.gsi, 1), (MSI_ADDRESS, MSI_DATA)] and record.intx.raised == 0
        fn.config_write(0x10 + 4 * BAR_INDEX, 4, fn.bar_address(fn.bars[BAR_INDEX]) + 0x100000)
        assert hotplug.device_del(t, {"id": "hd1"}) == {}   # the old VM is closed: nothing to take off
        assert fn not in m.attached_eventfds and record.notify.fds == [] and record.intx.fd == -1
