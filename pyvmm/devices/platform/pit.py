"""The 8254 programmable interval timer and system control port B (0x61).

Offsets of the PIT's own range (0x40 on a PC): 0, 1, 2 are counters 0-2,
3 is the control word register (counter programming, counter latch and
read-back commands).  The counters run at PIT_HZ (1.193182 MHz) of guest
time from the GuestClock; their values are computed from the time the
count was loaded, so nothing ticks in the background.

All six modes are modelled (0: interrupt on terminal count, 1: hardware
one-shot, 2: rate generator, 3: square wave, 4/5: software/hardware
strobe); BCD counting is accepted and ignored (counts are binary).  A new
count written in modes 2/3 takes effect at once rather than at the end of
the current period.

Counter 0's output drives ISA IRQ 0: each rising edge of OUT (every period
in modes 2 and 3, once in modes 0, 1, 4 and 5) pulses the `irq` line when
`poll(now_ns)` sees it has passed; edges that passed between two polls are
counted in `edges` but delivered as one pulse, as an edge-triggered PIC
would latch them.  `next_deadline_ns()` says when the next one is due.

Counters 0 and 1 have their gates tied high.  Counter 2's gate is bit 0 of
port 0x61 (`Port61`, a separate one-port device: the i8042 owns 0x60 and
0x64), whose bit 5 reads counter 2's OUT and bit 4 the DRAM refresh
toggle (flipping on every read, so loops waiting for it always progress).
Nothing here raises."""

from __future__ import annotations

import logging

from ...device import as_bool, as_int, as_list, as_opt_int, restore_state, saved
from .clock import NEVER, PIT_HZ, GuestClock, ns_for_ticks, ticks_at

log = logging.getLogger(__name__)

CONTROL = 3
ACCESS_LATCH, ACCESS_LO, ACCESS_HI, ACCESS_LOHI = 0, 1, 2, 3
READBACK = 3                # SC field value of the read-back command
RB_NO_COUNT = 0x20
RB_NO_STATUS = 0x10

P61_GATE2 = 0x01
P61_SPEAKER = 0x02
P61_WRITABLE = 0x0F
P61_REFRESH = 0x10
P61_OUT2 = 0x20

_COUNTER_FIELDS = {"mode": as_int, "access": as_int, "bcd": as_int, "reload": as_int,
                   "start": as_opt_int, "gate": as_bool, "loaded": as_bool, "null_count": as_bool,
                   "hold_count": as_int, "idle_out": as_int, "paused_ticks": as_opt_int,
                   "edges": as_int, "delivered": as_int, "write_hi": as_bool, "read_hi": as_bool,
                   "low_byte": as_int, "status_latch": as_opt_int}   # field -> its reader


