"""The bt side of pyvmm's paravirtual MMU (engines/bt/pvcall.py): the
translated vmcall's direct path for update_va (ABI 1.1) and the generic
path for the other calls, driven against a real shadow Mmu and PageGuard
(the 4-level tables of tests/bt/test_shadow.py) and a real Hypervisor.

What must hold: update_va writes one entry and drops exactly the shadow
entries built from it and the named page's translation - no
write-protection fault, no out-of-sync page, no resync, the jump cache
kept; every bad argument gives -errno with nothing written; a call from
CPL 3 gets -EPERM; the results match the generic dispatcher's."""

from __future__ import annotations

import pytest

from pyvmm.engines.bt import pvcall
from pyvmm.engines.bt.faults import GuestFault
from pyvmm.engines.bt.mmu import PG_LONG
from pyvmm.paravirt import abi
from pyvmm.paravirt.hypervisor import Hypervisor
from tests.bt.test_shadow import PML4, PML4B, PT, P, U, W, frame, la, machine, setpte

M64 = (1 << 64) - 1
RAX, RCX, RBX, RSI, RDI = 0, 1, 3, 6, 7


class FakeCpu:
    """What pv_call reads of a BtCpu: registers, mode, CPL, the MMU."""

    def __init__(self, mmu, hv, cpl=0, bits=64):
        self.R = [0] * 16
        self.mmu = mmu
        self.jmp = mmu.jmp
        self.pv = hv
        self.pv_port = None
        self.index = 0
        self.cpl = cpl
        self.mode = (bits, 0, cpl)
        self.pending = False
        self.halted = False
        self.sb = [0] * 6
        self.ipmask = M64
        self.rip = 0x7000           # not mapped for fetch: no ret is fused unless a test maps it
        self.icount = 0


@pytest.fixture
def bt():
    mem, mmu, _ = machine()
    hv = Hypervisor(mem, lambda data: None, lambda irq: None, lambda k, s: None, clock_ns=lambda: 0)
    yield mem, mmu, hv, FakeCpu(mmu, hv)
    hv.close()


def hcall(c, op, a0=0, a1=0, a2=0, a3=0):
    """(result as a signed number, whether the block ends after the vmcall)."""
    c.R[RAX], c.R[RBX], c.R[RCX], c.R[RSI], c.R[RDI] = op, a0 & M64, a1 & M64, a2 & M64, a3 & M64
    rip = pvcall.pv_call(c)
    assert rip in (0, c.rip + 3)            # no ret fused: the vmcall's successor or go on
    r = c.R[RAX]
    return (r - (1 << 64) if r >= 1 << 63 else r), bool(rip)


def vpn(i):
    return la(i) >> 12


def test_update_va_changes_one_mapping_precisely(bt):
    mem, mmu, hv, c = bt
    for i in range(16):
        assert mmu.rd1(la(i)) == i
    g = mmu.guard
    assert PT >> 12 in g.guarded
    c.jmp[0x1234] = "a block"
    walks, writes = mmu.walks, g.table_writes
    r, ends = hcall(c, abi.OP_UPDATE_VA, PT + 8 * 3, frame(40) | P | W | U, la(3), abi.UVA_INVLPG)
    assert (r, ends) == (0, False)
    assert mem.read_u64(PT + 8 * 3) == frame(40) | P | W | U
    assert vpn(3) not in mmu.tr and vpn(3) not in mmu.tw
    assert all(vpn(i) in mmu.tr for i in range(16) if i != 3)      # the others stay
    assert c.jmp == {0x1234: "a block"}                              # no fetch mapping went
    assert g.table_writes == writes and not g.unsync and PT >> 12 in g.guarded
    mem.write(frame(40), b"\x28")
    assert mmu.rd1(la(3)) == 0x28                                    # one walk, the new frame
    assert mmu.walks == walks + 1
    mmu.cr3_loaded()                                                 # a later flush: nothing stale
    assert mmu.rd1(la(3)) == 0x28 and mmu.rd1(la(4)) == 4
    assert hv.stats()["calls"] == {"update_va": 1}


def test_update_va_without_invlpg_drops_the_shadow_entry_too(bt):
    mem, mmu, hv, c = bt
    assert mmu.rd1(la(5)) == 5
    r, _ = hcall(c, abi.OP_UPDATE_VA, PT + 8 * 5, 0, la(5), 0)
    assert r == 0 and vpn(5) not in mmu.tr
    with pytest.raises(GuestFault):
        mmu.rd1(la(5))                                               # not present now


