"""Legacy PC devices driven through an I/O Bus at their real ports, no guest."""

import calendar

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.legacy import DebugExit, I8042, Port80, Rtc, Serial8250
from pyvmm.devices.legacy import serial8250 as u
from pyvmm.irq import IrqLine

COM1 = 0x3F8
THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = (COM1 + o for o in (0, 1, 2, 2, 3, 4, 5, 6, 7))


@pytest.fixture
def uart():
    bus = Bus("io")
    irq = IrqLine(4)
    out = bytearray()
    dev = Serial8250(irq, out.extend)
    bus.insert(COM1, 8, dev, "com1")
    return bus, dev, irq, out


# --- 16550A ----------------------------------------------------------------

def test_uart_thr_output_and_lsr(uart):
    bus, dev, irq, out = uart
    for b in b"hi\n":
        bus.write(THR, 1, b)
    assert bytes(out) == b"hi\n"
    lsr = bus.read(LSR, 1)
    assert lsr & u.LSR_THRE and lsr & u.LSR_TEMT
    assert not lsr & u.LSR_DR
    assert bus.read(IIR, 1) == u.IIR_NO_INT


def test_uart_scratch_and_ier_mask(uart):
    bus, *_ = uart
    bus.write(SCR, 1, 0xA5)
    assert bus.read(SCR, 1) == 0xA5
    bus.write(IER, 1, 0xFF)
    assert bus.read(IER, 1) == 0x0F  # only the four 16550 enable bits stick


def test_uart_divisor_latch(uart):
    bus, dev, _, out = uart
    bus.write(LCR, 1, 0x83)  # DLAB + 8N1
    bus.write(THR, 1, 0x01)  # DLL
    bus.write(IER, 1, 0x00)  # DLM
    assert dev.divisor == 1
    assert bus.read(THR, 1) == 0x01 and bus.read(IER, 1) == 0
    bus.write(LCR, 1, 0x03)
    bus.write(THR, 1, ord("A"))
    assert bytes(out) == b"A"
    assert bus.read(LCR, 1) == 0x03


def test_uart_fifo_reporting(uart):
    bus, *_ = uart
    assert bus.read(IIR, 1) & 0xC0 == 0
    bus.write(FCR, 1, 0xC7)  # enable, clear both, trigger 14
    assert bus.read(IIR, 1) & 0xC0 == 0xC0
    assert bus.read(IIR, 1) & 0x30 == 0  # not a 16750
    bus.write(FCR, 1, 0)
    assert bus.read(IIR, 1) & 0xC0 == 0


def test_uart_thre_interrupt_after_enabling_etbei(uart):
    bus, dev, irq, _ = uart
    bus.write(MCR, 1, u.MCR_OUT2)
    assert irq.level == 0
    bus.write(IER, 1, u.IER_ETBEI)
    assert irq.level == 1
    assert bus.read(IIR, 1) & 0x0F == u.IIR_THRI
    # Reading IIR acknowledged it.
    assert irq.level == 0
    assert bus.read(IIR, 1) & 0x0F == u.IIR_NO_INT
    # A THR write re-arms it (the byte leaves at once)...
    bus.write(THR, 1, ord("x"))
    assert irq.level == 1
    # ...and so does writing IER again with ETBEI set.
    bus.read(IIR, 1)
    assert irq.level == 0
    bus.write(IER, 1, 0)
    bus.write(IER, 1, u.IER_ETBEI)
    assert irq.level == 1
    bus.write(IER, 1, 0)
    assert irq.level == 0


def test_uart_irq_gated_by_out2(uart):
    bus, dev, irq, _ = uart
    bus.write(IER, 1, u.IER_ETBEI)
    assert irq.level == 0
    assert bus.read(IIR, 1) & 0x0F == u.IIR_THRI  # pending, but not on the wire
    bus.write(IER, 1, u.IER_ETBEI)
    bus.write(MCR, 1, u.MCR_OUT2)
    assert irq.level == 1