class PitCounter:
    """One 8254 counter; `irq` (with a pulse() method) gets OUT's rising edges."""

    STATE_VERSION = 1

    def __init__(self, index: int, clock: GuestClock, irq=None, gate: bool = True):
        self.index = index
        self.clock = clock
        self.irq = irq
        self.gate_at_reset = gate
        self.on_timer_change = lambda: None
        self.reset()

    def reset(self) -> None:
        self.mode = 0
        self.access = ACCESS_LOHI
        self.bcd = 0
        self.reload = 0x10000
        self.start: int | None = None    # guest ns at which counting began
        self.gate = self.gate_at_reset
        self.loaded = False
        self.null_count = True
        self.hold_count = 0              # count shown while not counting
        self.idle_out = 1                # OUT while not counting
        self.paused_ticks: int | None = None
        self.edges = 0                   # rising edges of OUT since `start`
        self.delivered = 0               # IRQ pulses sent
        self.write_hi = False
        self.read_hi = False
        self.low_byte = 0
        self.latched: list[int] = []
        self.status_latch: int | None = None

    def __repr__(self) -> str:
        return f"PitCounter({self.index}, mode={self.mode}, reload={self.reload}, counting={self.start is not None})"

    # --- the waveform --------------------------------------------------------

    def _ticks(self, now: int) -> int:
        return ticks_at(now - self.start, PIT_HZ)

    def count_and_out(self, now: int) -> tuple[int, int]:
        """The counting element and OUT at guest time `now`."""
        if self.start is None:
            return self.hold_count, self.idle_out
        n, d, mode = self.reload, self._ticks(now), self.mode
        if mode in (0, 1):
            return (n - d) & 0xFFFF, int(d >= n)
        if mode in (4, 5):
            return (n - d) & 0xFFFF, int(d != n)
        p = d % n
        if mode == 2:
            return (n - p) & 0xFFFF, int(p != n - 1)
        half = (n + 1) // 2                       # mode 3: high for the first half
        q = p if p < half else p - half
        return max(2, n - 2 * q) & 0xFFFF, int(p < half)

    def _edge_tick(self, k: int) -> int | None:
        """Tick (since start) of OUT's k-th rising edge (k >= 1), or None."""
        if self.mode in (2, 3):
            return k * self.reload
        if k > 1:
            return None
        return self.reload if self.mode in (0, 1) else self.reload + 1

    def next_deadline_ns(self) -> int:
        if self.start is None or self.irq is None:
            return NEVER
        tick = self._edge_tick(self.edges + 1)
        return NEVER if tick is None else self.start + ns_for_ticks(tick, PIT_HZ)

    def poll(self, now: int) -> bool:
        """Pulses the IRQ if OUT rose since the last poll; True if it did."""
        if self.start is None or self.irq is None:
            return False
        d = self._ticks(now)
        if self.mode in (2, 3):
            seen = d // self.reload
        else:
            tick = self._edge_tick(1)
            seen = 1 if d >= tick else 0
        if seen <= self.edges:
            return False
        self.edges = seen
        self.delivered += 1
        self.irq.pulse()
        return True

    # --- programming -------------------------------------------------------------

    def _begin(self, now: int, ticks_done: int = 0) -> None:
        self.start = now - ns_for_ticks(ticks_done, PIT_HZ)
        self.edges = 0 if ticks_done == 0 else self.edges
        self.paused_ticks = None
        self.on_timer_change()

    def _stop(self, now: int, out: int | None = None) -> None:
        count, cur_out = self.count_and_out(now)
        self.hold_count = count
        self.idle_out = cur_out if out is None else out
        self.start = None
        self.on_timer_change()

    def control(self, value: int, now: int) -> None:
        access = (value >> 4) & 3
        if access == ACCESS_LATCH:
            self.latch(now)
            return
        self._stop(now)
        self.access = access
        self.mode = (value >> 1) & 7
        if self.mode > 5:
            self.mode -= 4                        # 6, 7 are aliases of 2, 3
        self.bcd = value & 1
        self.loaded = False
        self.null_count = True
        self.idle_out = 0 if self.mode == 0 else 1
        self.paused_ticks = None
        self.write_hi = self.read_hi = False
        self.latched = []
        self.status_latch = None

    def latch(self, now: int) -> None:
        if self.latched:
            return                                # the first latch holds until read
        count = self.count_and_out(now)[0]
        lo, hi = count & 0xFF, count >> 8
        self.latched = {ACCESS_LO: [lo], ACCESS_HI: [hi]}.get(self.access, [lo, hi])

    def latch_status(self, now: int) -> None:
        if self.status_latch is None:
            out = self.count_and_out(now)[1]
            self.status_latch = (out << 7 | int(self.null_count) << 6 | self.access << 4
                                 | self.mode << 1 | self.bcd)

    def write_count(self, value: int, now: int) -> None:
        value &= 0xFF
        if self.access == ACCESS_LO:
            n = value
        elif self.access == ACCESS_HI:
            n = value << 8
        elif not self.write_hi:
            self.low_byte = value
            self.write_hi = True
            if self.mode == 0 and self.start is not None:
                self._stop(now, out=0)            # the first byte stops mode 0
            return
        else:
            n = self.low_byte | value << 8
            self.write_hi = False
        if self.mode in (2, 3) and n == 1:
            n = 2                                 # 1 is illegal there
        self.reload = n or 0x10000
        self.loaded = True
        self.null_count = False
        if self.mode in (1, 5):                   # waits for a gate trigger
            self._stop(now, out=1)
            self.hold_count = self.reload & 0xFFFF
        elif self.gate:
            self._begin(now)
        else:
            self.hold_count = self.reload & 0xFFFF
            self.idle_out = 0 if self.mode == 0 else 1
            self.paused_ticks = 0

    def read_count(self, now: int) -> int:
        if self.status_latch is not None:
            value, self.status_latch = self.status_latch, None
            return value
        if self.latched:
            return self.latched.pop(0)
        count = self.count_and_out(now)[0]
        if self.access == ACCESS_LO:
            return count & 0xFF
        if self.access == ACCESS_HI:
            return count >> 8
        self.read_hi = not self.read_hi
        return count & 0xFF if self.read_hi else count >> 8

    def set_gate(self, gate: bool, now: int) -> None:
        if gate == self.gate:
            return
        self.gate = gate
        if not self.loaded:
            return
        if self.mode in (0, 4):
            if not gate and self.start is not None:
                self.paused_ticks = self._ticks(now)
                self._stop(now)
            elif gate and self.paused_ticks is not None:
                self._begin(now, self.paused_ticks)
        elif self.mode in (2, 3):
            if gate:
                self._begin(now)                  # rising gate reloads
            else:
                self._stop(now, out=1)
        elif gate:                                # modes 1, 5: trigger
            self._begin(now)

    def save(self) -> dict:
        state = {f: getattr(self, f) for f in _COUNTER_FIELDS}
        state["latched"] = list(self.latched)
        return saved(self, state)

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        for f, read in _COUNTER_FIELDS.items():
            setattr(self, f, read(state[f]))
        self.latched = [as_int(v) for v in as_list(state["latched"])]
        self.on_timer_change()