def test_update_va_of_a_fetch_mapping_ends_the_block(bt):
    mem, mmu, hv, c = bt
    mmu.fetch(la(6))
    c.jmp[la(6)] = "a block"
    r, ends = hcall(c, abi.OP_UPDATE_VA, PT + 8 * 6, frame(41) | P | W | U, la(6), abi.UVA_INVLPG)
    assert r == 0 and ends and not c.jmp and vpn(6) not in mmu.tx


def test_a_code_mapping_of_another_space_keeps_the_jump_cache():
    """A process's code mapping dropped while the kernel runs in another
    space (exit's teardown) leaves this vCPU's jump cache alone."""
    mem, mmu, _ = machine(two_spaces=True)
    hv = Hypervisor(mem, lambda data: None, lambda irq: None, lambda k, s: None, clock_ns=lambda: 0)
    c = FakeCpu(mmu, hv)
    mmu.configure(PG_LONG, PML4B, True, True, False, True)
    mmu.fetch(la(6))
    other = mmu.tx
    mmu.configure(PG_LONG, PML4, True, True, False, True)
    assert vpn(6) not in mmu.tx
    c.jmp[0x1234] = "a block"
    r, ends = hcall(c, abi.OP_UPDATE_VA, PT + 8 * 6, 0, la(6), 0)
    assert (r, ends) == (0, False) and c.jmp == {0x1234: "a block"}
    assert vpn(6) not in other                       # the other space's entry went all the same
    hv.close()


def test_update_va_of_an_out_of_sync_table_keeps_its_copy_in_step(bt):
    mem, mmu, hv, c = bt
    setpte(mem, PT, 15, PT | P | W)                  # the table mapped at la(15)
    for i in range(15):
        mmu.rd1(la(i))
    mmu.wr8(la(15) + 8 * 2, frame(42) | P | W | U)   # a native write: the page goes unsync
    g = mmu.guard
    assert PT >> 12 in g.unsync
    r, _ = hcall(c, abi.OP_UPDATE_VA, PT + 8 * 1, frame(43) | P | W | U, la(1), abi.UVA_INVLPG)
    assert r == 0
    dropped = g.resyncs
    mmu.cr3_loaded()
    assert g.resyncs == dropped + 1                  # only the natively written entry
    mem.write(frame(42), b"\x2a")
    mem.write(frame(43), b"\x2b")
    assert mmu.rd1(la(2)) == 0x2A and mmu.rd1(la(1)) == 0x2B and mmu.rd1(la(0)) == 0


def test_update_va_over_translated_code_drops_its_blocks(bt):
    mem, mmu, hv, c = bt
    mmu.protect_code(0x30)
    r, ends = hcall(c, abi.OP_UPDATE_VA, 0x30008, 0x1234, la(0), abi.UVA_INVLPG)
    assert r == 0 and ends and mem.read_u64(0x30008) == 0x1234
    assert 0x30 in machine_code(mmu)


def machine_code(mmu):
    """The code pages the guard reported written (tests/bt/test_shadow.machine's list)."""
    return mmu.guard.code_listeners[0].__self__


def test_update_va_32bit_entry(bt):
    mem, mmu, hv, c = bt
    mem.write(0x30000, b"\xff" * 8)
    r, _ = hcall(c, abi.OP_UPDATE_VA, 0x30004, 0x1234_5678_9ABC, 0, abi.UVA_PTE32)
    assert r == 0 and mem.read(0x30000, 8) == b"\xff" * 4 + bytes.fromhex("bc9a7856")


@pytest.mark.parametrize("ptr, flags, err", [
    (PT + 8, 0x80, abi.EINVAL),                      # unknown flag
    (PT + 4, abi.UVA_INVLPG, abi.EFAULT),            # misaligned 8-byte entry
    (PT + 2, abi.UVA_PTE32, abi.EFAULT),             # misaligned 4-byte entry
    (4 << 20, abi.UVA_INVLPG, abi.EFAULT),           # past the end of RAM
    ((1 << 64) - 8, abi.UVA_INVLPG, abi.EFAULT),
])
def test_update_va_bad_arguments_write_nothing(bt, ptr, flags, err):
    mem, mmu, hv, c = bt
    assert mmu.rd1(la(1)) == 1
    before = mem.read(PT, 0x1000)
    r, ends = hcall(c, abi.OP_UPDATE_VA, ptr, 0xDEAD_0000 | P, la(1), flags)
    assert r == -err and not ends
    assert mem.read(PT, 0x1000) == before and vpn(1) in mmu.tr
    assert hv.errors == 1


