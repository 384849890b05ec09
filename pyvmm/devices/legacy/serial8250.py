"""A 16550A UART: eight byte-wide registers, 16-byte FIFOs, PC-style IRQ gating.

Offsets (from the 16550 datasheet):

    0  RBR (read) / THR (write); DLL when LCR.DLAB is set
    1  IER;                      DLM when LCR.DLAB is set
    2  IIR (read) / FCR (write)
    3  LCR
    4  MCR
    5  LSR (writes ignored)
    6  MSR (writes ignored)
    7  SCR

Transmission is instantaneous: a THR write goes straight to the output sink
(or, in loopback mode, into the receiver), so THR and the shift register are
always empty.  Received bytes wait in a bounded host-side buffer
(`RX_BUFFER_SIZE`); the guest pops them one at a time through RBR.  When the
buffer is full further bytes are dropped and LSR.OE is set.

The IRQ line is high while any enabled interrupt is pending AND MCR.OUT2 is
set: on PCs OUT2 gates the UART's interrupt output onto the ISA bus.

Locking: none of its own.  `receive` runs on the machine's event loop
(loop.py) under the machine's lock, and `read`/`write` under the same lock
because the UART says INPUT_FROM_LOOP, which makes the bus serialize its
dispatch even with one vCPU."""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from ...device import as_bool, as_hex, as_int, restore_state, saved
from ...irq import IrqLine

log = logging.getLogger(__name__)

# The guest sees a 16-byte FIFO (trigger levels up to 14); behind it the host
# buffer holds what the user typed ahead, up to this many bytes.
RX_BUFFER_SIZE = 4096
FIFO_SIZE = 16

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04   # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

# IIR values (bits 3..0) and FIFO bits.
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C   # character timeout (data below the trigger level)
IIR_FIFO_ENABLED = 0xC0

# FCR bits.
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR bits.
LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
# Outside loopback the "modem" on the other end is always there and ready.
MSR_HOST_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS


def _loopback_msr(mcr: int) -> int:
    """The MSR status bits that MCR outputs drive in loopback mode:
    DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD."""
    msr = 0
    if mcr & MCR_DTR:
        msr |= MSR_DSR
    if mcr & MCR_RTS:
        msr |= MSR_CTS
    if mcr & MCR_OUT1:
        msr |= MSR_RI
    if mcr & MCR_OUT2:
        msr |= MSR_DCD
    return msr


