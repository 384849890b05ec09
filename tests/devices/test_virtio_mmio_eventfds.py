"""Under hw, a virtio-mmio page's queue notify reaches the device through
KVM_IOEVENTFD (one per queue on QueueNotify, matching the queue's index)
and its interrupt wire leaves through an irqfd (devices/virtio/
kvm_eventfds.py): no exit for the kick, no KVM_IRQ_LINE from pyvmm.

A 64-bit guest routes the page's ISA IRQ through the IOAPIC (edge
triggered) to a vector, writes 1 to QueueNotify (virtio-rng has no queue
1: the datamatch lets it exit to pyvmm, which ignores it) and then 0 (the
ioeventfd), and waits for the interrupt; its handler reads the interrupt
status, ACKs it and EOIs.  Those two register accesses and the control
write are the only MMIO exits."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import NetConfig, VmConfig
from pyvmm.devices.virtio.install import MMIO_BASE, MMIO_IRQS
from pyvmm.devices.virtio import kvm_eventfds
from pyvmm.devices.virtio.transport.mmio import (INT_USED, R_INTERRUPT_ACK, R_INTERRUPT_STATUS, R_QUEUE_NOTIFY,
                                                 VirtioMmio)
from pyvmm.engines.kvm import abi
from pyvmm.migrate import switch_engine

from ..modeguests import CODE, boot_for
from ..rawguest import require_kvm, run_until_stop
from .ioapicguest import CHECKPOINT, EDGE, VECTOR, ioapic_guest, run_with_cue
from .test_virtio_kvm_eventfds import Checkpoint

pytestmark = pytest.mark.kvm

COUNT, STATUS_SEEN, UNMASK = 0x200000, 0x200008, 0x200010
PULSE_LANDS_S = 0.05           # an irqfd write reaches the IOAPIC from a kernel worker: let it
DESC, AVAIL, USED, BUF = 0x400000, 0x401000, 0x402000, 0x403000


def kicks(irq: int, masked_first: bool) -> str:
    """The guest's requests.  masked_first: the first completes while the
    IOAPIC pin is masked (its interrupt lost, as on a real edge-triggered
    pin), the second after the unmask must interrupt."""
    notify = MMIO_BASE + R_QUEUE_NOTIFY
    if not masked_first:
        return f"""
    mov eax, {notify}
    mov dword ptr [rax], 1                       # no such queue: not matched, an exit
    mov dword ptr [rax], 0                       # queue 0: its ioeventfd
"""
    return f"""
    mov dword ptr [rdi], {0x10 + 2 * irq}
    mov dword ptr [rdi + 0x10], {0x10000 | VECTOR}   # masked
    mov eax, {notify}
    mov dword ptr [rax], 0
7:  cmp dword ptr [{UNMASK}], 0                 # the host saw the first pulse go into KVM
    je 7b
    mov dword ptr [rdi], {0x10 + 2 * irq}
    mov dword ptr [rdi + 0x10], {VECTOR}         # unmasked
    mov word ptr [{AVAIL + 2}], 2                # the second buffer
    mov eax, {notify}
    mov dword ptr [rax], 0
"""


def guest(irq: int, masked_first: bool = False) -> bytes:
    """Kicks, waits for the first interrupt, then settles (ioapicguest);
    the handler reads the interrupt status and ACKs it."""
    return ioapic_guest(irq, EDGE, kicks(irq, masked_first) + """
1:  cmp ebx, 1
    jb 1b
""", f"""    push rdx
    mov edx, {MMIO_BASE + R_INTERRUPT_STATUS}
    mov eax, dword ptr [rdx]
    mov dword ptr [{STATUS_SEEN}], eax
    mov edx, {MMIO_BASE + R_INTERRUPT_ACK}
    mov dword ptr [rdx], eax
    pop rdx
