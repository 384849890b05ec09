"""Shadow page tables with out-of-sync leaf tables (engines/bt/shadow.py,
mmu.py, tablesnap.py), driven directly: 4-level tables built in a plain
GuestMemory, accesses through Mmu.rd*/wr*/fetch, TLB flushes through
cr3_loaded/invlpg/configure.

What must hold: a guest write to a page table never traps twice before
the next flush, and at the flush only the translations built from the
changed entries go; after any flush (CR3 load of the same or another
value, INVLPG of the address, paging-mode change) every access sees the
tables as they are; accessed/dirty bits are set as on hardware, and a
guest that clears D and flushes gets it set again; NX and write
protection changes take effect at the flush."""

from __future__ import annotations

import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.engines.bt.faults import GuestFault
from pyvmm.engines.bt.mmu import PG_LONG, Mmu
from pyvmm.engines.bt.shadow import PageGuard
from pyvmm.engines.bt.tablesnap import TableSnap
from pyvmm.memory import GuestMemory

P, W, U, A, D = 1, 2, 4, 0x20, 0x40
NX = 1 << 63
PML4, PDPT, PD, PT, PT2, PML4B = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000, 0x15000
DATA = 0x100000           # data frames: DATA + n * 0x1000
BASE = 0x40000000         # linear base mapped through PT (PT2 holds BASE + 2 MiB)


def u64(mem, a):
    return mem.read_u64(a)


def setpte(mem, table, idx, value):
    mem.write(table + 8 * idx, struct.pack("<Q", value))


def frame(n):
    return DATA + n * 0x1000


def machine(two_spaces: bool = False):
    """Memory with tables mapping BASE + i*4K -> frame(i) for i < 16 (PT),
    BASE + 2M + i*4K -> frame(32 + i) (PT2); a second PML4 sharing the
    PDPT when two_spaces.  Returns (memory, mmu, code pages written)."""
    mem = GuestMemory(4 << 20)
    for root in (PML4, PML4B) if two_spaces else (PML4,):
        setpte(mem, root, 0, PDPT | P | W | U)
    setpte(mem, PDPT, 1, PD | P | W | U)
    setpte(mem, PD, 0, PT | P | W | U)
    setpte(mem, PD, 1, PT2 | P | W | U)
    for i in range(16):
        setpte(mem, PT, i, frame(i) | P | W | U)
        setpte(mem, PT2, i, frame(32 + i) | P | W | U)
        mem.write(frame(i), bytes([i]) * 8)
        mem.write(frame(32 + i), bytes([32 + i]) * 8)
    code: list[int] = []
    guard = PageGuard()
    guard.code_listeners.append(code.append)
    m = Mmu(mem, Bus("mmio"), code.append, guard=guard, shadow=True)
    m.configure(PG_LONG, PML4, True, True, False, True)
    return mem, m, code


def la(i, table=0):
    return BASE + table * 0x200000 + i * 0x1000


def test_first_write_to_a_table_goes_unsync_and_later_writes_do_not_trap():
    mem, m, _ = machine()
    for i in range(16):
        assert m.rd1(la(i)) == i
    g = m.guard
    assert PT >> 12 in g.guarded
    # map the PT page at la(15) so the guest can write it with ordinary stores
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    before = g.table_writes
    for i in range(3):
        m.wr8(la(15) + 8 * i, frame(40 + i) | P | W | U)
    assert g.table_writes == before + 1          # one trap, then the page is writable
    assert PT >> 12 in g.unsync
    # nothing dropped yet: the stale translations stay until the flush
    assert m.rd1(la(5)) == 5
    m.cr3_loaded()
    assert not g.unsync and PT >> 12 in g.guarded
    for i in range(3):
        assert m.rd1(la(i)) == 40 + i            # changed entries re-walked
    # entries built from unchanged words survived the resync (no new walk)
    walks = m.walks
    for i in range(3, 15):
        assert m.rd1(la(i)) == i
    assert m.walks == walks


def test_resync_drops_only_changed_entries():
    mem, m, _ = machine()
    setpte(mem, PT, 15, PT | P | W)
    for i in range(16):
        m.rd1(la(i))
    g = m.guard
    m.wr8(la(15) + 8 * 7, frame(47) | P | W | U)
    dropped = g.resyncs
    m.cr3_loaded()
    assert g.resyncs == dropped + 1
    assert 7 + BASE // 0x1000 not in m.tr and 6 + BASE // 0x1000 in m.tr
    assert m.rd1(la(7)) == 47


