"""vmcall under bt: a direct call of pyvmm's hypercall dispatcher.

The hypercall page under bt holds `vmcall; ret` (paravirt/hypercall_page.py).
The translator emits vmcall as one helper call, PV_CALL(c), which hands the
dispatcher this vCPU through BtVcpuPort; the block ends after it only when
the call needs that (it loaded CR3, halted, may have raised an interrupt,
or dropped a code mapping) - a page-table update loop stays in one block.  A CPU with no dispatcher attached (c.pv
is None, the default) raises #UD, as vmcall does outside VMX operation."""

from __future__ import annotations

import iced_x86 as X

from .faults import UD, GuestFault
from .gen import Gen

M = X.Mnemonic
_REGS = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}


class BtVcpuPort:
    """The paravirt.hypervisor.VcpuPort of a bt vCPU."""

    __slots__ = ("c", "index", "ends")

    def __init__(self, c):
        self.c = c
        self.index = c.index
        self.ends = False           # the call changed what the rest of the block assumed

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
        self.ends = True

    def flush_tlb(self, la: int | None) -> None:
        mmu = self.c.mmu
        if la is None:
            mmu.flush()
            self.c.jmp.clear()
            self.ends = True
        else:
            # invlpg, keeping the jump cache unless the page had a fetch
            # mapping (mmu.invlpg clears it always: a page-table update loop
            # would retranslate-lookup every block after each flush)
            vpn = la >> 12
            code = False
            for tr, tw, tx in mmu.pairs:
                tr.pop(vpn, None)
                tw.pop(vpn, None)
                code |= tx.pop(vpn, None) is not None
            mmu.globals.invlpg(vpn, mmu.spaces.values())   # a shared global entry goes too, as invlpg's
            if code:
                self.c.jmp.clear()
                self.ends = True

    def tables_written(self, gpas: list[int]) -> None:
        """Drops the shadow entries built from exactly the written entries
        (a guard that records them per entry offset), else everything built
        from the written pages; the jump cache only when a fetch mapping went."""
        guard = self.c.mmu.guard
        if guard is None:
            return
        pages = guard.table_pages
        rmap = getattr(guard, "rmap", {})
        snaps = getattr(guard, "snaps", {})
        code = False
        for g in gpas:
            ppn = g >> 12
            if ppn not in pages:
                continue
            slots = rmap.get(ppn)
            if not isinstance(slots, dict):      # a guard that tracks whole pages only
                guard.table_written(ppn)
                code = True
                continue
            off = g & 0xFF8
            for o in (off, off | 4):
                lst = slots.pop(o, None)
                if lst:
                    code |= guard._drop(lst)
            snap = snaps.get(ppn)
            if snap is not None:                 # the copy follows: a later resync sees no change here
                snap.data[off:off + 8] = snap.mm[snap.off + off:snap.off + off + 8]
        if code:
            self.c.jmp.clear()
            self.ends = True
            clear = getattr(guard, "_clear_jmp", None)
            if clear is not None:
                clear()

    def halt(self) -> None:
        self.c.rf |= 0x200          # sti; hlt in one step: no lost wake-up
        self.c.halted = True
        self.ends = True


# Calls after which the block always ends: they may raise an interrupt,
# stop the machine or change what the vCPU sees.
_ENDS_BLOCK = frozenset({2, 3, 5, 9, 11})   # set_shared, irq_enable, set_cr3, halt, shutdown


def pv_call(c) -> bool:
    """Runs the hypercall in c's registers; True when the translated block
    must end after it (CR3, halt, an interrupt, a dropped code mapping...).
    Raises GuestFault(#UD) without PV."""
    hv = getattr(c, "pv", None)
    if hv is None:
        raise GuestFault(UD)
    port = getattr(c, "pv_port", None)
    if port is None:
        port = c.pv_port = BtVcpuPort(c)
    port.ends = (c.R[0] & 0xFFFFFFFF) in _ENDS_BLOCK
    hv.dispatch(port)
    return port.ends or c.pending or c.halted


def _vmcall(g: Gen) -> None:
    """A call of the dispatcher; the block goes on after it unless the call
    says otherwise (most MMU calls leave the block's assumptions intact)."""
    from .ctrl import _exit
    g.helper("pv_end = PV_CALL(c)")
    g.emit("if pv_end:")
    g.ind += 1
    _exit(g, f"{g.ins.next_ip:#x}")
    g.ind -= 1
    g.ends = False


EMITTERS = {M.VMCALL: _vmcall}
EXPORTS = {"PV_CALL": pv_call}
