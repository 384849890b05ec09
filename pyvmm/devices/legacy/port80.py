"""The POST-code port (0x80 on a PC): firmware and kernels write progress
codes there, and Linux uses it as a short I/O delay."""

from __future__ import annotations

import logging

from ...device import as_int, restore_state, saved

log = logging.getLogger(__name__)


class Port80:
    """Remembers the last value written; reads return it."""

    STATE_VERSION = 1

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.value = 0
        self.writes = 0

    def __repr__(self) -> str:
        return f"Port80(last=0x{self.value:02x}, writes={self.writes})"

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0xFF
        self.writes += 1

    def save(self) -> dict:
        return saved(self, {"value": self.value})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.value = as_int(state["value"])
