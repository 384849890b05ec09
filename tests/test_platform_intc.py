"""The whole interrupt platform end to end: device IRQ -> PIC or IOAPIC ->
local APIC -> vector taken by a CPU, as the bt engine will drive it."""

import threading

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.platform.clock import NEVER, PIT_HZ, GuestClock, cpuid_15, ns_for_ticks
from pyvmm.devices.platform.intc import PlatformInterrupts
from pyvmm.errors import ConfigError

LAPIC = 0xFEE00000
IOAPIC = 0xFEC00000


@pytest.fixture
def pc():
    clock = GuestClock("deterministic")
    wakes = []
    intc = PlatformInterrupts(2, clock, on_wake=wakes.append)
    io, mmio = Bus("io", serialize=False), Bus("mmio", serialize=False)
    intc.attach(io, mmio)
    return intc, io, mmio, clock, wakes


def init_pic(io, imr_master, imr_slave=0xFF):
    for port, base, icw3 in ((0x20, 0x30, 4), (0xA0, 0x38, 2)):
        io.write(port, 1, 0x11)
        io.write(port + 1, 1, base)
        io.write(port + 1, 1, icw3)
        io.write(port + 1, 1, 0x01)
    io.write(0x21, 1, imr_master)
    io.write(0xA1, 1, imr_slave)


def switch_to_apic(intc, io, mmio, cpu=0):
    """What Linux does when it moves from the 8259 to the IOAPIC."""
    io.write(0x21, 1, 0xFF)
    io.write(0xA1, 1, 0xFF)
    intc.current_cpu = cpu
    mmio.write(LAPIC + 0xF0, 4, 0x1FF)            # software enable
    mmio.write(LAPIC + 0x350, 4, 0x10700)         # LINT0: ExtINT, masked


def route(mmio, pin, low, dest=0):
    mmio.write(IOAPIC, 4, 0x10 + 2 * pin)
    mmio.write(IOAPIC + 0x10, 4, low)
    mmio.write(IOAPIC, 4, 0x11 + 2 * pin)
    mmio.write(IOAPIC + 0x10, 4, dest << 24)


def test_isa_irq4_through_pic_before_apic(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xEB)                            # IRQ 2 and 4 unmasked
    intc.set_irq(4, 1)
    assert wakes == [0]                           # only the BSP's LINT0 is in virtual wire
    assert intc.pending(0) and not intc.pending(1)
    assert intc.acknowledge(0) == 0x34
    assert not intc.pending(0)
    io.write(0x20, 1, 0x20)
    intc.set_irq(4, 0)
    assert intc.acknowledge(0) == -1


def test_isa_irq4_through_ioapic_after(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xEB)
    switch_to_apic(intc, io, mmio)
    route(mmio, 4, 0x24)
    intc.set_irq(4, 1)
    assert not intc.pic.interrupt_pending()       # the PIC has it masked
    assert intc.pending(0)
    assert intc.acknowledge(0) == 0x24
    mmio.write(LAPIC + 0xB0, 4, 0)
    assert intc.lapics[0].isr == 0


def test_pit_irq0_arrives_on_ioapic_pin2(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xFE)
    switch_to_apic(intc, io, mmio)
    route(mmio, 0, 0x31)
    route(mmio, 2, 0x30)
    io.write(0x43, 1, 0x34)
    io.write(0x40, 1, 1193 & 0xFF)
    io.write(0x40, 1, 1193 >> 8)
    due = ns_for_ticks(1193, PIT_HZ)
    assert intc.next_deadline_ns() == due
    clock.advance_ns(due - 1)
    assert not intc.poll()
    clock.advance_ns(1)
    assert intc.poll()
    assert intc.acknowledge(0) == 0x30            # pin 2, per the MADT override
    assert intc.stats()["pit_irqs"] == 1


def test_pit_irq0_through_pic(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xFE)
    io.write(0x43, 1, 0x34)
    io.write(0x40, 1, 0x00)
    io.write(0x40, 1, 0x10)
    taken = 0
    for _ in range(50):
        clock.advance_instructions(100_000)      # 100 us at 1 ns per instruction
        intc.poll()
        if intc.pending(0):
            assert intc.acknowledge(0) == 0x30
            io.write(0x20, 1, 0x20)
            taken += 1
    # 5 ms of guest time at 1.193182 MHz / 4096: 1 period every ~3.43 ms
    assert taken == 1