class Port61:
    """System control port B: counter 2 gate and speaker enable (bits 0-1,
    plus the parity-check enables 2-3, stored), refresh toggle (bit 4) and
    counter 2's OUT (bit 5)."""

    def __init__(self, pit: "Pit"):
        self.pit = pit
        self.value = 0
        self.refresh = 0

    def read(self, offset: int, size: int) -> int:
        self.refresh ^= P61_REFRESH
        out2 = self.pit.counters[2].count_and_out(self.pit.clock.now_ns())[1]
        return self.value | self.refresh | (P61_OUT2 if out2 else 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & P61_WRITABLE
        self.pit.counters[2].set_gate(bool(value & P61_GATE2), self.pit.clock.now_ns())


class Pit:
    """The 8254 with its three counters; counter 0 pulses `irq0`."""

    STATE_VERSION = 1

    def __init__(self, clock: GuestClock, irq0=None):
        self.clock = clock
        self.counters = [PitCounter(0, clock, irq0), PitCounter(1, clock),
                         PitCounter(2, clock, gate=False)]
        self.port61 = Port61(self)

    def __repr__(self) -> str:
        return f"Pit({self.counters[0]!r})"

    def ranges(self) -> list[tuple[int, int, object, str]]:
        """(port, length, device, name) for a PC's I/O bus: the PIT at
        0x40-0x43 and port B at 0x61 (between the i8042's 0x60 and 0x64)."""
        return [(0x40, 4, self, "pit"), (0x61, 1, self.port61, "port61")]

    def set_timer_listener(self, callback) -> None:
        """`callback()` is called whenever a deadline may have moved."""
        for c in self.counters:
            c.on_timer_change = callback

    def reset(self) -> None:
        for c in self.counters:
            c.reset()
        self.port61.value = 0

    def read(self, offset: int, size: int) -> int:
        if offset >= CONTROL:
            return 0xFF                           # the control word is write-only
        return self.counters[offset].read_count(self.clock.now_ns())

    def write(self, offset: int, size: int, value: int) -> None:
        now = self.clock.now_ns()
        value &= 0xFF
        if offset < CONTROL:
            self.counters[offset].write_count(value, now)
            return
        sc = value >> 6
        if sc != READBACK:
            self.counters[sc].control(value, now)
            return
        for i, c in enumerate(self.counters):
            if value & (2 << i):
                if not value & RB_NO_STATUS:
                    c.latch_status(now)
                if not value & RB_NO_COUNT:
                    c.latch(now)

    def next_deadline_ns(self) -> int:
        return self.counters[0].next_deadline_ns()

    def poll(self, now_ns: int) -> bool:
        return self.counters[0].poll(now_ns)

    def save(self) -> dict:
        return saved(self, {"counters": [c.save() for c in self.counters],
                            "port61": self.port61.value})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        for c, s in zip(self.counters, as_list(state["counters"], len(self.counters))):
            c.restore(s)
        self.port61.value = as_int(state["port61"])
