"""MSI-X on virtio-pci (pci/msix.py and transport/pci.py): the capability,
the table and PBA in BAR 4, per-queue and config vectors, masking, and
delivery of the message to a local APIC through the bt platform."""

from __future__ import annotations

import os
import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.pci.msix import MsixTable
from pyvmm.devices.platform.clock import GuestClock
from pyvmm.devices.platform.intc import PlatformInterrupts
from pyvmm.devices.virtio.rng import VirtioRng

from .virtio_driver import DESC_AT, F_VERSION_1, Driver

CAP_MSIX = 0x11
NO_VECTOR = 0xFFFF
MSIX_CONFIG, QUEUE_SELECT, QUEUE_MSIX = 0x10, 0x16, 0x1A
LAPIC = 0xFEE00000


def rng_driver() -> Driver:
    d = Driver(lambda mem: VirtioRng(mem, source=lambda n: b"\xa5" * n))
    assert d.init(features=F_VERSION_1) & 4     # no EVENT_IDX: every used buffer interrupts
    return d


def msix_layout(d: Driver) -> tuple[int, int, int]:
    """(capability offset, table address, PBA address) as a driver finds them."""
    cap = d.find_capability(CAP_MSIX)
    assert cap
    table, pba = d.cfg_read(cap + 4), d.cfg_read(cap + 8)
    return cap, d.bar_base(table & 7) + (table & ~7), d.bar_base(pba & 7) + (pba & ~7)


def program(d: Driver, vector: int, address: int, data: int, masked: bool = False) -> None:
    _, table, _ = msix_layout(d)
    entry = table + 16 * vector
    d.mmio.write(entry, 4, address & 0xFFFFFFFF)
    d.mmio.write(entry + 4, 4, address >> 32)
    d.mmio.write(entry + 8, 4, data)
    d.mmio.write(entry + 12, 4, int(masked))


def enable(d: Driver, function_mask: bool = False) -> None:
    cap, _, _ = msix_layout(d)
    d.cfg_write(cap + 2, 2, 0x8000 | (0x4000 if function_mask else 0))


def set_vectors(d: Driver, queue_vector: int, config_vector: int) -> tuple[int, int]:
    """Writes both vector registers the way Linux does and reads them back."""
    d.common_write(MSIX_CONFIG, 2, config_vector)
    d.common_write(QUEUE_SELECT, 2, 0)
    d.common_write(QUEUE_MSIX, 2, queue_vector)
    return d.common_read(QUEUE_MSIX, 2), d.common_read(MSIX_CONFIG, 2)


def test_capability_points_at_table_and_pba_in_bar4():
    d = rng_driver()
    cap = d.find_capability(CAP_MSIX)
    control = d.cfg_read(cap + 2, 2)
    assert control & 0x7FF == 1                         # 2 vectors: one queue + config
    assert d.cfg_read(cap + 4) == 0x4000 | 4 and d.cfg_read(cap + 8) == 0x6000 | 4
    d.cfg_write(cap + 2, 2, 0xFFFF)                     # only enable and function mask stick
    assert d.cfg_read(cap + 2, 2) == 0xC000 | 1
    _, table, pba = msix_layout(d)
    assert d.mmio.read(table + 12, 4) == 1 and d.mmio.read(table + 16 + 12, 4) == 1   # start masked
    assert d.mmio.read(pba, 8) == 0
    assert set_vectors(d, 1, 0) == (1, 0)
    assert set_vectors(d, 2, 7) == (NO_VECTOR, NO_VECTOR)   # beyond the table: refused


def test_queue_interrupt_is_the_queue_vectors_message_not_intx():
    d = rng_driver()
    program(d, 0, LAPIC, 0x41)
    program(d, 1, LAPIC | 0x3000, 0x4052)
    enable(d)
    set_vectors(d, 1, 0)
    d.submit([(64, True)])
    assert d.used() == [(0, 64)]
    assert d.msis == [(LAPIC | 0x3000, 0x4052)]
    assert d.levels == [] and d.read_isr() == 0       # INTx and the ISR stay quiet
    # NO_VECTOR on the queue: used buffers but no interrupt at all
    set_vectors(d, NO_VECTOR, 0)
    d.submit([(8, True)])
    assert len(d.used()) == 2 and len(d.msis) == 1 and d.levels == []


