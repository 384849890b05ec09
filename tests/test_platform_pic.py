"""8259A pair driven through an I/O bus at the PC ports, as Linux programs it."""

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.platform.pic import PicPair


@pytest.fixture
def pc():
    pair = PicPair()
    bus = Bus("io", serialize=False)
    for base, length, dev, name in pair.ranges():
        bus.insert(base, length, dev, name)
    return pair, bus


def linux_init(bus, imr_master=0xFB, imr_slave=0xFF):
    """init_8259A() of arch/x86/kernel/i8259.c: ICW1..4 on both chips."""
    bus.write(0x21, 1, 0xFF)
    bus.write(0xA1, 1, 0xFF)
    bus.write(0x20, 1, 0x11)   # ICW1: edge, cascade, ICW4
    bus.write(0x21, 1, 0x30)   # ICW2: vectors 0x30-0x37
    bus.write(0x21, 1, 0x04)   # ICW3: slave on IR2
    bus.write(0x21, 1, 0x01)   # ICW4: 8086, normal EOI
    bus.write(0xA0, 1, 0x11)
    bus.write(0xA1, 1, 0x38)
    bus.write(0xA1, 1, 0x02)
    bus.write(0xA1, 1, 0x01)
    bus.write(0x21, 1, imr_master)
    bus.write(0xA1, 1, imr_slave)


def read_irr_isr(bus, port):
    bus.write(port, 1, 0x0A)
    irr = bus.read(port, 1)
    bus.write(port, 1, 0x0B)
    isr = bus.read(port, 1)
    return irr, isr


def test_init_sequence_sets_vectors_and_masks(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0x00)
    assert pair.master.base == 0x30 and pair.slave.base == 0x38
    assert pair.master.init_step == 0 and pair.slave.init_step == 0
    assert bus.read(0x21, 1) == 0x00 and bus.read(0xA1, 1) == 0x00
    pair.set_irq(4, 1)
    assert pair.interrupt_pending()
    assert pair.acknowledge() == 0x34


def test_mask_holds_request_until_unmasked(pc):
    pair, bus = pc
    linux_init(bus, 0xFF, 0xFF)
    pair.set_irq(1, 1)
    assert not pair.interrupt_pending()
    assert read_irr_isr(bus, 0x20) == (0x02, 0x00)
    bus.write(0x21, 1, 0xFD)
    assert pair.interrupt_pending()
    assert pair.acknowledge() == 0x31
    assert read_irr_isr(bus, 0x20) == (0x00, 0x02)


def test_priority_and_eoi_order(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0xFF)
    pair.set_irq(5, 1)
    pair.set_irq(3, 1)
    assert pair.acknowledge() == 0x33          # IR3 beats IR5
    assert not pair.interrupt_pending()        # IR5 waits behind IR3 in service
    pair.set_irq(1, 1)
    assert pair.interrupt_pending()            # IR1 nests above IR3
    assert pair.acknowledge() == 0x31
    assert read_irr_isr(bus, 0x20)[1] == 0x0A
    bus.write(0x20, 1, 0x20)                   # non-specific EOI retires IR1
    assert read_irr_isr(bus, 0x20)[1] == 0x08
    bus.write(0x20, 1, 0x63)                   # specific EOI for IR3
    assert read_irr_isr(bus, 0x20)[1] == 0x00
    assert pair.acknowledge() == 0x35


def test_edge_vs_level_via_elcr(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0x00)
    # Edge (default): a pulse is latched; the line staying high gives one interrupt.
    pair.set_irq(10, 1)
    assert pair.acknowledge() == 0x3A
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    assert not pair.interrupt_pending()
    pair.set_irq(10, 0)
    # Level: ELCR bit 10 (0x4D1 bit 2); the request re-appears after EOI while high.
    bus.write(0x4D1, 1, 0x04)
    assert bus.read(0x4D1, 1) == 0x04
    pair.set_irq(10, 1)
    assert pair.acknowledge() == 0x3A
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    assert pair.interrupt_pending()
    assert pair.acknowledge() == 0x3A
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    pair.set_irq(10, 0)                        # deasserted: request gone
    assert not pair.interrupt_pending()
    assert read_irr_isr(bus, 0xA0) == (0x00, 0x00)