def test_update_va_from_user_mode_and_in_32bit_mode(bt):
    mem, mmu, hv, c = bt
    c.cpl = 3
    r, _ = hcall(c, abi.OP_UPDATE_VA, PT, 0, la(0), abi.UVA_INVLPG)
    assert r == -abi.EPERM and mem.read_u64(PT) == frame(0) | P | W | U
    c.cpl, c.mode = 0, (32, 0, 0)
    hcall(c, abi.OP_UPDATE_VA, PT, 0, la(0), 0x80)
    assert c.R[RAX] == (-abi.EINVAL) & 0xFFFFFFFF    # a 32-bit guest sees the low half


def hcpage_at(mem, mmu, c, i, code=b"\x0f\x01\xc1\xc3"):
    """The bt hypercall page (vmcall; ret) in frame(i), fetched through la(i);
    c.rip at its entry and a return address 0x1234 on a mapped stack."""
    mem.write(frame(i), code)
    mmu.fetch(la(i))
    c.rip = la(i)
    c.R[4] = la(12) + 0x800
    mem.write(frame(12) + 0x800, (0x1234).to_bytes(8, "little"))


def test_vmcall_and_the_pages_ret_run_as_one(bt):
    mem, mmu, hv, c = bt
    hcpage_at(mem, mmu, c, 9)
    mmu.rd1(la(12))
    c.R[RAX] = abi.OP_VERSION
    assert pvcall.pv_call(c) == 0x1234                  # the block leaves at the return address
    assert c.R[RAX] == abi.VERSION and c.R[4] == la(12) + 0x808 and c.icount == 1
    c.R[RAX], c.R[4] = abi.OP_UPDATE_VA, la(12) + 0x800
    c.R[RBX], c.R[RCX], c.R[RSI], c.R[RDI] = PT + 8 * 3, 0, la(3), abi.UVA_INVLPG
    assert pvcall.pv_call(c) == 0x1234 and c.R[RAX] == 0 and mem.read_u64(PT + 8 * 3) == 0


def test_no_fused_ret_when_it_could_fault_or_is_not_there(bt):
    mem, mmu, hv, c = bt
    hcpage_at(mem, mmu, c, 9)
    c.R[RAX] = abi.OP_VERSION                           # the stack page has no read mapping yet
    assert pvcall.pv_call(c) == 0 and c.R[4] == la(12) + 0x800 and c.icount == 0
    mmu.rd1(la(12))
    mem.write(frame(12) + 0x800, (1 << 60).to_bytes(8, "little"))   # not canonical: ret's #GP
    c.R[RAX] = abi.OP_VERSION
    assert pvcall.pv_call(c) == 0 and c.R[4] == la(12) + 0x800
    hcpage_at(mem, mmu, c, 10, b"\x0f\x01\xc1\x90")   # vmcall; nop
    c.R[RAX] = abi.OP_VERSION
    assert pvcall.pv_call(c) == 0 and c.R[4] == la(12) + 0x800
    c.R[RAX], c.mode = abi.OP_SET_SHARED, (32, 0, 0)   # 32-bit code: never fused; a call that ends
    c.R[RBX] = 0x4001
    assert pvcall.pv_call(c) == la(10) + 3 and c.R[RAX] == (-abi.EINVAL) & 0xFFFFFFFF


def test_generic_calls_take_registers_directly(bt):
    mem, mmu, hv, c = bt
    assert hcall(c, abi.OP_VERSION) == (abi.VERSION, False)
    assert hcall(c, 99)[0] == -abi.ENOSYS
    mmu.rd1(la(7))
    mem.write_obj(0x31000, abi.MmuEntry(PT + 8 * 7, frame(44) | P | W | U))
    assert hcall(c, abi.OP_MMU_UPDATE, 0x31000, 1, 8) == (1, False)
    assert vpn(7) not in mmu.tr
    mem.write(frame(44), b"\x2c")
    assert mmu.rd1(la(7)) == 0x2C
    assert hcall(c, abi.OP_FLUSH_TLB, la(7)) == (0, False) and vpn(7) not in mmu.tr
    assert hcall(c, abi.OP_SET_SHARED, 0x4001)[0] == -abi.EINVAL
    c.pv = None
    with pytest.raises(GuestFault):
        pvcall.pv_call(c)                            # no interface: #UD
