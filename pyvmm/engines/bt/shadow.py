"""Write tracking shared by every vCPU's MMU: pages holding translated code
and (in shadow mode) pages holding guest page tables.

A guest-physical page is *guarded* when writes to it must be seen:

  code pages   a write drops the blocks decoded from it (every vCPU's
               translation cache: `on_code_write(ppn)` callbacks);
  table pages  a walk read the page: `rmap[ppn][byte offset]` lists the
               shadow entries (maps, virtual page) built from the entry
               at that offset, and a copy of the page is kept
               (tablesnap.TableSnap).

Guarding works by keeping the page out of every write map (`tw` dicts of
all MMUs): `wmap[ppn]` remembers which (tw dict, virtual page) pairs map
it writable, so protecting a page removes exactly those.

Out-of-sync page tables: the first guest write to a guarded table page
does not drop anything; the page becomes *unsync* (writable, no more
traps) and its shadow entries may be stale, as a TLB's may until the
guest flushes.  `resync()` - at every CR3 load, paging-mode change or
full flush, and before an MMU switches to another address space - compares
each unsync page with its copy and drops only the entries built from the
words that changed; the page is guarded again (or forgotten, when it no
longer backs any entry or was rewritten wholesale).

Global translations (GlobalTlb, one per vCPU): entries built from a leaf
with the G bit while CR4.PGE is set are kept once for all of the vCPU's
address spaces and copied into a space on its first miss, without a walk,
so a freshly exec'd process does not re-walk every kernel page.  Nothing
here raises.
"""

from __future__ import annotations

import logging
from typing import Callable

from .tablesnap import TableSnap

log = logging.getLogger(__name__)

MAX_SPACES = 256       # shadow address spaces kept before a full drop
FLOOD_WORDS = 256      # changed 4-byte words beyond which an unsync page counts as rewritten


