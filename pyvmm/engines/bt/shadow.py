"""Write tracking shared by every vCPU's MMU: pages holding translated code
and (in shadow mode) pages holding guest page tables.

A guest-physical page is *guarded* when writes to it must be seen:

  code pages   a write drops the blocks decoded from it (every vCPU's
               translation cache: `on_code_write(ppn)` callbacks);
  table pages  a write drops every shadow entry whose walk read that page
               (`rmap[ppn]`), and the page stops being guarded until a
               walk reads it again (drop-on-write re-sync).

Guarding works by keeping the page out of every write map (`tw` dicts of
all MMUs): `wmap[ppn]` remembers which (tw dict, virtual page) pairs map
it writable, so protecting a page removes exactly those.  Nothing raises.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

MAX_SPACES = 256       # shadow address spaces kept before a full drop


class PageGuard:
    """Code and page-table write protection for all vCPUs of a machine."""

    def __init__(self):
        self.code_pages: set[int] = set()
        self.table_pages: set[int] = set()
        self.wmap: dict[int, list] = {}       # ppn -> [(tw dict, vpn)] writable mappings
        self.rmap: dict[int, list] = {}       # table ppn -> [(maps, vpn)] entries built from it
        self.code_listeners: list[Callable[[int], None]] = []
        self.mmus: list = []
        self.resyncs = 0        # shadow entries dropped because their tables were written
        self.table_writes = 0   # guest writes that hit a guarded page table

    def __repr__(self) -> str:
        return f"PageGuard(code={len(self.code_pages)}, tables={len(self.table_pages)})"

    def guarded(self, ppn: int) -> bool:
        return ppn in self.code_pages or ppn in self.table_pages

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

    # -- code -----------------------------------------------------------------
    def protect_code(self, ppn: int) -> None:
        if ppn not in self.code_pages:
            self.code_pages.add(ppn)
            self._unmap(ppn)

    def unprotect_code(self, ppn: int) -> None:
        self.code_pages.discard(ppn)

    def code_written(self, ppn: int) -> None:
        for fn in self.code_listeners:
            fn(ppn)

    # -- page tables (shadow mode) -------------------------------------------------
    def watch_tables(self, ppns, maps: tuple, vpn: int) -> None:
        """The entry vpn of the dicts `maps` was built from the table pages `ppns`."""
        for p in ppns:
            lst = self.rmap.get(p)
            if lst is None:
                self.rmap[p] = [(maps, vpn)]
                if p not in self.table_pages:
                    self.table_pages.add(p)
                    self._unmap(p)
            else:
                lst.append((maps, vpn))
                n = len(lst)
                if n >= 512 and not n & (n - 1):
                    lst[:] = [x for x in lst if x[1] in x[0][0] or x[1] in x[0][2]]

    def table_written(self, ppn: int) -> None:
        """A guest write hit table page ppn: drop what was built from it."""
        self.table_writes += 1
        self.table_pages.discard(ppn)
        code = False
        for maps, vpn in self.rmap.pop(ppn, ()):
            tr, tw, tx = maps
            if tr.pop(vpn, None) is not None:
                self.resyncs += 1
            tw.pop(vpn, None)
            if tx.pop(vpn, None) is not None:
                code = True
        if code:
            for m in self.mmus:
                m.jmp.clear()

    def forget_tables(self) -> None:
        """Drops all page-table tracking (every shadow space is being dropped)."""
        self.table_pages.clear()
        self.rmap.clear()
