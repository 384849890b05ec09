"""MMU: linear -> guest physical, with direct access to guest RAM.

Two dicts map a linear page number to (mmap, offset of the page in it):
`tr` for reads, `tw` for writes (and `tx`, page number -> physical page,
for instruction fetch).  In shadow mode these maps are kept per address
space (CR3 and paging mode; supervisor and user apart) and stay valid
across CR3 loads, because every page-table page a walk reads is
write-guarded: the first guest write lets the page go out of sync, and
at the next TLB flush (CR3 load, paging-mode change, switch of address
space) shadow.PageGuard.resync drops just the entries built from the
words that changed - between the write and the flush they may be stale,
as TLB entries may.  In nested mode there is one set, dropped at every CR3
load or paging change.  Shadow mode also keeps *global* translations
(leaf entry with the G bit while CR4.PGE is set) in one set of maps
shared by all address spaces of the vCPU: a miss in a space first looks
there and copies the entry in without a walk (shadow.GlobalTlb); they
go at a CR0/CR4 write that flushes the TLB, a change of the paging mode,
INVLPG of the page, and (like every shadow entry, through the rmap) when
a table entry they were built from changes.  A miss walks the guest page tables (none,
32-bit, PAE or 4-level) and fills them; a page that is not RAM is never
cached, so its accesses always reach the MMIO bus.  Pages holding translated
code are kept out of `tw`, so writes to them take the slow path, which tells
the translation cache (self-modifying code).

A walk checks P, RW, US and NX at every level with CR0.WP, EFER.NXE and
CR4.SMEP/SMAP (EFLAGS.AC), and reserved bits (#PF with RSVD), as
tests/test_paging_matrix.py checks against QEMU over the combinations.

The interface the translator uses is rd1/2/4/8(la), wr1/2/4/8(la, v),
translate(la, access) and flush(); a later shadow-page-table MMU keeps it.
Raises GuestFault(#PF / #GP) for inaccessible or non-canonical addresses.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Callable

from . import shadowcheck
from .faults import PF, ApicRestart, GuestFault, NonCanonical, SmcRestart
from .shadow import MAX_SPACES, GlobalTlb, PageGuard

log = logging.getLogger(__name__)

# PYVMM_SHADOW_GLOBAL=0 turns the shared global translations off (for A/B measurements)
GLOBALS = os.environ.get("PYVMM_SHADOW_GLOBAL", "1") != "0"

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
U16, U32, U64 = _U16.unpack_from, _U32.unpack_from, _U64.unpack_from
P16, P32, P64 = _U16.pack_into, _U32.pack_into, _U64.pack_into

READ, WRITE, FETCH = 0, 1, 2
PG_NONE, PG_32, PG_PAE, PG_LONG = 0, 1, 2, 3
_P, _W, _U, _A, _D, _PS = 1, 2, 4, 0x20, 0x40, 0x80
_NX = 1 << 63
LAPIC_PAGE = 0xFEE00      # the local APIC's MMIO page (relocation is not supported)
_ADDR = 0x000FFFFFFFFFF000
# MAXPHYADDR as CPUID leaf 0x80000008 reports it (cpuid.py): entry bits from
# it to 51 are reserved (#PF with RSVD set).
PHYS_BITS = 40
_RSVD_ADDR = _ADDR & ~((1 << PHYS_BITS) - 1)


def _new_pairs() -> tuple:
    return (({}, {}, {}), ({}, {}, {}))


class Mmu:
    """Linear address translation for one vCPU.

    `shadow` True keeps one pair of maps (supervisor, user) per address
    space, tagged by CR3 and the paging mode, across CR3 loads; entries
    stay coherent because every page table a walk reads is write-guarded
    (shadow.PageGuard): a written table goes out of sync until the next
    flush, which drops only what was built from the changed entries.  False ("nested"): one pair of maps, dropped on
    every CR3 load and paging-mode change, so every miss walks again."""

    def __init__(self, memory, mmio_bus, on_code_write: Callable[[int], None],
                 guard: PageGuard | None = None, shadow: bool = False):
        self.memory = memory
        self.mmio = mmio_bus
        if guard is None:
            guard = PageGuard(memory)
            guard.code_listeners.append(on_code_write)
        if guard.memory is None:
            guard.memory = memory
        self.guard = guard
        self.on_code_write = guard.code_written  # called with a physical page number
        guard.mmus.append(self)
        self.code_pages = guard.code_pages
        self.table_pages = guard.guarded     # page tables whose writes must trap
        self.shadow = shadow
        self.spaces: dict[tuple, tuple] = {}
        self.pairs = _new_pairs()           # (supervisor, user) x (tr, tw, tx)
        self.tr: dict[int, tuple] = self.pairs[0][0]
        self.tw: dict[int, tuple] = self.pairs[0][1]
        self.tx: dict[int, int] = self.pairs[0][2]   # fetch: vpn -> ppn
        self.maps = self.pairs[0]
        self.jmp: dict = {}     # the vCPU's block lookup cache, cleared when fetch mappings change
        self.key: tuple = ()
        self.mode = PG_NONE
        self.cr3 = 0
        self.wp = False
        self.nxe = False
        self.smep = False      # CR4.SMEP, CR4.SMAP (set by the vCPU before configure)
        self.smap = False
        self.ac: Callable[[], bool] = lambda: False   # EFLAGS.AC, for SMAP (set by the vCPU)
        self.implicit = False  # an implicit supervisor access (descriptor tables): SMAP ignores AC
        self._cacheable = True
        self.user = False      # CPL == 3
        self.long = False      # canonical checks
        self.smc_ok = False    # single-step path: let writes to code pages through
        self.lapic = None      # this vCPU's local APIC: a write that may deliver ends the block
        self._tables: list[int] = []     # guest-physical addresses of the entries the last walk read
        self._tsize = 8
        self._gleaf = False    # the last walk ended at a global entry (G bit, CR4.PGE)
        self.pge = False       # CR4.PGE (set by the vCPU before configure)
        self.globals = GlobalTlb(guard)     # global translations shared by all spaces (shadow)
        self.walks = 0
        self.tlb_flushes = 0
        self.page_faults = 0
        self.shadow_fills = 0

    def configure(self, mode: int, cr3: int, wp: bool, nxe: bool, user: bool, long: bool) -> None:
        """Selects the address space for the current paging state and CPL
        (switching between supervisor and user maps costs nothing)."""
        key = (mode, (cr3 & _ADDR) if mode else 0, wp, nxe, long, self.smep, self.smap)
        self.mode, self.cr3, self.wp, self.nxe, self.user, self.long = mode, cr3, wp, nxe, user, long
        if key != self.key:
            self.key = key
            if self.shadow:
                if self.globals.rekey((mode, wp, nxe, long, self.smep, self.smap)):
                    self.jmp.clear()
                self.guard.resync()     # other spaces' entries must be in sync when used
                pairs = self.spaces.get(key)
                if pairs is None:
                    if len(self.spaces) >= MAX_SPACES:
                        self.flush()
                    pairs = self.spaces[key] = _new_pairs()
                self.pairs = pairs
            else:
                self._drop_pairs()
        self.maps = self.pairs[1 if user else 0]
        self.tr, self.tw, self.tx = self.maps

    def _drop_pairs(self) -> None:
        self.jmp.clear()
        for maps in self.pairs:
            for d in maps:
                d.clear()
        self.tlb_flushes += 1

    def cr3_loaded(self) -> None:
        """A mov to CR3 (same value or not): a TLB flush without PCIDs.
        Shadow mode keeps its spaces and brings out-of-sync tables back in
        sync (dropping the entries built from changed words)."""
        if not self.shadow:
            self._drop_pairs()
        else:
            self.guard.resync()
            self.tlb_flushes += 1
            if shadowcheck.ENABLED:
                shadowcheck.check(self, "tlb flush")

    def tlb_flush(self) -> None:
        """A mov to CR0/CR4 that flushes the TLB, global entries included
        (CR0.PG/WP, CR4.PGE/PAE/PSE/SMEP/SMAP changes)."""
        if self.shadow and self.globals.drop():
            self.jmp.clear()
        self.cr3_loaded()


    def flush(self) -> None:
        """Drops every translation of this vCPU (all spaces)."""
        if self.shadow:
            self.guard.resync()
        self._drop_pairs()
        for pairs in self.spaces.values():
            for maps in pairs:
                for d in maps:
                    d.clear()
        if self.shadow:
            self.globals.drop()
            self.spaces.clear()
            self.spaces[self.key] = self.pairs
            if all(m is self or not m.spaces for m in self.guard.mmus):
                self.guard.forget_tables()

    def invlpg(self, la: int) -> None:
        vpn = la >> 12
        self.jmp.clear()
        for maps in self.pairs:
            for d in maps:
                d.pop(vpn, None)
        self.globals.invlpg(vpn, self.spaces.values())

    def protect_code(self, ppn: int, spans: list[tuple[int, int]] | None = None) -> None:
        """Marks a physical page as holding translated code (the bytes of
        spans, or all of it)."""
        self.guard.protect_code(ppn, spans)

    def unprotect_code(self, ppn: int) -> None:
        self.guard.unprotect_code(ppn)

    # -- walk ---------------------------------------------------------------
    def _pf(self, la: int, access: int, present: bool, rsvd: bool = False) -> GuestFault:
        self.page_faults += 1
        err = (1 if present else 0) | (2 if access == WRITE else 0) | (4 if self.user else 0)
        if rsvd:
            err |= 0x9              # a reserved bit: P and RSVD
        # I/D only where the CPU can tell fetches apart: SMEP, or NXE with
        # PAE/4-level paging (SDM 4.7).
        if access == FETCH and (self.smep or (self.nxe and self.mode != PG_32)):
            err |= 0x10
        return GuestFault(PF, err, cr2=la)

    def _rdpte(self, addr: int, size: int) -> int:
        mem = self.memory
        if not mem.is_ram(addr, size):
            return 0
        return mem.read_u64(addr) if size == 8 else mem.read_u32(addr)

    def _setbits(self, addr: int, size: int, old: int, bits: int) -> None:
        if old & bits != bits:
            mem = self.memory
            mm, off = mem.locate(addr, size)
            if mem.dirty is not None:
                mem.dirty.add(addr >> 12)
            if size == 8:
                P64(mm, off, old | bits)
            else:
                P32(mm, off, (old | bits) & 0xFFFFFFFF)
            if self.shadow:
                self.guard.bits_set(addr, bits)

    def translate(self, la: int, access: int) -> tuple[int, bool]:
        """Walks the page tables: returns (physical address, writable).

        Each entry is checked for presence, then for reserved bits; a
        non-leaf entry gets its accessed bit as the walk passes it (even
        when the access then faults, as the CPU sets it on the entries it
        uses), the leaf gets A (and D on a write) only when the access is
        allowed.  Raises GuestFault(#PF) when the access is not allowed."""
        if self.long and not (la < 0x0000800000000000 or la >= 0xFFFF800000000000):
            raise NonCanonical(la)
        if self.mode == PG_NONE:
            return la & 0xFFFFFFFF, True
        self.walks += 1
        if self.mode == PG_32:
            levels = [(self.cr3 & 0xFFFFF000) + ((la >> 22) & 0x3FF) * 4,
                      None]
            size, shifts = 4, (22, 12)
        elif self.mode == PG_PAE:
            pdpte = self._rdpte((self.cr3 & 0xFFFFFFE0) + ((la >> 30) & 3) * 8, 8)
            if not pdpte & _P:
                raise self._pf(la, access, False)
            levels = [(pdpte & _ADDR) + ((la >> 21) & 0x1FF) * 8, None]
            size, shifts = 8, (21, 12)
        else:
            levels = [(self.cr3 & _ADDR) + ((la >> 39) & 0x1FF) * 8, None, None, None]
            size, shifts = 8, (39, 30, 21, 12)
        writable, user, nx = True, True, False
        # Reserved in every PAE/4-level entry: address bits from MAXPHYADDR
        # on (to bit 62 with PAE, where 4-level paging ignores 62:52), and NX
        # without EFER.NXE.  Also reserved: PS in a PML4E, and bits 13.. of
        # a large page's base (bit 12 is its PAT bit); bit 21 of a 4 MiB page.
        rsvd = _RSVD_ADDR if self.nxe else _RSVD_ADDR | _NX
        if self.mode == PG_PAE:
            rsvd |= 0x7FF0000000000000
        entries = []
        if self.mode == PG_PAE:
            entries.append(((self.cr3 & 0xFFFFFFE0) + ((la >> 30) & 3) * 8, pdpte))
        addr = levels[0]
        for depth, shift in enumerate(shifts):
            e = self._rdpte(addr, size)
            if not e & _P:
                raise self._pf(la, access, False)
            last = shift == 12 or (e & _PS and shift in (21, 22, 30))
            if size == 8 and (e & rsvd or (shift == 39 and e & _PS)
                              or (last and shift != 12 and e & ((1 << shift) - 1) & ~0x1FFF)):
                raise self._pf(la, access, True, rsvd=True)
            if last and shift == 22 and e & (1 << 21):
                raise self._pf(la, access, True, rsvd=True)
            entries.append((addr, e))
            writable &= bool(e & _W)
            user &= bool(e & _U)
            if size == 8 and self.nxe and e & _NX:
                nx = True
            if last:
                if shift == 22:  # 4 MiB page (PSE): bits 13-20 are PA 32-39
                    base = (e & 0xFFC00000) | ((e >> 13) & 0xFF) << 32
                else:
                    base = e & _ADDR & ~((1 << shift) - 1)
                pa = base + (la & ((1 << shift) - 1))
                break
            self._setbits(addr, size, e, _A)
            addr = (e & (_ADDR if size == 8 else 0xFFFFF000)) + ((la >> shifts[depth + 1]) & (0x3FF if size == 4 else 0x1FF)) * size
        if self.user and not user:
            raise self._pf(la, access, True)
        if not self.user and user:
            if access == FETCH and self.smep:
                raise self._pf(la, access, True)
            if access != FETCH and self.smap and (self.implicit or not self.ac()):
                raise self._pf(la, access, True)
        if access == WRITE and not writable and (self.user or self.wp):
            raise self._pf(la, access, True)
        if access == FETCH and nx:
            raise self._pf(la, access, True)
        a, e = entries[-1]
        self._setbits(a, size, e, _A | (_D if access == WRITE else 0))
        self._tables = [a for a, _ in entries]
        self._tsize = size
        self._gleaf = self.pge and self.shadow and GLOBALS and bool(entries[-1][1] & 0x100)
        # A supervisor's view of a user page under SMAP depends on EFLAGS.AC,
        # so it is never cached (every access walks and checks AC).
        self._cacheable = not (self.smap and user and not self.user)
        ok_write = writable or not (self.user or self.wp)
        dirty = access == WRITE or bool(entries[-1][1] & _D)
        return pa, ok_write and dirty

    def fetch(self, la: int) -> int:
        """Physical address of an instruction fetch at la (cached per page).
        Raises GuestFault(#PF/#GP)."""
        vpn = la >> 12
        ppn = self.tx.get(vpn)
        if ppn is not None:
            return (ppn << 12) | (la & 0xFFF)
        if self.shadow and self.globals.copy_into(self.user, self.maps, vpn, FETCH):
            return (self.tx[vpn] << 12) | (la & 0xFFF)
        pa, _ = self.translate(la, FETCH)
        if self.mode != PG_NONE:
            self.tx[vpn] = pa >> 12
            if self.shadow:
                self.guard.watch_tables(self._tables, self._tsize, self.maps, vpn)
                if self._gleaf:
                    self.globals.store(self.user, self.maps, vpn, self._tables, self._tsize,
                                       fetch=pa >> 12)
        return pa

    def wspan(self, la: int):
        """(mmap, offset of la) when la's page is plain writable RAM, else
        None (code, page tables, MMIO: the caller takes the slow path).
        Raises GuestFault(#PF/#GP)."""
        e = self.tw.get(la >> 12)
        if e is None:
            entry, _ = self._fill(la, WRITE)
            e = self.tw.get(la >> 12)
            if e is None:
                return None
        return e[0], e[1] + (la & 0xFFF)

    def rspan(self, la: int):
        """(mmap, offset of la) when la's page is RAM, else None. Raises GuestFault."""
        e = self.tr.get(la >> 12)
        if e is None:
            entry, _ = self._fill(la, READ)
            if entry is None:
                return None
            e = entry
        return e[0], e[1] + (la & 0xFFF)

    # -- slow paths ---------------------------------------------------------
    def _fill(self, la: int, access: int):
        """Translates la; returns (mm, page offset) for RAM or (None, pa)."""
        if self.shadow and self.globals.copy_into(self.user, self.maps, la >> 12, access):
            e = self.tr[la >> 12]
            return e, (e[2] << 12) | (la & 0xFFF)
        pa, writable = self.translate(la, access)
        ppn = pa >> 12
        mem = self.memory
        page = pa & ~0xFFF
        if not mem.is_ram(page, 0x1000):
            return None, pa
        mm, off = mem.locate(page, 0x1000)
        entry = (mm, off, ppn)
        if not self._cacheable:
            return entry, pa
        vpn = la >> 12
        tr, tw = self.tr, self.tw
        tr[vpn] = entry
        if self.shadow and self.mode != PG_NONE:
            self.shadow_fills += 1
            self.guard.watch_tables(self._tables, self._tsize, self.maps, vpn)
        w = writable and ppn not in self.code_pages and ppn not in self.table_pages \
            and ppn not in mem.write_ignored
        if w and mem.dirty is not None:
            # Dirty log on: only a write maps a page for fast writes, and marks it.
            w = access == WRITE
            if w:
                mem.dirty.add(ppn)
        if w:
            tw[vpn] = entry
            self.guard.map_writable(tw, vpn, ppn)
        if self._gleaf and self.mode != PG_NONE:
            self.globals.store(self.user, self.maps, vpn, self._tables, self._tsize,
                               rd=entry, wr=entry if w else None)
        return entry, pa

    def read_slow(self, la: int, size: int) -> int:
        if (la & 0xFFF) + size > 0x1000:
            v = 0
            for i in range(size):
                v |= self.read_slow((la + i) & 0xFFFFFFFFFFFFFFFF, 1) << (8 * i)
            return v
        entry, pa = self._fill(la, READ)
        if entry is None:
            return self.mmio.read(pa, size)
        o = entry[1] + (la & 0xFFF)
        return int.from_bytes(entry[0][o:o + size], "little")

    def read_for_write(self, la: int, size: int) -> int:
        """The read of a read-modify-write: both pages are checked for
        writing first, so a fault has the error code of a write, as the CPU
        reports it (W set, even when the page is only missing)."""
        self.translate(la, WRITE)
        if (la & 0xFFF) + size > 0x1000:
            self.translate(((la | 0xFFF) + 1) & 0xFFFFFFFFFFFFFFFF, WRITE)
        return self.read_slow(la, size)

    def rw1(self, la: int) -> int:
        return self.read_for_write(la, 1)

    def rw2(self, la: int) -> int:
        return self.read_for_write(la, 2)

    def rw4(self, la: int) -> int:
        return self.read_for_write(la, 4)

    def rw8(self, la: int) -> int:
        return self.read_for_write(la, 8)

    def write_slow(self, la: int, size: int, v: int) -> None:
        if (la & 0xFFF) + size > 0x1000:
            # Check both pages first so a fault leaves memory untouched; a
            # fault on the second reports its first byte in CR2, as the CPU does.
            self.translate(la, WRITE)
            self.translate(((la | 0xFFF) + 1) & 0xFFFFFFFFFFFFFFFF, WRITE)
            for i in range(size):
                self.write_slow((la + i) & 0xFFFFFFFFFFFFFFFF, 1, (v >> (8 * i)) & 0xFF)
            return
        entry, pa = self._fill(la, WRITE)
        if entry is None:
            if pa >> 12 == LAPIC_PAGE and not self.smc_ok and self.lapic is not None \
                    and self.lapic.write_may_deliver(pa & 0xFFF):
                raise ApicRestart()
            self.mmio.write(pa, size, v)
            return
        ppn = entry[2]
        if ppn in self.memory.write_ignored:
            return                  # read-only shadow RAM: the write goes to ROM, i.e. nowhere
        if ppn in self.code_pages and self.guard.writes_code(ppn, la & 0xFFF, size):
            if not self.smc_ok:
                self.on_code_write(ppn)
                raise SmcRestart()
            self.on_code_write(ppn)
        o = entry[1] + (la & 0xFFF)
        entry[0][o:o + size] = (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.memory.dirty is not None:
            self.memory.dirty.add(ppn)
        if ppn in self.table_pages:
            self.guard.table_dirtied(ppn)

    # -- fast paths (bound into translated blocks) ---------------------------
    def rd1(self, la: int) -> int:
        e = self.tr.get(la >> 12)
        if e is not None:
            return e[0][e[1] + (la & 0xFFF)]
        return self.read_slow(la, 1)

    def rd2(self, la: int) -> int:
        e = self.tr.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFFE:
            return U16(e[0], e[1] + (la & 0xFFF))[0]
        return self.read_slow(la, 2)

    def rd4(self, la: int) -> int:
        e = self.tr.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFFC:
            return U32(e[0], e[1] + (la & 0xFFF))[0]
        return self.read_slow(la, 4)

    def rd8(self, la: int) -> int:
        e = self.tr.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFF8:
            return U64(e[0], e[1] + (la & 0xFFF))[0]
        return self.read_slow(la, 8)

    def wr1(self, la: int, v: int) -> None:
        e = self.tw.get(la >> 12)
        if e is not None:
            e[0][e[1] + (la & 0xFFF)] = v
        else:
            self.write_slow(la, 1, v)

    def wr2(self, la: int, v: int) -> None:
        e = self.tw.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFFE:
            P16(e[0], e[1] + (la & 0xFFF), v)
        else:
            self.write_slow(la, 2, v)

    def wr4(self, la: int, v: int) -> None:
        e = self.tw.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFFC:
            P32(e[0], e[1] + (la & 0xFFF), v)
        else:
            self.write_slow(la, 4, v)

    def wr8(self, la: int, v: int) -> None:
        e = self.tw.get(la >> 12)
        if e is not None and la & 0xFFF <= 0xFF8:
            P64(e[0], e[1] + (la & 0xFFF), v)
        else:
            self.write_slow(la, 8, v)

    def read_bytes(self, la: int, n: int) -> bytes:
        return bytes(self.rd1((la + i) & 0xFFFFFFFFFFFFFFFF) for i in range(n))
