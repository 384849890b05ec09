"""vmcall under bt: a direct call of pyvmm's hypercall dispatcher.

The hypercall page under bt holds `vmcall; ret` (paravirt/hypercall_page.py).
The translator emits vmcall as one helper call, PV_CALL(c) (pv_call): it
takes the arguments straight from the registers - update_va (ABI 1.1)
without any dispatcher layer, the others through Hypervisor.call with a
BtVcpuPort for what only the engine can do - and runs the page's `ret` in
the same call when it follows, so calling the page costs one translated
block.  The block ends after it only when the call needs that (it loaded
CR3, halted, may have raised an interrupt, or dropped a code mapping).
Page-table writes drop exactly the shadow entries built from the written
entries (PageGuard.rmap), with no write-protection fault, out-of-sync page
or resync, and keep the jump cache unless a fetch mapping went.  A CPU
with no dispatcher attached (c.pv is None, the default) raises #UD, as
vmcall does outside VMX operation."""

from __future__ import annotations

import struct

import iced_x86 as X

from ...paravirt import abi
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
        c = self.c
        if la is None:
            mmu = c.mmu
            if mmu.shadow:
                # as a CR4.PGE toggle: global entries and out-of-sync tables;
                # the shadow spaces stay (write tracking and the precise drops
                # of mmu_update/update_va keep them coherent), so a flush does
                # not make every page of every space walk again
                mmu.tlb_flush()
            else:
                mmu.flush()
                c.jmp.clear()
            self.ends = True
        elif _invlpg(c.mmu, la >> 12):
            c.jmp.clear()
            self.ends = True

    def tables_written(self, gpas: list[int]) -> None:
        """Drops the shadow entries built from exactly the written entries;
        the jump cache only when a fetch mapping went."""
        if _entries_written(self.c.mmu.guard, gpas, 8, self.c.mmu):
            self.c.jmp.clear()
            self.ends = True

    def halt(self) -> None:
        self.c.rf |= 0x200          # sti; hlt in one step: no lost wake-up
        self.c.halted = True
        self.ends = True


def _invlpg(mmu, vpn: int) -> bool:
    """invlpg of one page in mmu's current space (a shared global entry goes
    too, as invlpg's); True when it had a fetch mapping.  Unlike mmu.invlpg
    it keeps the jump cache, which the caller clears only on True (a
    page-table update loop would re-look-up every block after each flush)."""
    code = False
    for tr, tw, tx in mmu.pairs:
        tr.pop(vpn, None)
        tw.pop(vpn, None)
        code |= tx.pop(vpn, None) is not None
    mmu.globals.invlpg(vpn, mmu.spaces.values())
    return code


def _entries_written(guard, gpas, size: int, mmu) -> bool:
    """pyvmm wrote the `size`-byte page-table entries at `gpas`: drops the
    shadow entries built from exactly those entries (PageGuard.rmap keeps
    them per entry offset) and makes the page's copy follow, so a later
    resync of an out-of-sync page sees no change there; blocks translated
    from a written page go too.  The page keeps its guard state: no
    write-protection fault, no resync is involved.

    A vCPU's jump cache only holds blocks for its current maps (a switch of
    space or CPL clears it), so it is cleared only when a fetch mapping of
    those maps went - a dying process's code mappings dropped from the
    kernel's space leave it alone, unlike PageGuard's drops.  True when
    that happened on `mmu` (or a code page was written): the caller clears
    its jump cache and ends the block."""
    if guard is None:
        return False
    rmap, snaps = guard.rmap, guard.snaps
    code = False
    hit: list = []
    for g in gpas:
        if g >> 12 in guard.code_pages:  # an entry written over translated code
            guard.code_written(g >> 12)
            code = True
        slots = rmap.get(g >> 12)
        if slots is None:               # no shadow entry was built from this page
            continue
        off = g & 0xFF8
        lst = slots.pop(off, None)      # an 8-byte entry, or a 4-byte one's low half
        if lst:
            guard.drop(lst, hit)
        lst = slots.pop(off | 4, None) if size == 8 or g & 4 else None
        if lst:
            guard.drop(lst, hit)
        snap = snaps.get(g >> 12)
        if snap is not None:
            snap.data[off:off + 8] = snap.mm[snap.off + off:snap.off + off + 8]
    if hit:
        code |= _clear_jmps(guard, hit, mmu)
    return code


def _clear_jmps(guard, hit: list, mmu) -> bool:
    """Clears the jump cache of each vCPU whose current maps are in `hit`;
    True when mmu's was among them."""
    mine = False
    for m in guard.mmus:
        cur = m.maps
        if any(h is cur for h in hit):
            m.jmp.clear()
            mine |= m is mmu
    return mine


def _entries_written_lists(guard, lists, mmu) -> bool:
    """Drops the shadow entries of the rmap lists `lists` (already taken out
    of the rmap); as _entries_written's result."""
    hit: list = []
    for lst in lists:
        guard.drop(lst, hit)
    return _clear_jmps(guard, hit, mmu) if hit else False


