"""Block lookup caches set aside across mode switches (engines/bt/jumpcache.py)."""

from __future__ import annotations

from pyvmm.engines.bt.jumpcache import LIMIT, JumpCaches

USER, KERNEL = (64, 64, 3), (64, 64, 0)


def test_the_cache_of_the_mode_left_comes_back_on_return():
    jc = JumpCaches()
    user_maps, kernel_maps = object(), object()
    user = jc.new()
    user[0x401000] = "user block"
    kernel = jc.switch(user, USER, user_maps, KERNEL, kernel_maps, 5, True)      # syscall
    assert kernel is not user and not kernel
    kernel[0xFFFFFFFF81000000] = "kernel block"
    back = jc.switch(kernel, KERNEL, kernel_maps, USER, user_maps, 5, True)      # sysret
    assert back is user and back[0x401000] == "user block"
    again = jc.switch(back, USER, user_maps, KERNEL, kernel_maps, 5, True)
    assert again is kernel and jc.reused == 2


def test_clearing_the_cache_in_use_retires_those_set_aside():
    jc = JumpCaches()
    maps_u, maps_k = object(), object()
    user = jc.new()
    user[1] = "u"
    kernel = jc.switch(user, USER, maps_u, KERNEL, maps_k, 0, True)
    kernel.clear()                       # e.g. the kernel wrote a page of code
    assert jc.switch(kernel, KERNEL, maps_k, USER, maps_u, 0, True) is not user


def test_a_tlb_flush_or_other_maps_give_a_fresh_cache():
    jc = JumpCaches()
    maps_u, maps_k, other = object(), object(), object()
    user = jc.new()
    user[1] = "u"
    kernel = jc.switch(user, USER, maps_u, KERNEL, maps_k, 0, True)
    assert jc.switch(kernel, KERNEL, maps_k, USER, maps_u, 1, True) is not user     # flush count moved
    jc2 = JumpCaches()
    u2 = jc2.new()
    u2[1] = "u"
    k2 = jc2.switch(u2, USER, maps_u, KERNEL, maps_k, 0, True)
    assert jc2.switch(k2, KERNEL, maps_k, USER, other, 0, True) is not u2           # another address space


def test_an_invalid_cache_or_keep_off_is_emptied_in_place():
    jc = JumpCaches()
    c = jc.new()
    c[1] = "x"
    assert jc.switch(c, USER, object(), KERNEL, object(), 0, False) is c and not c
    jc.keep = False
    c[2] = "y"
    assert jc.switch(c, USER, object(), KERNEL, object(), 0, True) is c and not c and not jc.saved


def test_few_caches_are_kept():
    jc = JumpCaches()
    maps = [object() for _ in range(3 * LIMIT)]
    cur = jc.new()
    for i, m in enumerate(maps[1:], 1):
        cur = jc.switch(cur, USER, maps[i - 1], USER, m, 0, True)
        assert len(jc.saved) <= LIMIT


def test_a_vcpu_switching_cache_ends_its_block_loop():
    """run_blocks holds the cache it started with: a switch mid-loop must
    end the loop (pending), or lookups of the new mode would land in the
    old mode's cache."""
    from pyvmm.boot.entry import long_mode_64
    from pyvmm.bus import Bus
    from pyvmm.engines.bt.engine import BtCpu
    from pyvmm.engines.bt.shadow import PageGuard
    from pyvmm.memory import GuestMemory
    mem = GuestMemory(8 << 20)
    c = BtCpu(mem, Bus("io"), Bus("mmio"), PageGuard(), shadow=True)
    try:
        c.load(long_mode_64(mem, 0x100000))
        kernel_cache = c.jmp
        kernel_cache[0x100000] = "kernel block"
        c.pending = False
        c.cpl = 3                          # what a return to user mode changes
        c.update_mode()
        assert c.jmp is not kernel_cache and c.mmu.jmp is c.jmp
        assert c.pending
        c.pending = False
        c.cpl = 0
        c.update_mode()
        assert c.jmp is kernel_cache and c.jmp[0x100000] == "kernel block" and c.pending
    finally:
        c.detach()
