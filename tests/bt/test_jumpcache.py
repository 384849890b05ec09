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


def test_blocks_after_a_switch_are_filed_in_the_new_cache():
    """run_blocks must look blocks up in the cache of the mode the previous
    block left the vCPU in, not in the one it started with."""
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

        def to_user(cpu):                 # what a sysret does to the vCPU
            cpu.cpl = 3
            cpu.update_mode()
            cpu.rip = 0x2000

        def stop(cpu):
            cpu.halted = True
        kernel_cache[0x100000] = to_user
        c.translator.lookup = lambda single=False: stop
        c.run_blocks(5)
        assert c.halted and c.jmp is not kernel_cache
        assert c.jmp[0x2000] is stop and 0x2000 not in kernel_cache
    finally:
        c.detach()
