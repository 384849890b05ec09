"""Interrupt lines from devices to whichever interrupt controller the engine has."""

from __future__ import annotations

from typing import Callable

# sink(gsi, level) is provided by the engine: KVM_IRQ_LINE for the in-kernel
# irqchip, the Python PIC/IOAPIC for the translator.
IrqSink = Callable[[int, int], None]


class IrqLine:
    """One wire from a device to a global system interrupt number.

    Devices set the level; edge-triggered consumers see the rising edge."""

    def __init__(self, gsi: int, sink: IrqSink | None = None):
        self.gsi = gsi
        self.sink = sink
        self.level = 0
        self.raised = 0  # how many times the line went high

    def __repr__(self) -> str:
        return f"IrqLine(gsi={self.gsi}, level={self.level})"

    def set_level(self, level: int) -> None:
        level = 1 if level else 0
        if level == self.level:
            return
        self.level = level
        if level:
            self.raised += 1
        if self.sink is not None:
            self.sink(self.gsi, level)

    def pulse(self) -> None:
        self.set_level(1)
        self.set_level(0)