def _update_va(c, hv, R) -> bool:
    """OP_UPDATE_VA without the generic layers: the entry written (in place
    for the common case - an 8-byte entry in the first RAM region, with
    UVA_INVLPG - else through Hypervisor.write_pte, which checks
    everything), the shadow entries built from it dropped, and (UVA_INVLPG)
    the page's translation on this vCPU; the jump cache and the block
    survive unless a fetch mapping went.  True when the block must end."""
    ptr = R[3]
    flags = R[7]
    if flags == _INVLPG and not ptr & 7 and ptr < hv.ram0_size - 7:
        _PACK64(hv.ram0, ptr, R[1])
    else:
        r = hv.write_pte(ptr, R[1], flags)
        if r:
            hv.errors += 1
            R[0] = r if c.mode[0] == 64 else r & 0xFFFFFFFF
            return False
    R[0] = 0
    mmu = c.mmu
    guard = mmu.guard
    code = False
    if guard is not None:
        p = ptr >> 12
        slots = guard.rmap.get(p)
        if p in guard.code_pages or (slots is not None and flags & _PTE32):
            code = _entries_written(guard, (ptr,), 4 if flags & _PTE32 else 8, mmu)
        elif slots is not None:         # _entries_written for one 8-byte entry, inline
            off = ptr & 0xFF8
            a = slots.pop(off, None)
            b = slots.pop(off | 4, None)
            if a or b:
                code = _entries_written_lists(guard, (a or (), b or ()), mmu)
            snap = guard.snaps.get(p)
            if snap is not None:
                _PACK64(snap.data, off, R[1] & 0xFFFFFFFFFFFFFFFF)
    if flags & _INVLPG:
        vpn = R[6] >> 12
        (tr, tw, tx), (ur, uw, ux) = mmu.pairs
        if vpn in tr:
            del tr[vpn]
            tw.pop(vpn, None)
        if vpn in ur:
            del ur[vpn]
            uw.pop(vpn, None)
        if vpn in tx or vpn in ux:
            tx.pop(vpn, None)
            ux.pop(vpn, None)
            code = True
        if mmu.pge:                     # global entries exist only with CR4.PGE
            g = mmu.globals.pairs
            if vpn in g[0][0] or vpn in g[0][2] or vpn in g[1][0] or vpn in g[1][2]:
                mmu.globals.invlpg(vpn, mmu.spaces.values())
    if code:
        c.jmp.clear()
        return True
    return bool(c.pending)


# Calls after which the block always ends: they may raise an interrupt,
# stop the machine or change what the vCPU sees.
_ENDS_BLOCK = frozenset({2, 3, 5, 9, 11})   # set_shared, irq_enable, set_cr3, halt, shutdown
_OP_UPDATE_VA = abi.OP_UPDATE_VA
_INVLPG, _PTE32 = abi.UVA_INVLPG, abi.UVA_PTE32
_PACK64 = struct.Struct("<Q").pack_into
_U64 = struct.Struct("<Q").unpack_from


def _call(c, hv, R) -> bool:
    """Runs the hypercall in c's registers; True when the translated block
    must end after it (CR3, halt, an interrupt, a dropped code mapping...).
    Every call but update_va from CPL 0 (pv_call runs that itself) goes to
    Hypervisor.call with the registers (CPL > 0: dispatch, -EPERM)."""
    op = R[0] & 0xFFFFFFFF
    port = getattr(c, "pv_port", None)
    if port is None:
        port = c.pv_port = BtVcpuPort(c)
    port.ends = op in _ENDS_BLOCK
    if c.cpl:
        hv.dispatch(port)
    else:
        r = hv.call(port, op, R[3], R[1], R[6], R[7])
        R[0] = r if c.mode[0] == 64 else r & 0xFFFFFFFF
    return port.ends or c.pending or c.halted


def pv_call(c) -> int:
    """The translated vmcall: runs the hypercall and, when the next
    instruction is a plain 64-bit `ret` (0xC3, as pyvmm's hypercall page
    has it; read through the current fetch mapping, so a guest that rewrote
    the page or switched to a space without it is seen) whose stack slot is
    mapped and holds a canonical address, that ret too: the call and the
    return in one block.  Returns 0 when the block may go on after the
    vmcall, else the RIP to leave it at (the return address, or the
    vmcall's successor when the call must end the block).  Raises
    GuestFault(#UD) without PV."""
    hv = getattr(c, "pv", None)
    if hv is None:
        raise GuestFault(UD)
    R = c.R
    rip = c.rip
    if R[0] == _OP_UPDATE_VA and not c.cpl:
        hv.counts[_OP_UPDATE_VA] += 1
        ends = _update_va(c, hv, R)
    else:
        ends = _call(c, hv, R)
    if c.mode[0] == 64:
        mmu = c.mmu
        la = (c.sb[1] + rip) & c.ipmask
        ppn = mmu.tx.get(la >> 12)
        if ppn is not None and la & 0xFFF <= 0xFFC:
            pa = (ppn << 12) | ((la & 0xFFF) + 3)
            sp = R[4]
            e = mmu.tr.get(sp >> 12)
            if pa < hv.ram0_size and hv.ram0[pa] == 0xC3 and e is not None and sp & 0xFFF <= 0xFF8:
                ret = _U64(e[0], e[1] + (sp & 0xFFF))[0]
                if ret < 0x800000000000 or ret >= 0xFFFF800000000000:   # else the real ret's #GP
                    R[4] = (sp + 8) & 0xFFFFFFFFFFFFFFFF
                    c.icount += 1
                    return ret
    return rip + 3 if ends else 0


def _vmcall(g: Gen) -> None:
    """A call of the dispatcher (with the page's ret when it follows); the
    block goes on after it unless the call says otherwise (most MMU calls
    leave the block's assumptions intact)."""
    from .ctrl import _exit
    g.helper("pv_rip = PV_CALL(c)")
    g.emit("if pv_rip:")
    g.ind += 1
    _exit(g, "pv_rip")
    g.ind -= 1
    g.ends = False


EMITTERS = {M.VMCALL: _vmcall}
EXPORTS = {"PV_CALL": pv_call}