def test_uart_rx_data_interrupt_and_dr(uart):
    bus, dev, irq, _ = uart
    bus.write(MCR, 1, u.MCR_OUT2 | u.MCR_DTR | u.MCR_RTS)
    bus.write(IER, 1, u.IER_ERBFI)
    assert irq.level == 0
    assert dev.receive(b"ok") == 2
    assert irq.level == 1
    assert bus.read(LSR, 1) & u.LSR_DR
    assert bus.read(IIR, 1) & 0x0F == u.IIR_RDI
    assert bus.read(THR, 1) == ord("o")
    assert irq.level == 1
    assert bus.read(THR, 1) == ord("k")
    assert irq.level == 0
    assert not bus.read(LSR, 1) & u.LSR_DR


def test_uart_fifo_trigger_level_reports_timeout_below_it(uart):
    bus, dev, irq, _ = uart
    bus.write(FCR, 1, 0x81)  # FIFO on, trigger level 8
    bus.write(IER, 1, u.IER_ERBFI)
    dev.receive(b"abc")
    assert bus.read(IIR, 1) == 0xC0 | u.IIR_CTI
    dev.receive(b"defgh")
    assert bus.read(IIR, 1) == 0xC0 | u.IIR_RDI


def test_uart_priorities(uart):
    bus, dev, irq, _ = uart
    bus.write(MCR, 1, u.MCR_OUT2)
    bus.write(IER, 1, u.IER_ERBFI | u.IER_ETBEI | u.IER_ELSI | u.IER_EDSSI)
    # Fill the buffer past its end: overrun (line status) outranks data.
    dev.receive(b"\x00" * (u.RX_BUFFER_SIZE + 1))
    assert bus.read(IIR, 1) & 0x0F == u.IIR_RLSI
    lsr = bus.read(LSR, 1)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    assert not bus.read(LSR, 1) & u.LSR_OE  # reading LSR cleared OE
    assert bus.read(IIR, 1) & 0x0F == u.IIR_RDI
    for _ in range(u.RX_BUFFER_SIZE):
        bus.read(THR, 1)
    assert bus.read(IIR, 1) & 0x0F == u.IIR_THRI
    # Modem status comes last: entering loopback with DTR low drops DSR.
    bus.write(MCR, 1, u.MCR_OUT2 | u.MCR_LOOP | u.MCR_RTS)
    assert bus.read(IIR, 1) & 0x0F == u.IIR_MSI
    msr = bus.read(MSR, 1)
    assert msr & 0x0F == u.MSR_DDSR
    assert msr & 0xF0 == u.MSR_CTS | u.MSR_DCD
    assert bus.read(IIR, 1) & 0x0F == u.IIR_NO_INT
    assert irq.level == 0


def test_uart_loopback_like_linux_probe(uart):
    bus, dev, _, out = uart
    # Linux's autoconfig: MCR = LOOP | OUT2 | RTS must read MSR top nibble 0x90.
    bus.write(MCR, 1, u.MCR_LOOP | 0x0A)
    assert bus.read(MSR, 1) & 0xF0 == 0x90
    bus.write(MCR, 1, u.MCR_LOOP | u.MCR_DTR | u.MCR_OUT1)
    assert bus.read(MSR, 1) & 0xF0 == u.MSR_DSR | u.MSR_RI
    # Transmitted bytes come back to the receiver, not the output.
    bus.write(THR, 1, 0x5A)
    assert out == b""
    assert bus.read(LSR, 1) & u.LSR_DR
    assert bus.read(THR, 1) == 0x5A
    # Host input is ignored while looped back.
    assert dev.receive(b"zz") == 0
    bus.write(MCR, 1, 0)
    assert bus.read(MSR, 1) & 0xF0 == u.MSR_HOST_CONNECTED


def test_uart_state_roundtrip(uart):
    bus, dev, irq, _ = uart
    bus.write(MCR, 1, u.MCR_OUT2)
    bus.write(IER, 1, u.IER_ERBFI)
    bus.write(SCR, 1, 7)
    dev.receive(b"abc")
    state = dev.save()
    other = Serial8250(IrqLine(4), lambda b: None)
    other.restore(state)
    assert other.save() == state
    assert other.irq.level == 1
    assert other.read(0, 1) == ord("a")
    dev.reset()
    assert bus.read(SCR, 1) == 0 and irq.level == 0


