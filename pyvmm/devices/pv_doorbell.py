"""The paravirtual doorbell: one I/O port the hw engine's hypercall page
writes to (paravirt/hypercall_page.py).  Writing it runs the hypercall of
the vCPU that wrote; reading it gives the ABI version, so a probe of an
unclaimed port (all ones) is told apart from pyvmm."""

from __future__ import annotations

from typing import Callable

from ..device import as_int, restore_state, saved


class PvDoorbell:
    """`ring()` is called for every write; it reaches the writing vCPU's
    registers itself (engines/kvm/pvexit.py)."""

    STATE_VERSION = 1

    def __init__(self, ring: Callable[[], None], version: int):
        self.ring = ring
        self.version = version
        self.rings = 0

    def __repr__(self) -> str:
        return f"PvDoorbell(rings={self.rings})"

    def read(self, offset: int, size: int) -> int:
        return self.version & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.rings += 1
        self.ring()

    def reset(self) -> None:
        self.rings = 0

    def save(self) -> dict:
        return saved(self, {"rings": self.rings})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.rings = as_int(state["rings"])