class PageGuard:
    """Code and page-table write protection for all vCPUs of a machine."""

    def __init__(self, memory=None):
        self.memory = memory                  # set by the first Mmu when None
        self.code_pages: set[int] = set()
        self.wmap: dict[int, list] = {}       # ppn -> [(tw dict, vpn)] writable mappings
        self.rmap: dict[int, dict] = {}       # table ppn -> {byte offset: [(maps, vpn)]}
        self.table_pages = self.rmap          # every tracked table page (in sync or not)
        self.guarded: set[int] = set()        # tracked table pages whose writes trap
        self.unsync: set[int] = set()         # tracked table pages written since their last sync
        self.snaps: dict[int, TableSnap] = {}
        self.code_listeners: list[Callable[[int], None]] = []
        # Which bytes of each code page translations were made from
        # (protect_code): a page in whole_code counts as code throughout.
        self.code_bytes: dict[int, bytearray] = {}
        self.whole_code: set[int] = set()
        self.mmus: list = []
        self.resyncs = 0        # shadow entries dropped because their tables changed
        self.table_writes = 0   # guest writes that hit a guarded page table (page went unsync)
        self.syncs = 0          # unsync pages compared with their copies
        self.floods = 0         # unsync pages found rewritten wholesale (forgotten)

    def __repr__(self) -> str:
        return (f"PageGuard(code={len(self.code_pages)}, tables={len(self.rmap)}, "
                f"unsync={len(self.unsync)})")

    def guarded_page(self, ppn: int) -> bool:
        return ppn in self.code_pages or ppn in self.guarded

    def map_writable(self, tw: dict, vpn: int, ppn: int) -> None:
        lst = self.wmap.get(ppn)
        if lst is None:
            self.wmap[ppn] = [(tw, vpn)]
            return
        lst.append((tw, vpn))
        n = len(lst)
        if n >= 64 and not n & (n - 1):   # prune pairs that flushes made stale (at powers of 2)
            keep = [(t, v) for t, v in lst if (e := t.get(v)) is not None and e[2] == ppn]
            lst[:] = keep

    def _unmap(self, ppn: int) -> None:
        for tw, vpn in self.wmap.pop(ppn, ()):
            e = tw.get(vpn)
            if e is not None and e[2] == ppn:
                del tw[vpn]

    def unmap_pages(self, pages) -> None:
        """Pages that lose their fast-write mappings (GuestMemory.write_ignored):
        their next write takes the slow path, which drops it."""
        for ppn in pages:
            if ppn in self.wmap:
                self._unmap(ppn)

    # -- dirty log (pyvmm/dirty.py): bt's DirtySource -----------------------------
    def log_start(self) -> None:
        """Every page loses its fast-write mappings: the next write to it
        takes the slow path, which marks it (Mmu._fill)."""
        for ppn in list(self.wmap):
            self._unmap(ppn)

    def log_harvest(self, mark) -> None:
        """Nothing to hand over: bt marks GuestMemory.dirty as it writes."""

    def log_rearm(self, pages: set[int]) -> None:
        wmap = self.wmap
        for ppn in pages:
            if ppn in wmap:
                self._unmap(ppn)

    def log_stop(self) -> None:
        """Pages get their fast-write mappings back at their next write."""

    # -- code -----------------------------------------------------------------
    def protect_code(self, ppn: int, spans: list[tuple[int, int]] | None = None) -> None:
        """Page ppn holds translated code: the bytes of `spans` ((page
        offset, length) pairs), or all of it when spans is None."""
        if ppn not in self.code_pages:
            self.code_pages.add(ppn)
            self._unmap(ppn)
        if ppn in self.whole_code:
            return
        if spans is None:
            self.whole_code.add(ppn)
            self.code_bytes.pop(ppn, None)
            return
        mask = self.code_bytes.get(ppn)
        if mask is None:
            mask = self.code_bytes[ppn] = bytearray(0x1000)
        for off, n in spans:
            mask[off:off + n] = b"\x01" * len(mask[off:off + n])

    def unprotect_code(self, ppn: int) -> None:
        self.code_pages.discard(ppn)
        self.whole_code.discard(ppn)
        self.code_bytes.pop(ppn, None)

    def writes_code(self, ppn: int, off: int, size: int) -> bool:
        """Does a write of `size` bytes at offset `off` of code page ppn
        touch bytes that translated code was made from?  Only those
        writes invalidate: real-mode programs (SYSLINUX, BIOS services)
        keep variables and stacks on their code pages, and invalidating
        the page at every such store made them retranslate non-stop."""
        if ppn in self.whole_code:
            return True
        mask = self.code_bytes.get(ppn)
        return mask is None or mask.find(1, off, off + size) >= 0

    def code_written(self, ppn: int) -> None:
        for fn in self.code_listeners:
            fn(ppn)

    # -- page tables (shadow mode) -------------------------------------------------
    def watch_tables(self, addrs, size: int, maps: tuple, vpn: int) -> None:
        """The entry vpn of the dicts `maps` was built by a walk that read the
        `size`-byte page-table entries at the guest-physical addresses `addrs`.

        Every pair listed under an entry was built from the entry's value in
        the page's copy: on an unsync page whose entry the guest changed
        since the copy, the pairs built from the older value go now and the
        copy takes the value this walk read (else a change and its undoing
        before the next flush would hide the entry built in between)."""
        rmap = self.rmap
        for a in addrs:
            p = a >> 12
            slots = rmap.get(p)
            o = a & 0xFFF
            if slots is None:
                slots = rmap[p] = {}
                mm, off = self.memory.locate(p << 12, 0x1000)
                self.snaps[p] = TableSnap(mm, off)
                self.guarded.add(p)
                self._unmap(p)
            elif p in self.unsync and self.snaps[p].refresh(o, size):
                old = slots.pop(o, None)
                if old and self.drop(old):
                    self._clear_jmp()
            lst = slots.get(o)
            if lst is None:
                slots[o] = [(maps, vpn)]
            else:
                lst.append((maps, vpn))
                n = len(lst)
                if n >= 64 and not n & (n - 1):
                    lst[:] = [x for x in lst if x[1] in x[0][0] or x[1] in x[0][2]]

    def bits_set(self, addr: int, bits: int) -> None:
        """The MMU set accessed/dirty bits in the table entry at addr."""
        s = self.snaps.get(addr >> 12)
        if s is not None:
            s.or_bits(addr & 0xFFF, bits)

    def table_dirtied(self, ppn: int) -> None:
        """A guest write hit guarded table page ppn: it goes out of sync
        (writable until the next resync; nothing is dropped yet)."""
        self.table_writes += 1
        self.guarded.discard(ppn)
        self.unsync.add(ppn)

    def drop(self, pairs, hit: list | None = None) -> bool:
        """Drops shadow entries ((maps, vpn) pairs, as rmap lists them); True
        when a fetch mapping was among them, and then the maps that lost
        one are appended to `hit` when it is given."""
        code = False
        for maps, vpn in pairs:
            tr, tw, tx = maps
            if tr.pop(vpn, None) is not None:
                self.resyncs += 1
            tw.pop(vpn, None)
            if tx.pop(vpn, None) is not None:
                code = True
                if hit is not None:
                    hit.append(maps)
        return code

    def _forget(self, ppn: int) -> bool:
        code = False
        for pairs in self.rmap.pop(ppn, {}).values():
            code |= self.drop(pairs)
        self.snaps.pop(ppn, None)
        self.guarded.discard(ppn)
        self.unsync.discard(ppn)
        return code

    def _clear_jmp(self) -> None:
        for m in self.mmus:
            m.jmp.clear()

    def table_written(self, ppn: int) -> None:
        """Table page ppn changed in ways to take effect now (paravirtual
        notification): drop everything built from it and stop tracking it."""
        self.table_writes += 1
        if self._forget(ppn):
            self._clear_jmp()

    def resync(self) -> None:
        """Brings every unsync table page back in sync (see the module doc)."""
        if not self.unsync:
            return
        code = False
        pages, self.unsync = self.unsync, set()
        for p in pages:
            code |= self._sync(p)
        if code:
            self._clear_jmp()

    def _sync(self, p: int) -> bool:
        snap = self.snaps.get(p)
        slots = self.rmap.get(p)
        if snap is None or slots is None:
            return False
        self.syncs += 1
        cur = snap.current()
        changed = snap.changed(cur)
        if len(changed) > FLOOD_WORDS:
            self.floods += 1
            return self._forget(p)
        code = False
        for o in changed:
            lst = slots.pop(o, None)
            if lst is not None:
                code |= self.drop(lst)
            if o & 4:
                lst = slots.pop(o & ~7, None)
                if lst is not None:
                    code |= self.drop(lst)
        if not slots:
            self._forget(p)
            return code
        snap.take(cur)
        self.guarded.add(p)
        self._unmap(p)
        return code

    def forget_tables(self) -> None:
        """Drops all page-table tracking (every shadow space is being dropped)."""
        self.rmap.clear()
        self.guarded.clear()
        self.unsync.clear()
        self.snaps.clear()


