"""Local APICs and the IOAPIC driven through the MMIO bus at 0xFEE00000 and
0xFEC00000, on a deterministic clock."""

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.platform.clock import NEVER, TSC_HZ, GuestClock
from pyvmm.devices.platform.intc import PlatformInterrupts

LAPIC = 0xFEE00000
IOAPIC = 0xFEC00000
MS = 1_000_000


class Board:
    def __init__(self, ncpus=2):
        self.clock = GuestClock("deterministic")
        self.inits, self.sipis, self.wakes = [], [], []
        self.intc = PlatformInterrupts(ncpus, self.clock, on_init=self.inits.append,
                                       on_sipi=lambda cpu, v: self.sipis.append((cpu, v)),
                                       on_wake=self.wakes.append)
        self.io = Bus("io", serialize=False)
        self.mmio = Bus("mmio", serialize=False)
        self.intc.attach(self.io, self.mmio)

    def apic_write(self, cpu, reg, value):
        self.intc.current_cpu = cpu
        self.mmio.write(LAPIC + reg, 4, value)

    def apic_read(self, cpu, reg):
        self.intc.current_cpu = cpu
        return self.mmio.read(LAPIC + reg, 4)

    def enable(self, cpu):
        self.apic_write(cpu, 0xF0, 0x1FF)

    def io_write(self, reg, value):
        self.mmio.write(IOAPIC, 4, reg)
        self.mmio.write(IOAPIC + 0x10, 4, value)

    def io_read(self, reg):
        self.mmio.write(IOAPIC, 4, reg)
        return self.mmio.read(IOAPIC + 0x10, 4)

    def advance(self, ns):
        self.clock.advance_ns(ns)
        self.intc.poll()

    def take(self, cpu):
        assert self.intc.pending(cpu)
        return self.intc.acknowledge(cpu)

    def eoi(self, cpu):
        self.apic_write(cpu, 0xB0, 0)


@pytest.fixture
def board():
    b = Board()
    b.enable(0)
    b.enable(1)
    return b


def test_id_version_and_per_cpu_window(board):
    assert board.apic_read(0, 0x20) == 0
    assert board.apic_read(1, 0x20) == 1 << 24
    assert board.apic_read(0, 0x30) & 0xFF == 0x14
    board.apic_write(1, 0x80, 0x20)
    assert board.apic_read(1, 0x80) == 0x20 and board.apic_read(0, 0x80) == 0


