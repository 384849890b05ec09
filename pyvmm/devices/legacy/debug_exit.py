"""A debug-exit port with QEMU's isa-debug-exit semantics: writing value v
ends the VM with exit status (v << 1) | 1, so a guest test can report
success or failure through the host process's exit code.

Place it at (iobase, iosize) from VmConfig.debug_exit; the device accepts a
write of any size at any offset of its range."""

from __future__ import annotations

import logging
from typing import Callable

from ...device import as_opt_int, restore_state, saved

log = logging.getLogger(__name__)

ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class DebugExit:
    """`on_exit(code)` is called with (value << 1) | 1 on every write."""

    STATE_VERSION = 1

    def __init__(self, on_exit: Callable[[int], None], iosize: int = 1):
        self.on_exit = on_exit
        self.iosize = iosize
        self.last_code: int | None = None

    def reset(self) -> None:
        self.last_code = None

    def __repr__(self) -> str:
        return f"DebugExit(iosize={self.iosize}, last_code={self.last_code})"

    def read(self, offset: int, size: int) -> int:
        return ALL_ONES.get(size, (1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * min(size, self.iosize))) - 1
        code = (value << 1) | 1
        log.info("debug-exit: guest wrote 0x%x, exit code %d", value, code)
        self.last_code = code
        self.on_exit(code)

    def save(self) -> dict:
        return saved(self, {"last_code": self.last_code})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.last_code = as_opt_int(state["last_code"])