class GlobalTlb:
    """Global translations of one vCPU in shadow mode (leaf entry with the
    G bit while CR4.PGE is set), shared by all its address spaces.

    A miss in a space copies the global entry in (`copy_into`) instead of
    walking.  The global entry and every copy are listed in the PageGuard
    rmap under the table entries the walk read, so a changed entry drops
    them as it drops any shadow entry; `drop` (a CR0/CR4 write that
    flushes the TLB, a paging-mode change, a full flush) and `invlpg` drop
    them with every copy.  Nothing raises."""

    def __init__(self, guard: PageGuard):
        self.guard = guard
        self.pairs = (({}, {}, {}), ({}, {}, {}))   # (supervisor, user) x (tr, tw, tx)
        self.src: tuple[dict, dict] = ({}, {})      # vpn -> (table entry addresses, entry size)
        self.copies: list[tuple] = []               # (space maps, vpn) holding a global entry
        self.key: tuple = ()                        # (mode, wp, nxe, long) they were built under
        self.hits = 0                               # misses served without a walk
        self._prune_at = 4096                       # len(copies) that triggers a prune

    def __repr__(self) -> str:
        return f"GlobalTlb(sup={len(self.pairs[0][0])}, user={len(self.pairs[1][0])}, copies={len(self.copies)})"

    def rekey(self, key: tuple) -> bool:
        """The paging mode is now `key`: entries built under another go.
        True when a fetch mapping went."""
        if key == self.key:
            return False
        self.key = key
        return self.drop()

    def drop(self) -> bool:
        """Drops every global entry and every copy; True when a fetch mapping went."""
        code = False
        for maps, vpn in self.copies:
            tr, tw, tx = maps
            tr.pop(vpn, None)
            tw.pop(vpn, None)
            code |= tx.pop(vpn, None) is not None
        self.copies = []
        self._prune_at = 4096
        for maps in self.pairs:
            code |= bool(maps[2])
            for d in maps:
                d.clear()
        for d in self.src:
            d.clear()
        return code

    def invlpg(self, vpn: int, spaces) -> None:
        """INVLPG: the global entry of vpn goes, with its copy in every space
        (`spaces`: the vCPU's (supervisor, user) map pairs)."""
        g = self.pairs
        if vpn in g[0][0] or vpn in g[0][2] or vpn in g[1][0] or vpn in g[1][2]:
            for pairs in (g, *spaces):
                for maps in pairs:
                    for d in maps:
                        d.pop(vpn, None)

    def store(self, user: int, maps: tuple, vpn: int, tables, size: int,
              rd=None, wr=None, fetch: int | None = None) -> None:
        """A walk that read the `size`-byte entries at `tables` built global
        entry vpn - read entry `rd` (with write entry `wr` or none) or fetch
        page `fetch` - and the same entry in the space `maps`."""
        g = self.pairs[user]
        if fetch is not None:
            g[2][vpn] = fetch
        else:
            g[0][vpn] = rd
            if wr is not None:
                g[1][vpn] = wr
                self.guard.map_writable(g[1], vpn, wr[2])
            else:
                g[1].pop(vpn, None)
        tables = tuple(tables)
        src = self.src[user]
        old = src.get(vpn)
        if old is None or old[0] != tables:
            src[vpn] = (tables, size)
        self.guard.watch_tables(tables, size, g, vpn)
        self._copied(maps, vpn)

    def copy_into(self, user: int, maps: tuple, vpn: int, access: int) -> bool:
        """Copies the global entry vpn into the space `maps` when it allows
        `access` (0 read, 1 write, 2 fetch), tracked by the table entries it
        was built from as a walk's entry would be; False (walk instead) when
        there is none or one of those tables is out of sync."""
        g = self.pairs[user]
        if access == 2:
            e = g[2].get(vpn)
        else:
            e = g[0].get(vpn)
            if access == 1 and vpn not in g[1]:
                return False
        if e is None:
            return False
        src = self.src[user].get(vpn)
        if src is None:
            return False
        tables, size = src
        guard = self.guard
        unsync = guard.unsync
        if unsync:
            for a in tables:
                if a >> 12 in unsync:
                    return False
        if access == 2:
            maps[2][vpn] = e
        else:
            maps[0][vpn] = e
            w = g[1].get(vpn)
            dirty = guard.memory.dirty
            if w is not None and (dirty is None or access == 1):   # the dirty log maps on writes only
                maps[1][vpn] = w
                guard.map_writable(maps[1], vpn, w[2])
                if dirty is not None:
                    dirty.add(w[2])
        guard.watch_tables(tables, size, maps, vpn)
        self._copied(maps, vpn)
        self.hits += 1
        return True

    def _copied(self, maps: tuple, vpn: int) -> None:
        lst = self.copies
        lst.append((maps, vpn))
        if len(lst) >= self._prune_at:      # prune copies already dropped (amortised: the
            lst[:] = [(m, v) for m, v in lst if v in m[0] or v in m[2]]   # live ones double first)
            self._prune_at = max(4096, 2 * len(lst))
