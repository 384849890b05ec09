"""A debugging aid for the shadow MMU: after a TLB flush every cached
translation of every address space must equal a fresh walk of the guest
tables.  Enabled with PYVMM_SHADOW_CHECK=N: every N-th flush re-walks
everything (slow); a mismatch is logged as an error with the space, the page
and both translations.  Nothing here raises."""

from __future__ import annotations

import logging
import os

from .faults import GuestFault

log = logging.getLogger(__name__)

try:
    EVERY = int(os.environ.get("PYVMM_SHADOW_CHECK", "0") or 0)
except ValueError:
    EVERY = 0
ENABLED = EVERY > 0


def _walk(mmu, key: tuple, user: bool, vpn: int, access: int):
    """(ppn, writable) of a fresh walk in the space `key`, or None on a fault.
    Saves and restores the MMU's configuration and counters; A/D bits may be set."""
    mode, cr3, wp, nxe, long, smep, smap = key
    saved = (mmu.mode, mmu.cr3, mmu.wp, mmu.nxe, mmu.user, mmu.long, mmu.smep, mmu.smap,
             mmu._tables, mmu._tsize, mmu.walks, mmu.page_faults)
    mmu.mode, mmu.cr3, mmu.wp, mmu.nxe, mmu.user, mmu.long = mode, cr3, wp, nxe, user, long
    mmu.smep, mmu.smap = smep, smap
    la = vpn << 12
    if la & (1 << 47):
        la |= 0xFFFF000000000000
    try:
        pa, w = mmu.translate(la, access)
        return pa >> 12, w
    except GuestFault:
        return None
    finally:
        (mmu.mode, mmu.cr3, mmu.wp, mmu.nxe, mmu.user, mmu.long, mmu.smep, mmu.smap,
         mmu._tables, mmu._tsize, mmu.walks, mmu.page_faults) = saved


def _where_from(mmu, maps, vpn: int) -> str:
    """Which tracked table slots list (maps, vpn), with their state."""
    g = mmu.guard
    out = []
    for p, slots in g.rmap.items():
        for o, lst in slots.items():
            if any(m is maps and v == vpn for m, v in lst):
                snap = g.snaps.get(p)
                sv = int.from_bytes(snap.data[o:o + 8], "little") if snap else None
                cv = int.from_bytes(snap.current()[o:o + 8], "little") if snap else None
                out.append(f"{p:#x}+{o:#x}{'G' if p in g.guarded else ''}{'U' if p in g.unsync else ''}"
                           f" snap={sv:#x} cur={cv:#x}" if snap else f"{p:#x}+{o:#x} nosnap")
    return "from [" + "; ".join(out) + "]"


def check(mmu, where: str) -> int:
    """Compares every cached entry of every space of `mmu` with a fresh walk;
    returns the number of mismatches (each logged).  Only every EVERY-th
    call checks."""
    mmu.checks = getattr(mmu, "checks", 0) + 1
    if mmu.checks % EVERY:
        return 0
    bad = 0
    for key, pairs in list(mmu.spaces.items()):
        if not key or key[0] == 0:
            continue
        for user, (tr, tw, tx) in enumerate(pairs):
            for vpn, e in list(tr.items()):
                got = _walk(mmu, key, bool(user), vpn, 0)
                if got is None or got[0] != e[2]:
                    bad += 1
                    log.error("shadow check (%s): space cr3=%#x user=%d vpn=%#x cached ppn=%#x walk=%s",
                              where, key[1], user, vpn, e[2], got)
            for vpn, e in list(tw.items()):
                got = _walk(mmu, key, bool(user), vpn, 1)
                if got is None or got[0] != e[2]:
                    bad += 1
                    log.error("shadow check (%s): space cr3=%#x user=%d vpn=%#x writable ppn=%#x walk=%s %s",
                              where, key[1], user, vpn, e[2], got, _where_from(mmu, pairs[user], vpn))
            for vpn, ppn in list(tx.items()):
                got = _walk(mmu, key, bool(user), vpn, 2)
                if got is None or got[0] != ppn:
                    bad += 1
                    log.error("shadow check (%s): space cr3=%#x user=%d vpn=%#x fetch ppn=%#x walk=%s",
                              where, key[1], user, vpn, ppn, got)
    return bad