# --- i8042 -----------------------------------------------------------------

@pytest.fixture
def kbd():
    bus = Bus("io")
    resets = []
    irq1, irq12 = IrqLine(1), IrqLine(12)
    dev = I8042(lambda: resets.append(1), irq1, irq12)
    for offset, length, d in dev.ranges():
        bus.insert(0x60 + offset, length, d)
    return bus, dev, resets, irq1, irq12


def test_i8042_leaves_port_61_free(kbd):
    bus, *_ = kbd
    assert bus.find(0x61) is None and bus.find(0x60) and bus.find(0x64)


def test_i8042_self_test_and_interface_test(kbd):
    bus, dev, _, irq1, _ = kbd
    bus.write(0x64, 1, 0xAA)
    assert bus.read(0x64, 1) & 0x01  # OBF
    assert irq1.level == 1
    assert bus.read(0x60, 1) == 0x55
    assert irq1.level == 0
    assert bus.read(0x64, 1) & 0x04  # system flag
    bus.write(0x64, 1, 0xAB)
    assert bus.read(0x60, 1) == 0x00
    assert not bus.read(0x64, 1) & 0x01


def test_i8042_command_byte_and_port_enables(kbd):
    bus, *_ = kbd
    bus.write(0x64, 1, 0x60)
    bus.write(0x60, 1, 0x47)
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) == 0x47
    bus.write(0x64, 1, 0xA7)  # disable aux
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) & 0x20
    bus.write(0x64, 1, 0xA8)
    bus.write(0x64, 1, 0xAD)  # disable keyboard
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) == 0x47 | 0x10
    bus.write(0x64, 1, 0xAE)
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) == 0x47


def test_i8042_aux_loopback_raises_irq12(kbd):
    bus, _, _, irq1, irq12 = kbd
    bus.write(0x64, 1, 0x60)
    bus.write(0x60, 1, 0x47 | 0x02)  # AUXINT
    bus.write(0x64, 1, 0xD3)
    bus.write(0x60, 1, 0x5A)
    assert bus.read(0x64, 1) & 0x21 == 0x21  # OBF + AUXDATA
    assert irq12.level == 1 and irq1.level == 0
    assert bus.read(0x60, 1) == 0x5A
    assert irq12.level == 0


def test_i8042_keyboard_answers(kbd):
    bus, *_ = kbd
    bus.write(0x60, 1, 0xF2)  # identify
    assert [bus.read(0x60, 1) for _ in range(3)] == [0xFA, 0xAB, 0x83]
    bus.write(0x60, 1, 0xED)  # LEDs + parameter
    assert bus.read(0x60, 1) == 0xFA
    bus.write(0x60, 1, 0x00)
    assert bus.read(0x60, 1) == 0xFA
    bus.write(0x60, 1, 0xFF)
    assert [bus.read(0x60, 1), bus.read(0x60, 1)] == [0xFA, 0xAA]


def test_i8042_reset_by_pulse_and_output_port(kbd):
    bus, dev, resets, *_ = kbd
    bus.write(0x64, 1, 0xFE)
    assert resets == [1]
    bus.write(0x64, 1, 0xD0)
    port = bus.read(0x60, 1)
    assert port & 0x01
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, port | 0x02)  # reset bit still 1: no reset
    assert resets == [1]
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0x02)  # bit 0 clear: reset
    assert resets == [1, 1]
    bus.write(0x64, 1, 0xFF)  # pulses nothing
    assert len(resets) == 2


def test_i8042_state_roundtrip(kbd):
    bus, dev, *_ = kbd
    bus.write(0x64, 1, 0xAA)
    state = dev.save()
    other = I8042(lambda: None)
    other.restore(state)
    assert other.read(0, 1) == 0x55


# --- RTC -------------------------------------------------------------------

PINNED = calendar.timegm((2024, 2, 29, 21, 7, 5))  # a Thursday


