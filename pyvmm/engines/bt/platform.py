"""The bt engine's PC platform: guest clock plus interrupt controllers and
timers (pyvmm/devices/platform), placed on the machine's buses.

The builder calls `make_platform(machine)` before the firmware tables so
the ACPI PM timer can read the same guest clock; the engine takes the
result from machine.devices ("clock", "intc").  Raises ConfigError for a
bad vCPU count and BusError when a range is already taken."""

from __future__ import annotations

import logging

from ...devices.platform.clock import GuestClock
from ...devices.platform.intc import PlatformInterrupts

log = logging.getLogger(__name__)


def clock_mode(config) -> str:
    """"deterministic" when the config asks for it (--deterministic), else "host"."""
    return "deterministic" if config.deterministic else "host"


def make_platform(machine) -> tuple[GuestClock, PlatformInterrupts]:
    """Creates the clock and PlatformInterrupts and attaches them to the buses."""
    cfg = machine.config
    clock = GuestClock(clock_mode(cfg))
    intc = PlatformInterrupts(cfg.cpus, clock, lock=machine.lock)
    intc.attach(machine.io_bus, machine.mmio_bus)
    machine.devices.update(clock=clock, intc=intc)
    log.debug("bt platform: %d local APICs, %s clock", cfg.cpus, clock.mode)
    return clock, intc


def seconds(clock: GuestClock):
    """A seconds-returning callable over the guest clock (for the ACPI PM timer)."""
    return lambda: clock.now_ns() / 1e9