def test_elcr_fixed_edge_bits(pc):
    pair, bus = pc
    bus.write(0x4D0, 1, 0xFF)
    bus.write(0x4D1, 1, 0xFF)
    assert bus.read(0x4D0, 1) == 0xF8          # IRQ 0, 1, 2 are always edge
    assert bus.read(0x4D1, 1) == 0xDE          # IRQ 8 and 13 too


def test_cascade_slave_through_ir2(pc):
    pair, bus = pc
    linux_init(bus, 0xFB, 0x00)
    pair.set_irq(12, 1)
    pair.set_irq(9, 1)
    assert pair.interrupt_pending()
    assert pair.acknowledge() == 0x39          # IRQ 9 first
    assert read_irr_isr(bus, 0x20)[1] == 0x04  # master has IR2 in service
    assert read_irr_isr(bus, 0xA0)[1] == 0x02
    assert not pair.interrupt_pending()
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    assert pair.acknowledge() == 0x3C          # then IRQ 12
    # Masking IR2 on the master hides the slave entirely.
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    bus.write(0x21, 1, 0xFF)
    pair.set_irq(11, 1)
    assert not pair.interrupt_pending()


def test_spurious_irq7_and_irq15(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0x00)
    pair.set_irq(3, 1)
    assert pair.interrupt_pending()
    bus.write(0x21, 1, 0x08)                   # masked between INTR and INTA
    assert pair.acknowledge() == 0x37
    assert read_irr_isr(bus, 0x20)[1] == 0x00  # a spurious IRQ 7 sets no ISR bit
    bus.write(0x21, 1, 0x00)
    bus.write(0x20, 1, 0x20)                   # retire IR3 after taking it
    # Slave request vanishing after the master's ack: IRQ 15's vector.
    pair.acknowledge()
    bus.write(0x20, 1, 0x20)
    pair.set_irq(8, 1)
    pair.slave.irr = 0
    assert pair.acknowledge() == 0x3F
    assert read_irr_isr(bus, 0xA0)[1] == 0x00


def test_auto_eoi_and_poll(pc):
    pair, bus = pc
    bus.write(0x20, 1, 0x11)
    bus.write(0x21, 1, 0x20)
    bus.write(0x21, 1, 0x04)
    bus.write(0x21, 1, 0x03)                   # ICW4: auto-EOI
    bus.write(0x21, 1, 0x00)
    pair.set_irq(6, 1)
    assert pair.acknowledge() == 0x26
    assert read_irr_isr(bus, 0x20) == (0x00, 0x00)
    # Poll command: the read acknowledges and returns 0x80 | IR.
    pair.set_irq(5, 1)
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0x85
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0x00


def test_rotate_on_eoi_changes_priority(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0xFF)
    pair.set_irq(1, 1)
    assert pair.acknowledge() == 0x31
    bus.write(0x20, 1, 0xA0)                   # rotate on non-specific EOI: IR1 lowest
    pair.set_irq(1, 0)
    pair.set_irq(1, 1)
    pair.set_irq(4, 1)
    assert pair.acknowledge() == 0x34          # IR4 now outranks IR1


def test_special_mask_mode(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0xFF)
    pair.set_irq(2 + 1, 1)
    assert pair.acknowledge() == 0x33
    pair.set_irq(5, 1)
    assert not pair.interrupt_pending()
    bus.write(0x21, 1, 0x08)                   # mask IR3 (in service) ...
    bus.write(0x20, 1, 0x68)                   # ... and set special mask mode
    assert pair.interrupt_pending()
    assert pair.acknowledge() == 0x35


def test_state_round_trip(pc):
    pair, bus = pc
    linux_init(bus, 0x00, 0x00)
    pair.set_irq(9, 1)
    state = pair.save()
    other = PicPair()
    other.restore(state)
    assert other.interrupt_pending()
    assert other.acknowledge() == 0x39