""", COUNT)


def mmio_machine():
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True, virtio_rng=True,
                   virtio_transport="mmio")
    return build_machine(cfg, lambda data: None, boot=boot_for(b"\xf4"))


def set_up_queue(m) -> VirtioMmio:
    """Drives the rng's register page from the host as the Linux driver
    would: VERSION_1, queue 0 of 8 with one 16-byte writable buffer, DRIVER_OK."""
    def w(off, value):
        m.mmio_bus.write(MMIO_BASE + off, 4, value)
    for status in (0, 1, 3):
        w(0x70, status)
    w(0x24, 1)
    w(0x20, 1)                                           # VERSION_1 (bit 32)
    w(0x70, 0xB)
    w(0x30, 0)
    w(0x38, 8)
    for off, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
        w(off, addr)
        w(off + 4, 0)
    w(0x44, 1)
    w(0x70, 0xF)
    for i in range(2):                                   # device-writable
        m.memory.write(DESC + 16 * i, struct.pack("<QIHH", BUF + 16 * i, 16, 2, 0))
    m.memory.write(AVAIL, struct.pack("<HHHH", 0, 1, 0, 1))     # the first of them
    return m.devices["virtio_rng"]


def test_mmio_notify_by_ioeventfd_and_interrupt_by_irqfd():
    m = mmio_machine()
    try:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        fn = set_up_queue(m)
        m.memory.write(CODE, guest(MMIO_IRQS[0]))
        run_until_stop(m, 60)
        assert m.stop_status.detail == "checkpoint", m.stop_status
        assert m.memory.read_u16(USED + 2) == 1 and m.memory.read(BUF, 16) != bytes(16)
        assert m.memory.read_u32(COUNT) == 1                      # one event, one interrupt
        assert m.memory.read_u32(STATUS_SEEN) == INT_USED and fn.interrupt_status == 0
        mmio_exits = sum(c[abi.EXIT_MMIO] for c in m.engine.exit_counts)
        # The control write and the handler's status read and ACK: the kick went by ioeventfd ...
        assert (mmio_exits, m.engine.irq_injections) == (3, 0)
        # ... and the interrupt by irqfd.
        [notify] = m.eventfds
        [wire] = m.intx_irqfds
        assert isinstance(notify, kvm_eventfds.MmioNotifyEventFds) and notify.base == MMIO_BASE
        assert notify.kicks == 1 and wire.line is fn.irq and wire.raised == 1
    finally:
        destroy_machine(m)


def test_a_pulse_into_a_masked_pin_does_not_silence_the_later_ones():
    """Why the wire's irqfd does not resample: KVM would hold the masked
    edge-triggered pin high from the first pulse on, the unmask would not
    deliver it, no EOI would ever lower it, and the second pulse would be
    no edge: the guest would wait for its interrupt for ever."""
    m = mmio_machine()
    try:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        set_up_queue(m)
        m.memory.write(CODE, guest(MMIO_IRQS[0], masked_first=True))
        [wire] = m.intx_irqfds
        # unmask once the first pulse went into KVM
        run_with_cue(m, lambda: wire.raised >= 1, UNMASK, 20, 20, lands_s=PULSE_LANDS_S)
        assert m.stop_status.detail == "checkpoint", m.stop_status
        assert m.memory.read_u16(USED + 2) == 2 and m.memory.read_u32(COUNT) == 1
        assert m.engine.irq_injections == 0 and wire.raised == 2
    finally:
        destroy_machine(m)


def test_after_a_move_to_bt_the_mmio_wire_goes_through_the_new_engine():
    m = mmio_machine()
    try:
        fn = set_up_queue(m)
        [wire] = m.intx_irqfds
        switch_engine(m, "bt")
        seen = []
        m.engine.set_irq = lambda g, level: seen.append((g, level))
        fn.config_changed()
        assert seen == [(MMIO_IRQS[0], 1), (MMIO_IRQS[0], 0)] and wire.raised == 0
    finally:
        destroy_machine(m)


def test_mmio_eventfds_are_released_with_the_machine():
    m = mmio_machine()
    [notify] = m.eventfds
    [wire] = m.intx_irqfds
    destroy_machine(m)
    assert notify.fds == [] and wire.fd == -1 and wire.line.sink != wire._sink


def test_each_mmio_queue_has_an_ioeventfd_matching_its_index(tmp_path):
    """virtio-net's three queues: KVM holds an ioeventfd on QueueNotify for
    each index (a second one with that datamatch collides), none for others."""
    require_kvm()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "net.sock"))
    server.listen(1)
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True, virtio_transport="mmio",
                   nets=[NetConfig(stream=str(tmp_path / "net.sock"))])
    m = build_machine(cfg, lambda data: None, boot=boot_for(b"\xf4"))
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        [notify] = m.eventfds
        assert len(notify.fds) == 3 and notify.base == MMIO_BASE

        def taken(queue: int) -> bool:
            try:
                m.engine.vm.ioeventfd(MMIO_BASE + R_QUEUE_NOTIFY, 4, fd, datamatch=queue)
            except FileExistsError:
                return True
            m.engine.vm.ioeventfd(MMIO_BASE + R_QUEUE_NOTIFY, 4, fd, deassign=True, datamatch=queue)
            return False
        assert [taken(q) for q in range(5)] == [True, True, True, False, False]
    finally:
        os.close(fd)
        destroy_machine(m)
        server.close()
