"""Registers of the vCPU that is accessing a device right now, for the few
devices that read and write them (the VMware backdoor).  Each engine builds
one from its own register access (engines/base.py Engine.port_caller)."""

from __future__ import annotations

from typing import Callable

M32 = 0xFFFFFFFF


class CallerRegs:
    """get() reads through a paravirt VcpuPort (reg()); set() writes a
    32-bit register (upper half zero); commit() hands the writes to the vCPU."""

    __slots__ = ("port", "_set", "_commit")

    def __init__(self, port, set_: Callable[[str, int], None], commit: Callable[[], None]):
        self.port = port
        self._set = set_
        self._commit = commit

    def get(self, name: str) -> int:
        return self.port.reg(name)

    def set(self, name: str, value: int) -> None:
        self._set(name, value & M32)

    def commit(self) -> None:
        self._commit()