@pytest.fixture
def rtc():
    bus = Bus("io")
    now = [float(PINNED)]
    dev = Rtc(mem_size_bytes=6 << 30, clock=lambda: now[0], below_4g_bytes=3 << 30)
    bus.insert(0x70, 2, dev)

    def cmos(reg):
        bus.write(0x70, 1, reg | 0x80)  # NMI mask bit is ignored
        return bus.read(0x71, 1)

    def set_cmos(reg, value):
        bus.write(0x70, 1, reg)
        bus.write(0x71, 1, value)

    return dev, cmos, set_cmos, now


def test_rtc_bcd_time(rtc):
    _, cmos, _, _ = rtc
    assert [cmos(r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x05, 0x07, 0x21, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_rtc_binary_and_12_hour(rtc):
    _, cmos, set_cmos, _ = rtc
    set_cmos(0x0B, 0x04 | 0x02)  # binary, 24h
    assert [cmos(r) for r in (0, 2, 4, 7, 9)] == [5, 7, 21, 29, 24]
    set_cmos(0x0B, 0x04)  # binary, 12h
    assert cmos(4) == 0x80 | 9
    set_cmos(0x0B, 0x00)  # BCD, 12h
    assert cmos(4) == 0x80 | 0x09


def test_rtc_status_registers(rtc):
    _, cmos, _, now = rtc
    assert cmos(0x0A) & 0x80 == 0  # never updating
    assert cmos(0x0A) & 0x70 == 0x20  # 32.768 kHz divider
    assert cmos(0x0D) == 0x80
    cmos(0x0C)
    now[0] += 1
    assert cmos(0x0C) & 0x10  # an update ended since the last read
    assert cmos(0x0C) == 0  # reading cleared it


def test_rtc_guest_sets_time(rtc):
    _, cmos, set_cmos, now = rtc
    set_cmos(0x0B, 0x82)  # SET: freeze
    set_cmos(0x04, 0x08)
    now[0] += 100  # frozen while SET is on
    assert cmos(0x04) == 0x08 and cmos(0) == 0x05
    set_cmos(0x0B, 0x02)
    now[0] += 3
    assert cmos(0) == 0x08 and cmos(4) == 0x08 and cmos(7) == 0x29


def test_rtc_memory_size_bytes(rtc):
    _, cmos, set_cmos, _ = rtc
    assert cmos(0x15) | cmos(0x16) << 8 == 640
    assert cmos(0x17) | cmos(0x18) << 8 == 0xFFFF
    assert cmos(0x30) | cmos(0x31) << 8 == 0xFFFF
    assert cmos(0x34) | cmos(0x35) << 8 == ((3 << 30) - (16 << 20)) >> 16
    assert cmos(0x5B) | cmos(0x5C) << 8 | cmos(0x5D) << 16 == (3 << 30) >> 16
    set_cmos(0x40, 0x99)
    assert cmos(0x40) == 0x99


def test_rtc_small_memory():
    dev = Rtc(mem_size_bytes=32 << 20)
    cmos = {r: dev.cmos[r] for r in range(0x15, 0x36)}
    assert cmos[0x17] | cmos[0x18] << 8 == 31 * 1024
    assert cmos[0x34] | cmos[0x35] << 8 == (16 << 20) >> 16
    assert dev.cmos[0x5B] == dev.cmos[0x5C] == dev.cmos[0x5D] == 0


# --- port 0x80 and debug exit ----------------------------------------------

def test_port80_remembers():
    bus = Bus("io")
    dev = Port80()
    bus.insert(0x80, 1, dev)
    bus.write(0x80, 1, 0x3C)
    assert bus.read(0x80, 1) == 0x3C


@pytest.mark.parametrize("value,size,code", [(0, 1, 1), (1, 1, 3), (0x31, 1, 0x63), (0x1234, 2, 0x2469)])
def test_debug_exit_code(value, size, code):
    bus = Bus("io")
    codes = []
    bus.insert(0xF4, 4, DebugExit(codes.append, iosize=4))
    bus.write(0xF4, size, value)
    assert codes == [code]
    assert bus.read(0xF4, 1) == 0xFF and bus.read(0xF4, 4) == 0xFFFFFFFF