def test_invlpg_sees_a_change_before_any_cr3_load():
    mem, m, _ = machine()
    assert m.rd1(la(3)) == 3
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    m.wr8(la(15) + 8 * 3, frame(43) | P | W | U)
    m.invlpg(la(3))
    assert m.rd1(la(3)) == 43


def test_other_address_space_sees_changes_when_switched_to():
    mem, m, _ = machine(two_spaces=True)
    assert m.rd1(la(4)) == 4
    m.configure(PG_LONG, PML4B, True, True, False, True)
    assert m.rd1(la(4)) == 4                     # space B built its own entry
    m.configure(PG_LONG, PML4, True, True, False, True)
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    m.wr8(la(15) + 8 * 4, frame(44) | P | W | U)  # changed while B is not loaded
    m.invlpg(la(4))                              # only A's TLB is flushed by invlpg
    m.configure(PG_LONG, PML4B, True, True, False, True)   # the switch to B (a CR3 load)
    assert m.rd1(la(4)) == 44


def test_accessed_and_dirty_bits_and_clearing_dirty():
    mem, m, _ = machine()
    assert m.rd1(la(2)) == 2
    assert u64(mem, PT + 16) & (A | D) == A
    m.wr1(la(2), 0x55)
    assert u64(mem, PT + 16) & (A | D) == A | D
    m.wr1(la(2), 0x56)                           # fast path now: D already set
    # the guest cleans the page: clears D (and A), then flushes
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    m.wr8(la(15) + 16, frame(2) | P | W | U)
    m.cr3_loaded()
    assert m.rd1(la(2)) == 0x56
    assert u64(mem, PT + 16) & (A | D) == A
    m.wr1(la(2), 0x57)
    assert u64(mem, PT + 16) & (A | D) == A | D
    # our own A/D updates do not count as guest changes
    assert m.guard.snaps[PT >> 12].changed(m.guard.snaps[PT >> 12].current()) == []


def test_nx_and_write_protect_take_effect_at_the_flush():
    mem, m, _ = machine()
    m.fetch(la(6))
    m.wr1(la(8), 1)
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    m.wr8(la(15) + 8 * 6, frame(6) | P | W | U | NX)
    m.wr8(la(15) + 8 * 8, frame(8) | P | U)
    m.cr3_loaded()
    with pytest.raises(GuestFault):
        m.fetch(la(6))
    with pytest.raises(GuestFault):
        m.wr1(la(8), 2)
    assert m.rd1(la(8)) == 1


def test_a_rewritten_table_is_forgotten_and_a_freed_one_stops_trapping():
    mem, m, _ = machine()
    for i in range(16):
        m.rd1(la(i))
    g = m.guard
    setpte(mem, PD, 2, PT | P | W)               # the table page at BASE + 4 MiB
    m.rd1(BASE + 0x400000 + 15 * 0x1000)         # (PD slot 2 -> PT, entry 15 -> frame 15)
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    for i in range(512):                         # the guest zeroes the whole page (reuse)
        m.wr8(la(15) + 8 * i, 0x5A5A5A5A5A5A5A5A) if i != 15 else None
    m.cr3_loaded()
    assert g.floods >= 1 and PT >> 12 not in g.rmap
    with pytest.raises(GuestFault):
        m.rd1(la(3))


def test_paging_mode_change_syncs_before_the_new_space_is_used():
    mem, m, _ = machine()
    m.rd1(la(9))
    setpte(mem, PT, 15, PT | P | W)
    m.invlpg(la(15))
    m.wr8(la(15) + 8 * 9, frame(46) | P | W | U)
    m.configure(PG_LONG, PML4, False, True, False, True)   # CR0.WP cleared: another space
    assert m.rd1(la(9)) == 46
    m.configure(PG_LONG, PML4, True, True, False, True)    # back: the old space was synced too
    assert m.rd1(la(9)) == 46


def test_table_written_notification_drops_at_once():
    mem, m, _ = machine()
    m.rd1(la(1))
    setpte(mem, PT, 1, frame(41) | P | W | U)    # a write the MMU did not see
    m.guard.table_written(PT >> 12)              # paravirtual notification
    assert m.rd1(la(1)) == 41


