"""8254 PIT and port 0x61 driven through an I/O bus, on a deterministic clock."""

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.platform.clock import NEVER, PIT_HZ, GuestClock, ns_for_ticks
from pyvmm.devices.platform.pit import Pit

US = 1_000
MS = 1_000_000


class Pulses:
    def __init__(self):
        self.count = 0

    def pulse(self):
        self.count += 1


@pytest.fixture
def pc():
    clock = GuestClock("deterministic")
    irq = Pulses()
    pit = Pit(clock, irq)
    bus = Bus("io", serialize=False)
    for base, length, dev, name in pit.ranges():
        bus.insert(base, length, dev, name)
    return clock, pit, bus, irq


def run(clock, pit, total_ns, step_ns):
    for _ in range(total_ns // step_ns):
        clock.advance_ns(step_ns)
        pit.poll(clock.now_ns())


def program(bus, counter, control, count):
    bus.write(0x43, 1, control)
    bus.write(0x40 + counter, 1, count & 0xFF)
    bus.write(0x40 + counter, 1, count >> 8)


@pytest.mark.parametrize("control", [0x34, 0x36])  # mode 2 (Linux periodic), mode 3
def test_periodic_modes_fire_once_per_period(pc, control):
    clock, pit, bus, irq = pc
    latch = (PIT_HZ + 500) // 1000                # HZ=1000, as Linux's LATCH
    program(bus, 0, control, latch)
    first = pit.next_deadline_ns()
    assert first == ns_for_ticks(latch, PIT_HZ)
    run(clock, pit, 100 * MS, 50 * US)
    expected = (100 * MS * PIT_HZ // 1_000_000_000) // latch
    assert expected == 100
    assert irq.count == expected
    assert pit.next_deadline_ns() > clock.now_ns()


def test_missed_periods_are_one_pulse(pc):
    clock, pit, bus, irq = pc
    program(bus, 0, 0x34, 1193)
    clock.advance_ns(10 * MS)
    assert pit.poll(clock.now_ns())
    assert irq.count == 1
    assert pit.counters[0].edges == 10


def test_mode0_fires_once(pc):
    clock, pit, bus, irq = pc
    program(bus, 0, 0x30, 1000)
    due = ns_for_ticks(1000, PIT_HZ)
    assert pit.next_deadline_ns() == due
    clock.advance_ns(due - 1)
    assert not pit.poll(clock.now_ns())
    clock.advance_ns(1)
    assert pit.poll(clock.now_ns())
    run(clock, pit, 20 * MS, 100 * US)
    assert irq.count == 1
    assert pit.next_deadline_ns() == NEVER


def test_counter_latch_freezes_value(pc):
    clock, pit, bus, irq = pc
    program(bus, 0, 0x34, 0x1000)
    clock.advance_ns(ns_for_ticks(0x100, PIT_HZ))
    bus.write(0x43, 1, 0x00)                      # latch counter 0
    clock.advance_ns(ns_for_ticks(0x200, PIT_HZ))
    lo, hi = bus.read(0x40, 1), bus.read(0x40, 1)
    assert lo | hi << 8 == 0x1000 - 0x100
    lo, hi = bus.read(0x40, 1), bus.read(0x40, 1)  # unlatched: live count
    assert lo | hi << 8 == 0x1000 - 0x300


def test_read_back_status_then_count(pc):
    clock, pit, bus, irq = pc
    program(bus, 2, 0xB0, 500)                   # counter 2, lo/hi, mode 0 (gate low)
    bus.write(0x61, 1, 0x01)                     # gate high: counting starts
    clock.advance_ns(ns_for_ticks(100, PIT_HZ))
    bus.write(0x43, 1, 0xC8)                     # read-back: count and status of counter 2
    status = bus.read(0x42, 1)
    assert status == 0x30                        # OUT low, count loaded, lo/hi, mode 0, binary
    assert bus.read(0x42, 1) | bus.read(0x42, 1) << 8 == 400
    clock.advance_ns(ns_for_ticks(400, PIT_HZ))
    bus.write(0x43, 1, 0xE8)                     # status only
    assert bus.read(0x42, 1) == 0xB0             # OUT now high


def test_null_count_before_load(pc):
    clock, pit, bus, irq = pc
    bus.write(0x43, 1, 0x34)
    bus.write(0x43, 1, 0xE2)
    assert bus.read(0x40, 1) == 0xF4             # OUT high, null count, lo/hi, mode 2


def test_pit_calibrate_tsc_sequence(pc):
    """Linux's pit_calibrate_tsc(): counter 2 mode 0 with the gate on port
    0x61, spinning until port 0x61 bit 5 (OUT2) goes high after 50 ms."""
    clock, pit, bus, irq = pc
    bus.write(0x61, 1, (bus.read(0x61, 1) & ~0x02) | 0x01)
    latch = PIT_HZ // (1000 // 50)
    bus.write(0x43, 1, 0xB0)
    bus.write(0x42, 1, latch & 0xFF)
    bus.write(0x42, 1, latch >> 8)
    start = clock.now_ns()
    loops = 0
    while not bus.read(0x61, 1) & 0x20:
        clock.advance_ns(US)
        loops += 1
        assert loops < 100_000
    elapsed = clock.now_ns() - start
    assert ns_for_ticks(latch, PIT_HZ) <= elapsed < ns_for_ticks(latch, PIT_HZ) + US
    assert irq.count == 0                        # counter 2 has no IRQ


def test_quick_pit_calibrate_msb_reads(pc):
    """quick_pit_calibrate(): counter 2 mode 0 from 0xFFFF, reading the
    LSB then MSB with plain inb(0x42) pairs."""
    clock, pit, bus, irq = pc
    bus.write(0x61, 1, (bus.read(0x61, 1) & ~0x02) | 0x01)
    program(bus, 2, 0xB0, 0xFFFF)
    msbs = []
    for _ in range(5):
        bus.read(0x42, 1)
        msbs.append(bus.read(0x42, 1))
        clock.advance_ns(ns_for_ticks(256, PIT_HZ))
    assert msbs == [0xFF, 0xFE, 0xFD, 0xFC, 0xFB]


def test_gate_low_holds_counter2_and_refresh_toggles(pc):
    clock, pit, bus, irq = pc
    bus.write(0x61, 1, 0x01)
    program(bus, 2, 0xB0, 1000)
    clock.advance_ns(ns_for_ticks(100, PIT_HZ))
    bus.write(0x61, 1, 0x00)                     # gate low: counting pauses
    clock.advance_ns(ns_for_ticks(5000, PIT_HZ))
    assert not bus.read(0x61, 1) & 0x20
    bus.write(0x43, 1, 0x80)
    assert bus.read(0x42, 1) | bus.read(0x42, 1) << 8 == 900
    bus.write(0x61, 1, 0x01)                     # resumes where it stopped
    clock.advance_ns(ns_for_ticks(900, PIT_HZ))
    first = bus.read(0x61, 1)
    assert first & 0x21 == 0x21
    second = bus.read(0x61, 1)
    assert (first ^ second) & 0x10               # refresh bit toggles


def test_mode2_gate_and_speaker_out(pc):
    clock, pit, bus, irq = pc
    bus.write(0x61, 1, 0x03)
    program(bus, 2, 0xB4, 10)                    # counter 2 mode 2
    outs = []
    for _ in range(10):
        outs.append(bool(bus.read(0x61, 1) & 0x20))
        clock.advance_ns(ns_for_ticks(1, PIT_HZ) + 1)
    assert outs.count(False) == 1                # low for one clock per period


def test_state_round_trip(pc):
    clock, pit, bus, irq = pc
    program(bus, 0, 0x34, 1193)
    clock.advance_ns(MS // 2)
    other = Pit(clock, Pulses())
    other.restore(pit.save())
    assert other.next_deadline_ns() == pit.next_deadline_ns()
    assert other.counters[0].count_and_out(clock.now_ns()) == pit.counters[0].count_and_out(clock.now_ns())