class Serial8250:
    """One 16550A UART (8 ports).

    `output` receives each transmitted byte (as a 1-byte bytes object);
    `irq` is driven as described in the module docstring."""

    STATE_VERSION = 1

    # The console feeds it from the event loop: the bus takes the machine's
    # lock around its registers (bus.py).
    INPUT_FROM_LOOP = True

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]):
        self.irq = irq
        self.output = output
        self.rx: deque[int] = deque()
        self.reset()

    def reset(self) -> None:
        """Power-on register values; empties the receive buffer."""
        self.dll = 0x0C  # 9600 baud from the 1.8432 MHz clock
        self.dlm = 0
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr_errors = 0
        self.msr = MSR_HOST_CONNECTED
        self.scr = 0
        self.thr_interrupt = False
        self.rx.clear()
        self._update_irq()

    def __repr__(self) -> str:
        return (f"Serial8250(ier=0x{self.ier:02x}, lcr=0x{self.lcr:02x}, mcr=0x{self.mcr:02x}, "
                f"lsr=0x{self._lsr():02x}, rx={len(self.rx)}, irq={self.irq.level})")

    # --- derived state ------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def divisor(self) -> int:
        return (self.dlm << 8) | self.dll

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT | self.lsr_errors
        if self.rx:
            lsr |= LSR_DR
        return lsr

    def _pending(self) -> int:
        """The highest-priority enabled pending interrupt, as an IIR code."""
        if self.ier & IER_ELSI and self.lsr_errors:
            return IIR_RLSI
        if self.ier & IER_ERBFI and self.rx:
            if self.fifo_enabled:
                trigger = RX_TRIGGER_LEVELS[self.fcr >> FCR_TRIGGER_SHIFT]
                return IIR_RDI if len(self.rx) >= trigger else IIR_CTI
            return IIR_RDI
        if self.ier & IER_ETBEI and self.thr_interrupt:
            return IIR_THRI
        if self.ier & IER_EDSSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        active = self._pending() != IIR_NO_INT and bool(self.mcr & MCR_OUT2)
        self.irq.set_level(1 if active else 0)

    def _push_rx(self, byte: int) -> bool:
        if len(self.rx) >= RX_BUFFER_SIZE:
            self.lsr_errors |= LSR_OE
            return False
        self.rx.append(byte)
        return True

    # --- host side ----------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Bytes arriving on the serial line (typed by the user). Returns how
        many were accepted; the rest are dropped and LSR.OE is set. Ignored in
        loopback mode, where the receiver listens to the transmitter."""
        if self.mcr & MCR_LOOP:
            return 0
        accepted = 0
        for b in data:
            if not self._push_rx(b):
                log.debug("rx buffer full, dropped %d bytes", len(data) - accepted)
                break
            accepted += 1
        self._update_irq()
        return accepted

    # --- guest side ---------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        value = self._read(offset)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, value & 0xFF)
        self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            code = self._pending()
            if code == IIR_THRI:
                self.thr_interrupt = False  # reading IIR acknowledges THRE
            return code | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = self._lsr()
            self.lsr_errors = 0
            return lsr
        if offset == MSR:
            msr = self.msr
            self.msr &= ~MSR_DELTAS
            return msr
        if offset == SCR:
            return self.scr
        return 0xFF

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return
            self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
                return
            self.ier = value & IER_MASK
            # Enabling (or re-writing) ETBEI while THR is empty raises THRE.
            self.thr_interrupt = bool(self.ier & IER_ETBEI)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value & MCR_MASK)
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only.

    def _transmit(self, byte: int) -> None:
        if self.mcr & MCR_LOOP:
            self._push_rx(byte)
        else:
            self.output(bytes((byte,)))
        # THR was refilled and is at once empty again.
        self.thr_interrupt = bool(self.ier & IER_ETBEI)

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_ENABLE:
            self.rx.clear()  # toggling FIFO mode empties both FIFOs
        if value & FCR_CLEAR_RX:
            self.rx.clear()
        # TX "FIFO" is always empty; FCR_CLEAR_TX needs nothing.
        self.fcr = value & (FCR_ENABLE | 0xC0) if value & FCR_ENABLE else 0

    def _write_mcr(self, value: int) -> None:
        self.mcr = value
        new = _loopback_msr(value) if value & MCR_LOOP else MSR_HOST_CONNECTED
        old = self.msr
        deltas = 0
        if (old ^ new) & MSR_CTS:
            deltas |= MSR_DCTS
        if (old ^ new) & MSR_DSR:
            deltas |= MSR_DDSR
        if (old ^ new) & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            deltas |= MSR_TERI  # trailing edge of ring indicator
        self.msr = new | (old & MSR_DELTAS) | deltas

    # --- snapshots ----------------------------------------------------------

    def save(self) -> dict:
        return saved(self, {
            "dll": self.dll, "dlm": self.dlm, "ier": self.ier, "fcr": self.fcr,
            "lcr": self.lcr, "mcr": self.mcr, "lsr_errors": self.lsr_errors,
            "msr": self.msr, "scr": self.scr, "thr_interrupt": self.thr_interrupt,
            "rx": bytes(self.rx).hex(),
        })

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        regs = {key: as_int(state[key]) for key in ("dll", "dlm", "ier", "fcr", "lcr", "mcr",
                                                     "lsr_errors", "msr", "scr")}
        thr_interrupt = as_bool(state["thr_interrupt"])
        rx = deque(as_hex(state["rx"]))
        for key, value in regs.items():
            setattr(self, key, value)
        self.thr_interrupt = thr_interrupt
        self.rx = rx
        self._update_irq()
