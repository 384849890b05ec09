"""The 8042 keyboard controller, enough for Linux's i8042/atkbd drivers and
for the guest's `reboot` (command 0xFE pulses the CPU reset line).

Offsets: 0 is the data port (0x60 on a PC), 4 is status (read) / command
(write) (0x64).  Offsets 1..3 are not the controller's: on a PC 0x61 is
system control port B (speaker, PIT gate), which belongs to another device.
So place the controller with two one-port ranges, as `ranges()` describes:

    for offset, length, dev in kbd.ranges():
        io_bus.insert(0x60 + offset, length, dev, f"i8042@{0x60 + offset:#x}")

The keyboard behind the controller answers the basic PS/2 commands (ACK,
reset, identify) so atkbd probes quickly; no keys are ever typed (the console
uses the serial port).  No mouse is attached: bytes sent to the aux port are
answered with 0xFE and the status timeout bit, as a real controller does with
nothing plugged in.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from ...bus import OffsetView
from ...device import as_bool, as_hex, as_int, as_list, as_opt_int, restore_state, saved
from ...irq import IrqLine

log = logging.getLogger(__name__)

DATA = 0
STATUS_COMMAND = 4

# Status register.
STR_OBF = 0x01      # output buffer full
STR_IBF = 0x02      # input buffer full (never: commands complete at once)
STR_SYS = 0x04      # system flag (set by self-test)
STR_CMD = 0x08      # last write was to the command port
STR_UNLOCKED = 0x10  # keyboard not inhibited
STR_AUXDATA = 0x20  # the output byte comes from the aux port
STR_TIMEOUT = 0x40

# Controller command byte (CTR).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

# Output port bits.
OUTPORT_RESET = 0x01  # active low: writing 0 resets the CPU
OUTPORT_A20 = 0x02

# Keyboard (device) commands and replies.
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)  # MF2 keyboard
KBD_CMDS_WITH_PARAM = (0xED, 0xF0, 0xF3)  # set LEDs, scancode set, typematic

OUT_QUEUE_MAX = 16


class I8042:
    """8042 controller with a PS/2 keyboard and an empty aux port.

    `on_reset` is called when the guest pulses the reset line; `irq_kbd`
    (IRQ 1) and `irq_aux` (IRQ 12) are raised while a byte from that port
    waits in the output buffer and the CTR enables its interrupt."""

    STATE_VERSION = 1

    def __init__(self, on_reset: Callable[[], None], irq_kbd: IrqLine | None = None,
                 irq_aux: IrqLine | None = None):
        self.on_reset = on_reset
        self.irq_kbd = irq_kbd
        self.irq_aux = irq_aux
        self.out: deque[tuple[int, bool]] = deque()  # (byte, from_aux)
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        self.ctr = CTR_KBDINT | CTR_SYS | CTR_XLATE
        self.status_flags = STR_UNLOCKED  # SYS/CMD/TIMEOUT bits
        self.outport = OUTPORT_RESET | OUTPORT_A20
        self.ram = bytearray(32)  # controller RAM; byte 0 is the CTR
        self.pending_cmd: int | None = None  # controller command awaiting its data byte
        self.kbd_pending: int | None = None  # keyboard command awaiting its parameter
        self.kbd_scanning = True
        self.out.clear()
        self._update_irqs()

    def __repr__(self) -> str:
        return f"I8042(ctr=0x{self.ctr:02x}, status=0x{self._status():02x}, out={len(self.out)})"

    def ranges(self) -> list[tuple[int, int, object]]:
        """(offset, length, device) triples to insert on the I/O bus relative
        to the controller's base (0x60): the data port and the status port."""
        return [(DATA, 1, self), (STATUS_COMMAND, 1, OffsetView(self, STATUS_COMMAND))]

    # --- output buffer and IRQs --------------------------------------------

    def _queue(self, byte: int, aux: bool = False) -> None:
        if len(self.out) < OUT_QUEUE_MAX:
            self.out.append((byte & 0xFF, aux))
        self._update_irqs()

    def _update_irqs(self) -> None:
        kbd = aux = 0
        if self.out:
            from_aux = self.out[0][1]
            aux = int(from_aux and bool(self.ctr & CTR_AUXINT))
            kbd = int(not from_aux and bool(self.ctr & CTR_KBDINT))
        if self.irq_kbd is not None:
            self.irq_kbd.set_level(kbd)
        if self.irq_aux is not None:
            self.irq_aux.set_level(aux)

    def _status(self) -> int:
        status = self.status_flags
        if self.ctr & CTR_SYS:
            status |= STR_SYS
        if self.out:
            status |= STR_OBF
            if self.out[0][1]:
                status |= STR_AUXDATA
        return status

    # --- bus interface ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == DATA:
            if not self.out:
                return 0
            byte, _ = self.out.popleft()
            self.status_flags &= ~STR_TIMEOUT
            self._update_irqs()
            return byte
        if offset == STATUS_COMMAND:
            return self._status()
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == DATA:
            self.status_flags &= ~STR_CMD
            self._write_data(value)
        elif offset == STATUS_COMMAND:
            self.status_flags |= STR_CMD
            self._command(value)

    # --- controller commands -----------------------------------------------

    def _command(self, cmd: int) -> None:
        self.pending_cmd = None
        if cmd == 0x20 or 0x21 <= cmd <= 0x3F:  # read CTR / controller RAM
            self._queue(self.ctr if cmd == 0x20 else self.ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self.pending_cmd = cmd  # the next data byte is the argument
        elif cmd == 0xA7:
            self.ctr |= CTR_AUXDIS
        elif cmd == 0xA8:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == 0xA9:  # aux interface test: 0 = OK
            self._queue(0x00)
        elif cmd == 0xAA:  # controller self-test
            self.ctr |= CTR_SYS
            self._queue(0x55)
        elif cmd == 0xAB:  # keyboard interface test
            self._queue(0x00)
        elif cmd == 0xAD:
            self.ctr |= CTR_KBDDIS
        elif cmd == 0xAE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == 0xC0:  # read input port: keyboard unlocked, colour display
            self._queue(0xBF)
        elif cmd == 0xD0:
            self._queue(self.outport)
        elif cmd == 0xDD:
            self.outport &= ~OUTPORT_A20
        elif cmd == 0xDF:
            self.outport |= OUTPORT_A20
        elif cmd >= 0xF0:  # pulse output port bits whose command bit is 0
            if not cmd & OUTPORT_RESET:
                self._reset_cpu("command 0x%02x" % cmd)
        else:
            log.debug("unhandled i8042 command 0x%02x", cmd)
        self._update_irqs()

    def _write_data(self, value: int) -> None:
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd is None:
            self._keyboard_byte(value)
        elif cmd == 0x60 or 0x61 <= cmd <= 0x7F:
            if cmd == 0x60:
                self.ctr = value
            else:
                self.ram[cmd & 0x1F] = value
        elif cmd == 0xD1:
            self.outport = value
            if not value & OUTPORT_RESET:
                self._reset_cpu("output port write 0x%02x" % value)
        elif cmd == 0xD2:
            self._queue(value)
        elif cmd == 0xD3:
            self._queue(value, aux=True)
        elif cmd == 0xD4:
            # Nothing on the aux port: the controller times out.
            self.status_flags |= STR_TIMEOUT
            self._queue(KBD_RESEND, aux=True)
        self._update_irqs()

    def _reset_cpu(self, why: str) -> None:
        log.info("i8042: reset line pulsed (%s)", why)
        self.resets += 1
        self.on_reset()

    # --- the keyboard -------------------------------------------------------

    def _keyboard_byte(self, value: int) -> None:
        """A byte sent to the keyboard through the data port."""
        self.ctr &= ~CTR_KBDDIS  # sending to the keyboard enables its clock
        if self.kbd_pending is not None:
            self.kbd_pending = None
            self._queue(KBD_ACK)
            return
        if value in KBD_CMDS_WITH_PARAM:
            self.kbd_pending = value
            self._queue(KBD_ACK)
        elif value == 0xEE:  # echo
            self._queue(0xEE)
        elif value == 0xF2:  # identify
            self._queue(KBD_ACK)
            for b in KBD_ID:
                self._queue(b)
        elif value == 0xF4:
            self.kbd_scanning = True
            self._queue(KBD_ACK)
        elif value == 0xF5:
            self.kbd_scanning = False
            self._queue(KBD_ACK)
        elif value == 0xFF:  # reset and self-test
            self.kbd_scanning = True
            self._queue(KBD_ACK)
            self._queue(KBD_BAT_OK)
        else:
            self._queue(KBD_ACK)

    # --- snapshots ----------------------------------------------------------

    def save(self) -> dict:
        return saved(self, {
            "ctr": self.ctr, "status_flags": self.status_flags, "outport": self.outport,
            "ram": self.ram.hex(), "pending_cmd": self.pending_cmd,
            "kbd_pending": self.kbd_pending, "kbd_scanning": self.kbd_scanning,
            "out": [[b, aux] for b, aux in self.out],
        })

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        out = deque((as_int(b), as_bool(aux)) for b, aux in as_list(state["out"]))
        self.ctr = as_int(state["ctr"])
        self.status_flags = as_int(state["status_flags"])
        self.outport = as_int(state["outport"])
        self.ram = bytearray(as_hex(state["ram"]))
        self.pending_cmd = as_opt_int(state["pending_cmd"])
        self.kbd_pending = as_opt_int(state["kbd_pending"])
        self.kbd_scanning = as_bool(state["kbd_scanning"])
        self.out = out
        self._update_irqs()