def test_timer_one_shot(board):
    board.apic_write(0, 0x3E0, 0xB)               # divide by 1: one tick per ns
    board.apic_write(0, 0x320, 0xEC)              # one-shot, vector 0xEC
    board.apic_write(0, 0x380, 1 * MS)
    assert board.intc.next_deadline_ns() == 1 * MS
    board.advance(MS // 2)
    assert board.apic_read(0, 0x390) == MS // 2
    assert not board.intc.pending(0)
    board.advance(MS // 2)
    assert board.take(0) == 0xEC
    board.advance(5 * MS)
    assert board.apic_read(0, 0x390) == 0
    assert not board.intc.lapics[0].irr
    assert board.intc.next_deadline_ns() == NEVER


def test_timer_periodic_with_divider(board):
    board.apic_write(0, 0x3E0, 0x3)               # divide by 16
    board.apic_write(0, 0x320, 0x20000 | 0xEF)
    board.apic_write(0, 0x380, 62_500)            # 62_500 * 16 ns = 1 ms
    fired = 0
    for _ in range(200):
        board.advance(MS // 20)
        if board.intc.pending(0):
            assert board.intc.acknowledge(0) == 0xEF
            board.eoi(0)
            fired += 1
    assert fired == 10
    assert board.intc.lapics[0].timer_fired == 10


def test_timer_tsc_deadline(board):
    lapic = board.intc.lapics[0]
    board.apic_write(0, 0x320, 0x40000 | 0xEC)
    board.apic_write(0, 0x380, 12345)             # ignored in TSC-deadline mode
    assert board.intc.next_deadline_ns() == NEVER
    deadline = board.clock.tsc() + TSC_HZ // 1000   # 1 ms ahead
    assert lapic.write_msr(0x6E0, deadline)
    assert lapic.read_msr(0x6E0) == deadline
    board.advance(MS - 1)
    assert not board.intc.pending(0)
    board.advance(1)
    assert board.take(0) == 0xEC
    assert lapic.read_msr(0x6E0) == 0             # disarmed after firing


def test_masked_timer_counts_without_interrupt(board):
    board.apic_write(0, 0x3E0, 0xB)
    board.apic_write(0, 0x320, 0x10000 | 0xEC)
    board.apic_write(0, 0x380, 1000)
    board.advance(2000)
    assert not board.intc.pending(0)


def test_tpr_ppr_masking(board):
    lapic = board.intc.lapics[0]
    lapic.accept(0x51)
    board.apic_write(0, 0x80, 0x60)
    assert board.apic_read(0, 0xA0) == 0x60
    assert not board.intc.pending(0)
    board.apic_write(0, 0x80, 0x50)               # same class: still blocked
    assert not board.intc.pending(0)
    board.apic_write(0, 0x80, 0x40)
    assert board.take(0) == 0x51
    assert board.apic_read(0, 0xA0) == 0x50       # PPR follows the in-service class


def test_eoi_order(board):
    lapic = board.intc.lapics[0]
    lapic.accept(0x40)
    lapic.accept(0x80)
    assert board.take(0) == 0x80
    lapic.accept(0x70)
    assert not board.intc.pending(0)              # class 7 below the in-service 8
    assert board.apic_read(0, 0x100 + 4 * 16) == 1    # ISR bit 0x80 (word 4, bit 0)
    board.eoi(0)
    assert board.take(0) == 0x70
    board.eoi(0)
    assert board.take(0) == 0x40
    board.eoi(0)
    assert lapic.isr == 0 and lapic.irr == 0


def test_fixed_ipi_physical_logical_and_shorthands(board):
    board.apic_write(0, 0x310, 1 << 24)
    board.apic_write(0, 0x300, 0x4041)            # fixed, vector 0x41, to APIC 1
    assert not board.intc.pending(0)
    assert board.take(1) == 0x41
    assert 1 in board.wakes
    board.eoi(1)
    board.apic_write(1, 0xD0, 0x02000000)         # logical flat: APIC 1 is bit 1
    board.apic_write(0, 0x310, 0x02 << 24)
    board.apic_write(0, 0x300, 0x4842)            # logical destination
    assert board.take(1) == 0x42
    board.eoi(1)
    board.apic_write(1, 0x300, 0xC4043)           # all excluding self
    assert board.take(0) == 0x43 and not board.intc.pending(1)
    board.eoi(0)
    board.apic_write(1, 0x300, 0x44044)           # self
    assert board.take(1) == 0x44 and not board.intc.pending(0)
    board.eoi(1)
    board.apic_write(0, 0x300, 0x84045)           # all including self
    assert board.take(0) == 0x45 and board.take(1) == 0x45


def test_init_sipi_and_nmi(board):
    board.apic_write(0, 0x310, 1 << 24)
    board.apic_write(0, 0x300, 0xC500)            # INIT assert, level
    assert board.inits == [1]
    assert board.apic_read(1, 0xF0) == 0xFF       # INIT left APIC 1 software-disabled
    board.apic_write(0, 0x300, 0x8500)            # INIT de-assert: nothing
    assert board.inits == [1]
    board.apic_write(0, 0x300, 0x4608)            # SIPI, start page 0x8000
    assert board.sipis == [(1, 0x08)]
    board.apic_write(0, 0x300, 0x4400)            # NMI
    assert board.intc.take_nmi(1) and not board.intc.take_nmi(1)
    assert not board.intc.take_nmi(0)


def test_software_disable_masks_lvt_and_drops_fixed(board):
    board.apic_write(0, 0xF0, 0xFF)
    board.apic_write(0, 0x320, 0xEC)
    assert board.apic_read(0, 0x320) & 0x10000
    board.intc.lapics[0].accept(0x60)
    assert not board.intc.pending(0)


def test_ioapic_registers(board):
    assert board.io_read(0x01) == 0x170011
    assert board.io_read(0x00) == 2 << 24         # id = ncpus, as the MADT says
    assert board.io_read(0x10) == 0x10000         # pins start masked
    board.io_write(0x12, 0xA031)
    board.io_write(0x13, 0x01000000)
    assert board.io_read(0x12) == 0xA031 and board.io_read(0x13) == 0x01000000


def test_ioapic_edge_to_lapic(board):
    board.io_write(0x10 + 2 * 4, 0x34)            # pin 4 edge, vector 0x34, to APIC 0
    board.io_write(0x11 + 2 * 4, 0)
    board.intc.ioapic.set_irq(4, 1)
    assert board.take(0) == 0x34
    board.eoi(0)
    board.intc.ioapic.set_irq(4, 1)               # no new edge
    assert not board.intc.pending(0)
    board.intc.ioapic.set_irq(4, 0)
    board.intc.ioapic.set_irq(4, 1)
    assert board.take(0) == 0x34


def test_ioapic_level_redelivers_after_eoi(board):
    ioapic = board.intc.ioapic
    board.io_write(0x10 + 2 * 10, 0x10000 | 0x8000 | 0x55)   # masked, level
    board.io_write(0x11 + 2 * 10, 1 << 24)                  # to APIC 1
    ioapic.set_irq(10, 1)
    assert not board.intc.pending(1)
    board.io_write(0x10 + 2 * 10, 0x8000 | 0x55)            # unmask while asserted
    assert board.take(1) == 0x55
    assert board.io_read(0x10 + 2 * 10) & 0x4000            # remote IRR
    assert board.apic_read(1, 0x180 + 2 * 16) & (1 << (0x55 - 64))  # TMR
    ioapic.set_irq(10, 1)
    assert not board.intc.pending(1)                        # remote IRR blocks
    board.eoi(1)                                            # still high: again
    assert board.take(1) == 0x55
    ioapic.set_irq(10, 0)
    board.eoi(1)
    assert not board.intc.pending(1)
    assert not board.io_read(0x10 + 2 * 10) & 0x4000
    assert ioapic.delivered == 2


def test_x2apic_msrs(board):
    lapic = board.intc.lapics[1]
    assert lapic.read_msr(0x802) is None           # xAPIC mode: #GP
    assert lapic.write_msr(0x1B, 0xFEE00000 | 0xC00)
    assert lapic.read_msr(0x802) == 1
    assert board.apic_read(1, 0x20) == 0xFFFFFFFF   # MMIO gone in x2APIC mode
    assert lapic.write_msr(0x83F, 0x61)             # self IPI
    assert board.take(1) == 0x61
    assert lapic.write_msr(0x80B, 0)                # EOI
    assert lapic.isr == 0
    assert not lapic.write_msr(0x802, 5)            # ID is read-only


def test_state_round_trip(board):
    board.apic_write(0, 0x3E0, 0xB)
    board.apic_write(0, 0x320, 0xEC)
    board.apic_write(0, 0x380, 1000)
    board.intc.lapics[0].accept(0x70)
    state = board.intc.save()
    other = Board()
    other.intc.restore(state)
    assert other.intc.next_deadline_ns() == 1000
    assert other.take(0) == 0x70