def test_level_sci_redelivered_until_deasserted(pc):
    intc, io, mmio, clock, wakes = pc
    switch_to_apic(intc, io, mmio)
    route(mmio, 9, 0x8000 | 0x39)
    intc.set_irq(9, 1)
    assert intc.acknowledge(0) == 0x39
    mmio.write(LAPIC + 0xB0, 4, 0)
    assert intc.acknowledge(0) == 0x39            # still asserted
    intc.set_irq(9, 0)
    mmio.write(LAPIC + 0xB0, 4, 0)
    assert not intc.pending(0)


def test_globally_disabled_apic_passes_pic_through(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xFD)
    switch_to_apic(intc, io, mmio)
    io.write(0x21, 1, 0xFD)
    intc.set_irq(1, 1)
    assert not intc.pending(0)                    # LINT0 masked
    assert intc.lapics[0].write_msr(0x1B, 0xFEE00000)   # clear the global enable
    assert intc.pending(0)
    assert intc.acknowledge(0) == 0x31


def test_gsi_above_isa_goes_to_ioapic_only(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0x00, 0x00)
    switch_to_apic(intc, io, mmio, cpu=1)
    route(mmio, 20, 0x8000 | 0x50, dest=1)
    intc.set_irq(20, 1)
    assert intc.pic.master.irr == 0 and intc.pic.slave.irr == 0
    assert intc.pending(1) and intc.acknowledge(1) == 0x50
    with pytest.raises(ConfigError):
        intc.set_irq(24, 1)


def test_deadline_is_earliest_timer(pc):
    intc, io, mmio, clock, wakes = pc
    assert intc.next_deadline_ns() == NEVER
    switch_to_apic(intc, io, mmio, cpu=1)
    intc.current_cpu = 1
    mmio.write(LAPIC + 0x3E0, 4, 0xB)
    mmio.write(LAPIC + 0x320, 4, 0xEC)
    mmio.write(LAPIC + 0x380, 4, 500_000)
    io.write(0x43, 1, 0x30)
    io.write(0x40, 1, 0xFF)
    io.write(0x40, 1, 0xFF)
    assert intc.next_deadline_ns() == 500_000
    clock.advance_to(intc.next_deadline_ns())     # an idle vCPU skipping ahead
    assert intc.poll()
    assert intc.acknowledge(1) == 0xEC
    assert intc.next_deadline_ns() == ns_for_ticks(0xFFFF, PIT_HZ)


def test_current_cpu_is_per_thread(pc):
    intc, io, mmio, clock, wakes = pc
    intc.current_cpu = 0
    seen = []

    def vcpu1():
        intc.current_cpu = 1
        seen.append(mmio.read(LAPIC + 0x20, 4))

    t = threading.Thread(target=vcpu1)
    t.start()
    t.join()
    assert seen == [1 << 24]
    assert mmio.read(LAPIC + 0x20, 4) == 0


def test_placement_leaves_room_for_i8042(pc):
    intc, io, mmio, clock, wakes = pc
    kbd = I8042(on_reset=lambda: None)
    for offset, length, part in kbd.ranges():
        io.insert(0x60 + offset, length, part, "i8042")
    names = {name for base, length, name in io.devices()}
    assert {"pic-master", "pic-slave", "elcr", "pit", "port61", "i8042"} <= names
    assert {name for base, length, name in mmio.devices()} == {"ioapic", "lapic"}


def test_clock_cpuid_and_tsc(pc):
    intc, io, mmio, clock, wakes = pc
    eax, ebx, ecx, edx = cpuid_15()
    clock.advance_instructions(1000)
    assert clock.now_ns() == 1000
    assert clock.tsc() == 1000 * ecx * ebx // eax // 1_000_000_000
    state = clock.save()
    other = GuestClock("deterministic")
    other.restore(state)
    assert other.now_ns() == 1000


def test_whole_state_round_trip(pc):
    intc, io, mmio, clock, wakes = pc
    init_pic(io, 0xEB)
    intc.set_irq(4, 1)
    other = PlatformInterrupts(2, clock)
    other.restore(intc.save())
    assert other.acknowledge(0) == 0x34