def test_snapshot_diff_reports_changed_words():
    mem = GuestMemory(1 << 20)
    mm, off = mem.locate(0x2000, 0x1000)
    s = TableSnap(mm, off)
    mem.write(0x2000 + 0x10C, b"\x01")
    mem.write(0x2000 + 0xFFC, b"\x02")
    assert s.changed(s.current()) == [0x10C, 0xFFC]
    s.take(s.current())
    assert s.changed(s.current()) == []
    s.or_bits(0x10C, 0x20)
    assert s.changed(s.current()) == [0x10C]


def test_nested_mode_is_untouched_by_table_tracking():
    mem = GuestMemory(4 << 20)
    m = Mmu(mem, Bus("mmio"), lambda p: None, shadow=False)
    setpte(mem, PML4, 0, PDPT | P | W | U)
    setpte(mem, PDPT, 1, PD | P | W | U)
    setpte(mem, PD, 0, PT | P | W | U)
    setpte(mem, PT, 0, frame(0) | P | W | U)
    mem.write(frame(0), b"\x0a")
    mem.write(frame(1), b"\x0b")
    m.configure(PG_LONG, PML4, True, True, False, True)
    assert m.rd1(la(0)) == 0x0a
    assert not m.guard.rmap and not m.guard.guarded
    setpte(mem, PT, 0, frame(1) | P | W | U)
    m.cr3_loaded()                               # nested: every flush drops everything
    assert m.rd1(la(0)) == 0x0b


def test_a_change_undone_before_the_flush_still_drops_what_was_built_in_between():
    # fork write-protects a PTE, the copy-on-write fault makes it writable
    # again, an entry is built, the next fork write-protects it again: the
    # final value equals the copy, but the writable entry must still go.
    mem, m, _ = machine()
    setpte(mem, PT, 15, PT | P | W)
    setpte(mem, PT, 5, frame(5) | P | U | A | D)   # read-only to start with
    m.rd1(la(15))
    assert m.rd1(la(5)) == 5
    m.wr8(la(15) + 8 * 5, frame(5) | P | W | U | A | D)   # made writable (goes unsync)
    m.wr1(la(5), 0x77)                                     # entry built from the middle value
    m.wr8(la(15) + 8 * 5, frame(5) | P | U | A | D)       # read-only again, no flush yet
    m.cr3_loaded()
    with pytest.raises(GuestFault):
        m.wr1(la(5), 0x78)
    assert m.rd1(la(5)) == 0x77


PGE_GUEST = """
    mov rdi, cr3
    mov rax, [rdi]
    and rax, ~0xfff
    mov qword ptr [rdi + 8], 0x180003
    mov qword ptr [0x180000], 0x181003
    mov qword ptr [0x181000], 0x182003
    mov qword ptr [0x182000], 0x190003
    mov byte ptr [0x190000], 'a'
    mov byte ptr [0x191000], 'b'
    mov dx, 0x3f8
    mov rbx, 0x8000000000
    mov al, [rbx]
    out dx, al
    mov qword ptr [0x182000], 0x191003
    mov rax, cr4
    xor rax, 0x80
    mov cr4, rax
    xor rax, 0x80
    mov cr4, rax
    mov al, [rbx]
    out dx, al
    cli
    hlt
"""


@pytest.mark.parametrize("mmu", ["shadow", "nested"])
def test_cr4_pge_toggle_flushes_the_tlb(mmu):
    # Linux flushes global pages this way when INVPCID is absent.
    from tests.hostfacts import require_from_setup
    require_from_setup(programs=["as"], package="binutils")
    from pyvmm.machine import StopReason
    from tests.bt.test_system import run
    out, reason, stats = run(PGE_GUEST, {}, mmu=mmu)
    assert out == b"ab"
    assert reason is StopReason.HALTED


# -- global (G-bit) translations shared by all address spaces ------------------
G = 0x100


def global_machine(flags=P | W | U):
    """machine(two_spaces) with the PT entries global (G) and CR4.PGE set."""
    mem, m, code = machine(two_spaces=True)
    for i in range(16):
        setpte(mem, PT, i, frame(i) | flags | G)
    m.pge = True
    m.configure(PG_LONG, PML4, True, True, False, True)
    return mem, m, code


def space(m, root, user=False, wp=True):
    m.configure(PG_LONG, root, wp, True, user, True)


def test_global_entries_are_shared_without_a_walk():
    mem, m, _ = global_machine()
    for i in range(4):
        assert m.rd1(la(i)) == i
    m.wr1(la(1), 0x31)
    m.fetch(la(2))
    space(m, PML4B)
    walks = m.walks
    assert [m.rd1(la(i)) for i in range(4)] == [0, 0x31, 2, 3]
    m.wr1(la(1), 0x32)                           # the dirty global entry is writable too
    m.fetch(la(2))
    assert m.walks == walks and m.globals.hits == 5   # 4 reads (la(1) brings its write entry) + 1 fetch
    # PT2 entries are not global: space B walks for them
    assert m.rd1(la(0, table=1)) == 32
    assert m.walks == walks + 1


