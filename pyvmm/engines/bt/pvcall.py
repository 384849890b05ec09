"""vmcall under bt: a direct call of pyvmm's hypercall dispatcher.

The hypercall page under bt holds `vmcall; ret` (paravirt/hypercall_page.py).
The translator emits vmcall as one helper call, PV_CALL(c), which hands the
dispatcher this vCPU through BtVcpuPort and ends the block (the call may
load CR3, flush the TLB or halt).  A CPU with no dispatcher attached (c.pv
is None, the default) raises #UD, as vmcall does outside VMX operation."""

from __future__ import annotations

import iced_x86 as X

from .faults import UD, GuestFault
from .gen import Gen

M = X.Mnemonic
_REGS = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}


class BtVcpuPort:
    """The paravirt.hypervisor.VcpuPort of a bt vCPU."""

    __slots__ = ("c", "index")

    def __init__(self, c):
        self.c = c
        self.index = c.index

    def reg(self, name: str) -> int:
        return self.c.R[_REGS[name]]

    def set_result(self, value: int) -> None:
        c = self.c
        c.R[0] = value if c.mode[0] == 64 else value & 0xFFFFFFFF

    def cpl(self) -> int:
        return self.c.cpl

    def set_cr3(self, value: int) -> None:
        from .system import write_cr
        write_cr(self.c, 3, value)

    def flush_tlb(self, la: int | None) -> None:
        mmu = self.c.mmu
        if la is None:
            mmu.flush()
        else:
            mmu.invlpg(la)
        self.c.jmp.clear()

    def tables_written(self, gpas: list[int]) -> None:
        guard = self.c.mmu.guard
        if guard is None:
            return
        for ppn in {g >> 12 for g in gpas}:
            if ppn in guard.table_pages:
                guard.table_written(ppn)
        self.c.jmp.clear()

    def halt(self) -> None:
        self.c.rf |= 0x200          # sti; hlt in one step: no lost wake-up
        self.c.halted = True


def pv_call(c) -> None:
    """Runs the hypercall in c's registers. Raises GuestFault(#UD) without PV."""
    hv = getattr(c, "pv", None)
    if hv is None:
        raise GuestFault(UD)
    port = getattr(c, "pv_port", None)
    if port is None:
        port = c.pv_port = BtVcpuPort(c)
    hv.dispatch(port)


def _vmcall(g: Gen) -> None:
    from .ctrl import _exit
    g.helper("PV_CALL(c)")
    _exit(g, f"{g.ins.next_ip:#x}")


EMITTERS = {M.VMCALL: _vmcall}
EXPORTS = {"PV_CALL": pv_call}