def test_masked_vector_sets_pba_and_sends_on_unmask():
    d = rng_driver()
    _, table, pba = msix_layout(d)
    program(d, 1, LAPIC, 0x61, masked=True)
    enable(d)
    set_vectors(d, 1, 0)
    d.submit([(16, True)])
    assert d.msis == [] and d.mmio.read(pba, 8) == 0b10
    d.mmio.write(table + 16 + 12, 4, 0)                 # unmask vector 1
    assert d.msis == [(LAPIC, 0x61)] and d.mmio.read(pba, 8) == 0
    # the function mask holds every vector back the same way
    enable(d, function_mask=True)
    d.submit([(16, True)])
    assert len(d.msis) == 1 and d.mmio.read(pba, 8) == 0b10
    enable(d)
    assert d.msis == [(LAPIC, 0x61)] * 2 and d.mmio.read(pba, 8) == 0


def test_needs_reset_signals_the_config_vector():
    d = rng_driver()
    program(d, 0, LAPIC, 0x70)
    program(d, 1, LAPIC, 0x71)
    enable(d)
    set_vectors(d, 1, 0)
    d.memory.write(DESC_AT, struct.pack("<QIHH", 0x100000, 16, 3, 0))   # NEXT|WRITE to itself: a loop
    d.memory.write_u16(0x20000 + 4, 0)
    d.memory.write_u16(0x20000 + 2, 1)
    d.kick()
    assert d.status & 0x40 and d.msis == [(LAPIC, 0x70)]


def test_virtio_reset_clears_vectors_and_pci_reset_disables_msix():
    d = rng_driver()
    cap, _, _ = msix_layout(d)
    enable(d)
    set_vectors(d, 1, 0)
    d.common_write(0x14, 1, 0)                          # virtio reset
    assert set_vectors(d, NO_VECTOR, NO_VECTOR) == (NO_VECTOR, NO_VECTOR)
    assert d.common_read(MSIX_CONFIG, 2) == NO_VECTOR
    d.fn.reset()
    assert d.cfg_read(cap + 2, 2) == 1 and not d.fn.msix.enabled


def test_state_round_trip_keeps_table_vectors_and_enable():
    d = rng_driver()
    program(d, 1, LAPIC | 0x1000, 0x99, masked=True)
    enable(d)
    set_vectors(d, 1, 0)
    d.submit([(16, True)])                              # leaves vector 1 pending
    state = d.fn.save()
    e = rng_driver()
    e.fn.restore(state)
    assert e.fn.msix.enabled and e.fn.msix.pending == 0b10
    assert e.common_read(MSIX_CONFIG, 2) == 0
    e.common_write(QUEUE_SELECT, 2, 0)
    assert e.common_read(QUEUE_MSIX, 2) == 1
    _, table, _ = msix_layout(e)
    e.mmio.write(table + 16 + 12, 4, 0)
    assert e.msis == [(LAPIC | 0x1000, 0x99)]


def test_table_ignores_out_of_range_vectors_and_rejects_bad_counts():
    sent = []
    t = MsixTable(3, lambda a, v: sent.append((a, v)))
    t.set_control(0x8000)
    t.table_write(12, 4, 0)
    for vector in (-1, 3, 1000):
        t.notify(vector)
    t.notify(0)
    assert sent == [(0, 0)] and t.pending == 0
    with pytest.raises(ValueError):
        MsixTable(0)


