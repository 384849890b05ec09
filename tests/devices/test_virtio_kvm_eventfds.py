"""Under hw, a virtio queue notify reaches the device through KVM_IOEVENTFD
without an exit to pyvmm, and MSI-X messages leave through KVM_IRQFD
(devices/virtio/kvm_eventfds.py).

A small protected-mode guest (kernel mode: emulated by KVM on this
kvm_pvm host) kicks a virtio-rng queue the host set up, then spins until
the used ring moves: the device ran on the event loop while the vCPU stayed
in the guest.  A 4-byte write to the same address (which the 2-byte
ioeventfd does not match) takes the ordinary MMIO exit instead: the
control that shows the count of exits measures something."""

from __future__ import annotations

import struct
from contextlib import contextmanager

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.devices.virtio.kvm_eventfds import FIRST_MSI_GSI, MsiIrqFds
from pyvmm.devices.virtio.transport.pci import BAR_INDEX, COMMON_OFFSET, NOTIFY_OFFSET, VirtioPci
from pyvmm.engines.kvm import abi
from pyvmm.machine import StopReason

from ..rawguest import build_guest, raw_boot, require_kvm, run_until_stop

CHECKPOINT = 0xE0
POINTER, DESC, AVAIL, USED, BUF = 0x8000, 0x10000, 0x11000, 0x12000, 0x13000


def guest(width: str) -> str:
    return f"""
    mov {POINTER}, %ebx
    mov{width} $0, (%ebx)
1:  cmpw $0, {USED + 2}
    je 1b
    out %al, ${CHECKPOINT}
    hlt
"""


@contextmanager
def rng_machine(boot=None):
    """A hw machine with an in-kernel irqchip and virtio-rng, destroyed on
    exit; by default its guest only halts (the host drives the device)."""
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True, virtio_rng=True)
    m = build_machine(cfg, lambda data: None, boot=boot or raw_boot(b"\xf4", "prot"))
    try:
        yield m
    finally:
        destroy_machine(m)


class Checkpoint:
    def __init__(self, machine):
        self.machine = machine

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.machine.request_stop(StopReason.USER, "checkpoint")


def set_up_queue(m) -> tuple[VirtioPci, int]:
    """Drives virtio-rng's common config from the host as a driver would:
    VERSION_1, queue 0 of 8 with one 16-byte writable buffer, DRIVER_OK."""
    bridge = m.devices["pci_host"]
    slot, fn = next((s, f) for s, f in bridge.functions.items() if isinstance(f, VirtioPci))
    base = bridge.mapping(slot, BAR_INDEX)
    common = base + COMMON_OFFSET

    def w(off, size, value):
        m.mmio_bus.write(common + off, size, value)
    for status in (0, 1, 3):
        w(0x14, 1, status)
    w(0x08, 4, 1)
    w(0x0C, 4, 1)                                        # VERSION_1 (bit 32)
    w(0x14, 1, 0xB)
    w(0x16, 2, 0)
    w(0x18, 2, 8)
    for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
        w(off, 4, addr)
        w(off + 4, 4, 0)
    w(0x1C, 2, 1)
    w(0x14, 1, 0xF)
    m.memory.write(DESC, struct.pack("<QIHH", BUF, 16, 2, 0))   # device-writable
    m.memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    m.memory.write(POINTER, struct.pack("<I", base + NOTIFY_OFFSET))
    return fn, base


@pytest.mark.parametrize("width,through_eventfd", [("w", True), ("l", False)])
def test_notify_reaches_the_device_without_an_exit(width, through_eventfd):
    with rng_machine(raw_boot(build_guest(guest(width), "prot"), "prot")) as m:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        assert [f.base for f in m.eventfds] == [set_up_queue(m)[1]]
        run_until_stop(m, 60)
        assert m.stop_status.detail == "checkpoint", m.stop_status
        assert struct.unpack("<H", m.memory.read(USED + 2, 2))[0] == 1
        assert m.memory.read(BUF, 16) != bytes(16)       # rng filled the buffer
        mmio_exits = sum(c[abi.EXIT_MMIO] for c in m.engine.exit_counts)
        kicks = sum(f.kicks for f in m.eventfds)
        assert (mmio_exits, kicks) == ((0, 1) if through_eventfd else (1, 0))


def test_eventfds_follow_a_moved_bar():
    with rng_machine() as m:
        bridge = m.devices["pci_host"]
        slot, fn = next((s, f) for s, f in bridge.functions.items() if isinstance(f, VirtioPci))
        fds = m.eventfds[0]
        old = fds.base
        fn.config_write(0x10 + 4 * BAR_INDEX, 4, old + 0x100000)
        assert fds.base == old + 0x100000 == bridge.mapping(slot, BAR_INDEX)
        fn.config_write(0x04, 2, 0)                       # decoding off: no ioeventfd either
        assert fds.base is None


def test_msi_messages_get_one_route_each():
    with rng_machine() as m:
        irqfds = MsiIrqFds(m.engine.vm)
        assert irqfds.send(0xFEE00000, 0x41) and irqfds.send(0xFEE00000, 0x41)
        assert irqfds.send(0xFEE00000, 0x42)
        assert irqfds.routes == {FIRST_MSI_GSI: (0xFEE00000, 0x41), FIRST_MSI_GSI + 1: (0xFEE00000, 0x42)}
        assert irqfds.sent == 3
        irqfds.close()
        assert m.msi_irqfds is not None                   # the machine's own, used by the functions
