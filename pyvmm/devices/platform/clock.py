"""Guest time: the one clock every timer device of the `bt` platform reads.

Two modes:

  "host"           guest nanoseconds are host monotonic nanoseconds since the
                   clock was created (minus time spent paused);
  "deterministic"  guest nanoseconds advance only when the engine says so:
                   `advance_instructions(n)` adds n * ns_per_insn, and
                   `advance_to(ns)` jumps forward (an idle vCPU skipping to
                   the next timer deadline). Runs are reproducible.

Frequencies derived from it (fixed, so the guest never has to calibrate):

  TSC_HZ      2 GHz.  `tsc()` = guest ns * 2.  Advertised in CPUID 0x15 as
              crystal CRYSTAL_HZ times EBX/EAX = 2/1, and in CPUID 0x16.
  CRYSTAL_HZ  1 GHz, the core crystal clock of CPUID 0x15 ECX.  Linux takes
              the local APIC timer frequency from it (lapic_timer_period =
              crystal / HZ), so the local APIC timer counts at this rate
              (one bus tick per guest ns before its divider).
  PIT_HZ      1.193182 MHz, the 8254 input clock.

Only the constructor raises (ConfigError)."""

from __future__ import annotations

import logging
import time

from ...device import as_float, as_int, restore_state, saved
from ...errors import ConfigError

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
TSC_HZ = 2_000_000_000
CRYSTAL_HZ = 1_000_000_000
APIC_BUS_HZ = CRYSTAL_HZ
PIT_HZ = 1_193_182
NEVER = 1 << 63  # a deadline that never comes

MODES = ("host", "deterministic")


def cpuid_15() -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) for CPUID leaf 0x15: TSC = ECX * EBX / EAX."""
    return 1, TSC_HZ // CRYSTAL_HZ, CRYSTAL_HZ, 0


def cpuid_16() -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) for CPUID leaf 0x16: base, max and bus MHz."""
    mhz = TSC_HZ // 1_000_000
    return mhz, mhz, APIC_BUS_HZ // 1_000_000, 0


def ticks_at(elapsed_ns: int, hz: int) -> int:
    """Whole ticks of an `hz` clock in `elapsed_ns` (floor)."""
    return elapsed_ns * hz // NS_PER_S


def ns_for_ticks(ticks: int, hz: int) -> int:
    """Nanoseconds until tick number `ticks` of an `hz` clock (ceiling), so
    that ticks_at(ns_for_ticks(k, hz), hz) >= k."""
    return -(-ticks * NS_PER_S // hz)


class GuestClock:
    """Nanoseconds of guest time, from the host clock or from instructions.

    `ns_per_insn` only matters in deterministic mode (default 1.0: the
    guest sees a 1 G instructions/s CPU). Raises ConfigError for an
    unknown mode."""

    STATE_VERSION = 1

    def __init__(self, mode: str = "host", ns_per_insn: float = 1.0):
        if mode not in MODES:
            raise ConfigError(f"clock mode {mode!r}: choose from {', '.join(MODES)}")
        self.mode = mode
        self.deterministic = mode == "deterministic"
        self.ns_per_insn = ns_per_insn
        self.reset()

    def reset(self) -> None:
        """Guest time 0, running (the mode and rate stay)."""
        self.instructions = 0      # retired, as reported by the engine
        self._extra_ns = 0         # deterministic: jumps made by advance_to/advance_ns
        self._host_base = time.monotonic_ns()
        self._paused_at: int | None = None

    def __repr__(self) -> str:
        return f"GuestClock({self.mode}, now={self.now_ns()} ns)"

    # --- reading ---------------------------------------------------------

    def now_ns(self) -> int:
        """Guest nanoseconds since the VM started."""
        if self.deterministic:
            return int(self.instructions * self.ns_per_insn) + self._extra_ns
        if self._paused_at is not None:
            return self._paused_at
        return time.monotonic_ns() - self._host_base

    def tsc(self) -> int:
        """The time-stamp counter (TSC_HZ) the guest reads with RDTSC.
        A per-vCPU offset written through IA32_TSC is the engine's to add."""
        return self.now_ns() * TSC_HZ // NS_PER_S

    @staticmethod
    def tsc_to_ns(tsc: int) -> int:
        """Guest ns at which the TSC reaches `tsc` (ceiling)."""
        return ns_for_ticks(tsc, TSC_HZ)

    # --- driving -----------------------------------------------------------

    def advance_instructions(self, n: int) -> None:
        """The engine retired `n` more instructions (deterministic time)."""
        self.instructions += n

    def advance_ns(self, ns: int) -> None:
        """Deterministic mode: moves time forward by `ns`. No-op on host time."""
        if self.deterministic and ns > 0:
            self._extra_ns += ns

    def advance_to(self, ns: int) -> None:
        """Deterministic mode: moves time forward to `ns` if it is later (an
        idle vCPU skipping to the next deadline). No-op on host time."""
        if self.deterministic:
            now = self.now_ns()
            if ns > now:
                self._extra_ns += ns - now

    def pause(self) -> None:
        """Host mode: stops guest time (VM paused); deterministic time only
        moves when driven anyway."""
        if not self.deterministic and self._paused_at is None:
            self._paused_at = self.now_ns()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._host_base = time.monotonic_ns() - self._paused_at
            self._paused_at = None

    # --- snapshots -----------------------------------------------------------

    def save(self) -> dict:
        return saved(self, {"mode": self.mode, "ns_per_insn": self.ns_per_insn,
                            "now_ns": self.now_ns(), "instructions": self.instructions})

    def restore(self, state: dict) -> None:
        """Continues guest time from the saved instant (in this clock's mode:
        "mode" and "ns_per_insn" record the saving clock's). Raises
        DeviceStateError."""
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        if state["mode"] not in MODES:
            raise ValueError(f"clock mode {state['mode']!r} unknown")
        as_float(state["ns_per_insn"])
        now = as_int(state["now_ns"])
        self.instructions = as_int(state["instructions"])
        if self.deterministic:
            self._extra_ns = now - int(self.instructions * self.ns_per_insn)
        else:
            self._host_base = time.monotonic_ns() - now
            if self._paused_at is not None:
                self._paused_at = now