def test_platform_delivers_msi_to_the_addressed_local_apic():
    wakes = []
    intc = PlatformInterrupts(2, GuestClock("deterministic"), on_wake=wakes.append)
    io, mmio = Bus("io", serialize=False), Bus("mmio", serialize=False)
    intc.attach(io, mmio)
    for cpu in (0, 1):
        intc.current_cpu = cpu
        mmio.write(LAPIC + 0xF0, 4, 0x1FF)              # software enable
    intc.signal_msi(LAPIC | 1 << 12, 0x45)              # physical destination APIC id 1, fixed
    assert wakes == [1] and intc.pending(1) and not intc.pending(0)
    assert intc.acknowledge(1) == 0x45
    intc.signal_msi(0xFED00000, 0x46)                   # not the APIC page: dropped
    assert not intc.pending(0) and not intc.pending(1)


def test_kvm_signal_msi_sets_the_vector_in_the_addressed_apic():
    """hw: the engine's MSI sink is KVM_SIGNAL_MSI on the in-kernel irqchip."""
    import ctypes

    from pyvmm.engines.kvm import abi
    from pyvmm.engines.kvm.device import Kvm, ioctl

    from ..hostfacts import require_kvm
    require_kvm()
    lapic_state = ctypes.c_uint8 * 1024                    # struct kvm_lapic_state
    get_lapic, set_lapic = abi._ior(0x8E, 1024), abi._iow(0x8F, 1024)
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    regs = lapic_state()
    ioctl(vcpu.fd, get_lapic, regs)
    assert vm.signal_msi(LAPIC, 0x41) == 0                # software-disabled APIC: dropped
    svr = int.from_bytes(bytes(regs[0xF0:0xF4]), "little") | 0x1FF
    regs[0xF0:0xF4] = list(svr.to_bytes(4, "little"))
    ioctl(vcpu.fd, set_lapic, regs)
    assert vm.signal_msi(LAPIC, 0x41) == 1
    ioctl(vcpu.fd, get_lapic, regs)
    irr = int.from_bytes(bytes(regs[0x200 + 0x10 * (0x41 // 32):][:4]), "little")
    assert irr >> (0x41 % 32) & 1
    for fd in (vcpu.fd, vm.fd):
        os.close(fd)
    kvm.close()


def test_random_msix_table_and_control_traffic_never_raises():
    import random
    r = random.Random(11)
    d = rng_driver()
    cap, table, pba = msix_layout(d)
    for _ in range(3000):
        choice = r.random()
        if choice < 0.4:
            size = r.choice((1, 2, 4, 8))
            d.mmio.write(table + r.randrange(0x2000 - size), size, r.randrange(1 << 8 * size))
        elif choice < 0.5:
            d.cfg_write(cap + 2, 2, r.randrange(1 << 16))
        elif choice < 0.6:
            d.mmio.read(pba + r.randrange(16), r.choice((1, 2, 4, 8)))
        elif choice < 0.8:
            set_vectors(d, r.choice((0, 1, 2, NO_VECTOR, r.randrange(1 << 16))), r.choice((0, 1, NO_VECTOR)))
        else:
            d.submit([(8, True)])
        assert d.fn.msix.pending < 1 << d.fn.msix.count
    assert d.msis                                        # some messages did leave


def test_intx_is_a_level_until_the_isr_read_and_follows_intx_disable():
    d = rng_driver()                                  # MSI-X left off: INTx
    gsi = d.irq.gsi
    d.submit([(8, True)])
    d.submit([(8, True)])                             # a second interrupt before the ISR read
    assert d.levels == [(gsi, 1)] and d.cfg_read(0x06, 2) & 0x8   # one rising edge; status says pending
    d.cfg_write(0x04, 2, d.cfg_read(0x04, 2) | 0x400)  # INTx disable: the line drops at once
    assert d.levels[-1] == (gsi, 0) and d.cfg_read(0x06, 2) & 0x8  # the status bit still tells
    d.cfg_write(0x04, 2, d.cfg_read(0x04, 2) & ~0x400)  # enabled again: still pending, so up again
    assert d.levels[-1] == (gsi, 1)
    assert d.read_isr() == 1 and d.levels[-1] == (gsi, 0)
    assert d.read_isr() == 0 and not d.cfg_read(0x06, 2) & 0x8