def test_without_pge_or_g_bit_each_space_walks():
    mem, m, _ = global_machine()
    m.pge = False
    space(m, PML4B)
    space(m, PML4)
    m.rd1(la(3))
    space(m, PML4B)
    walks = m.walks
    m.rd1(la(3))
    assert m.walks == walks + 1 and m.globals.hits == 0


def test_global_copy_keeps_dirty_bit_semantics():
    mem, m, _ = global_machine()
    assert m.rd1(la(5)) == 5                     # read only: D clear, no writable entry
    space(m, PML4B)
    assert m.rd1(la(5)) == 5
    assert u64(mem, PT + 40) & D == 0
    m.wr1(la(5), 0x66)                           # walks, sets D
    assert u64(mem, PT + 40) & (A | D) == A | D
    space(m, PML4)
    walks = m.walks
    m.wr1(la(5), 0x67)                           # the global writable entry is reused
    assert m.walks == walks and m.rd1(la(5)) == 0x67


def test_global_supervisor_page_faults_for_user_and_read_only_for_writes():
    mem, m, _ = global_machine(flags=P)          # supervisor, read-only
    assert m.rd1(la(7)) == 7
    space(m, PML4B, user=True)
    with pytest.raises(GuestFault):
        m.rd1(la(7))
    space(m, PML4B)
    assert m.rd1(la(7)) == 7
    with pytest.raises(GuestFault):              # CR0.WP: the supervisor write faults
        m.wr1(la(7), 1)
    space(m, PML4B, wp=False)                    # CR0.WP clear: another set of globals
    m.wr1(la(7), 0x17)
    assert m.rd1(la(7)) == 0x17


def test_global_nx_is_kept():
    mem, m, _ = global_machine(flags=P | W | U)
    setpte(mem, PT, 9, frame(9) | P | W | U | G | NX)
    assert m.rd1(la(9)) == 9
    space(m, PML4B)
    assert m.rd1(la(9)) == 9
    with pytest.raises(GuestFault):
        m.fetch(la(9))


def test_invlpg_drops_a_global_entry_from_every_space():
    mem, m, _ = global_machine()
    assert m.rd1(la(4)) == 4
    space(m, PML4B)
    assert m.rd1(la(4)) == 4
    space(m, PML4)
    setpte(mem, PT, 4, frame(44) | P | W | U | G)   # a write the MMU did not see
    m.invlpg(la(4))
    assert m.rd1(la(4)) == 44
    space(m, PML4B)
    assert m.rd1(la(4)) == 44


def test_table_write_drops_global_copies_at_the_switch():
    mem, m, _ = global_machine()
    setpte(mem, PT, 15, PT | P | W)              # not global: the table page itself
    assert m.rd1(la(6)) == 6
    space(m, PML4B)
    assert m.rd1(la(6)) == 6
    m.rd1(la(15))
    m.wr8(la(15) + 8 * 6, frame(46) | P | W | U | G)   # traps once, page unsync
    space(m, PML4)                               # the switch resyncs
    assert m.rd1(la(6)) == 46
    space(m, PML4B)
    assert m.rd1(la(6)) == 46
    assert not m.guard.unsync


def test_pge_toggle_and_mode_change_drop_global_entries():
    mem, m, _ = global_machine()
    m.rd1(la(2))
    m.fetch(la(3))
    space(m, PML4B)
    m.rd1(la(2))
    setpte(mem, PT, 2, frame(42) | P | W | U | G)   # unseen writes
    setpte(mem, PT, 3, frame(43) | P | W | U | G)
    m.tlb_flush()                                # mov to CR4 toggling PGE
    assert not any(m.globals.pairs[0]) and not m.globals.copies
    assert m.rd1(la(2)) == 42
    space(m, PML4)
    assert m.rd1(la(2)) == 42 and m.fetch(la(3)) == frame(43)
    setpte(mem, PT, 2, frame(2) | P | W | U | G)
    space(m, PML4, wp=False)                     # CR0.WP (paging mode) change
    assert not m.globals.copies and m.rd1(la(2)) == 2
    space(m, PML4)                               # the old space's global copies went too
    assert m.rd1(la(2)) == 2
