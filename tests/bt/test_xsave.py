"""The XSAVE feature set under bt (engines/bt/xsave.py): XSAVE, XSAVEOPT,
XSAVEC, XRSTOR in both forms with the init optimisation, XGETBV/XSETBV
and their faults, and CPUID leaf 0xD against what the instructions do.
Where the real CPU can answer (CPL3 under KVM runs natively here), the
XSAVE area it writes is the reference."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from pyvmm.engines.bt import xsave as bx  # noqa: E402
from pyvmm.engines.bt.cpuid import CpuidTable  # noqa: E402
from pyvmm.engines.bt.fxstate import to_fxsave  # noqa: E402

harness.needs_unicorn_and_as()

OSXSAVE, OSFXSR = 1 << 18, 1 << 9
GP, UD, NM = 13, 6, 7
AREA = 0x400                    # the XSAVE area inside the data page (64-byte aligned)
YMMH = [(0x1111 * (i + 1)) << 64 | (0xABCD0000 + i) for i in range(16)]
XMM = [(0x2222 * (i + 3)) << 32 | i for i in range(16)]


def avx_table() -> CpuidTable:
    """The v3 table with the AVX state component offered whether or not the
    translator's AVX instructions exist yet (XSAVE does not need them)."""
    t = CpuidTable(model="v3")
    a, b, c, d = t.leaves[(1, 0)]
    t.leaves[(1, 0)] = (a, b, c | 1 << 26 | 1 << 28, d)
    t.leaves[(0xD, 0)] = (7, 576, 832, 0)
    t.leaves[(0xD, 1)] = (7, 576, 0, 0)
    t.leaves[(0xD, 2)] = (256, 576, 0, 0)
    return t


def setup(xcr0=7, cr4=OSXSAVE, cr0=0, ymmh=YMMH, xmm=XMM, mxcsr=0x1F80, table=None):
    def apply(cpu):
        cpu.cpuid = table or avx_table()
        cpu.cr4 |= cr4 | OSFXSR
        cpu.cr0 |= cr0
        cpu.xcr0 = xcr0
        cpu.ymmh = list(ymmh)
        cpu.xmm[:16] = list(xmm)
        cpu.mxcsr = mxcsr
    return apply


_bt = harness.BtOracle()


def run(src: str, data: bytes = bytes(harness.DATA_SIZE), regs=None, **kw):
    r = list(regs or [0] * 16)
    r[4], r[5] = harness.STACK_TOP, harness.DATA_ADDR
    return _bt.run(harness.assemble(src), r, 2, data, setup=setup(**kw))


def header(data: bytes, at: int = AREA) -> tuple[int, int]:
    return struct.unpack_from("<QQ", data, at + 512)


def ymmh_in(data: bytes, at: int = AREA) -> list[int]:
    return [int.from_bytes(data[at + 576 + 16 * i:at + 592 + 16 * i], "little") for i in range(16)]


def xmm_in(data: bytes, at: int = AREA) -> list[int]:
    return [int.from_bytes(data[at + 160 + 16 * i:at + 176 + 16 * i], "little") for i in range(16)]


# -- save and restore ------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["xsave", "xsaveopt", "xsave64", "xsaveopt64"])
def test_standard_form_saves_every_requested_component(op):
    out = run(f"fninit\nfldpi\nmov eax, 7\nxor edx, edx\n{op} [rbp + {AREA}]")
    assert out.vector is None
    d = out.data
    assert ymmh_in(d) == YMMH and xmm_in(d) == XMM
    assert struct.unpack_from("<II", d, AREA + 24) == (0x1F80, 0xFFFF)
    assert d[AREA + 32:AREA + 42] == (0x4000C90FDAA22168C235).to_bytes(10, "little")
    assert header(d) == (7, 0)
    assert d[AREA + 832:AREA + 900] == bytes(68)          # nothing past the AVX component


def test_standard_form_leaves_unrequested_components_and_header_bits():
    data = bytearray(harness.DATA_SIZE)
    data[AREA + 576:AREA + 832] = b"\x5A" * 256
    struct.pack_into("<Q", data, AREA + 512, 1 << 9)       # a bit XSAVE must keep
    out = run(f"mov eax, 3\nxor edx, edx\nxsave [rbp + {AREA}]", bytes(data))
    assert out.vector is None
    assert out.data[AREA + 576:AREA + 832] == b"\x5A" * 256
    assert header(out.data)[0] == (1 << 9) | 2              # SSE in use, x87 initial
    # MXCSR is saved with AVX alone too (the standard form's rule)
    out = run(f"mov eax, 4\nxor edx, edx\nxsave [rbp + {AREA}]", mxcsr=0x1F00)
    assert struct.unpack_from("<I", out.data, AREA + 24)[0] == 0x1F00
    assert xmm_in(out.data) == [0] * 16 and header(out.data)[0] == 4


def test_round_trip_through_xrstor_standard_and_compacted():
    for save in ("xsave", "xsavec"):
        saved = run(f"fninit\nfld1\nmov eax, -1\nmov edx, -1\n{save} [rbp + {AREA}]", mxcsr=0x9FC0)
        assert saved.vector is None
        out = run(f"mov eax, -1\nmov edx, -1\nxrstor [rbp + {AREA}]\nfstp tbyte ptr [rbp]\nstmxcsr [rbp + 16]",
                  saved.data, ymmh=[0] * 16, xmm=[0] * 16)
        assert out.vector is None, save
        assert out.cpu.ymmh == YMMH and out.cpu.xmm[:16] == XMM, save
        assert out.data[:10] == (0x3FFF8000000000000000).to_bytes(10, "little"), save
        assert struct.unpack_from("<I", out.data, 16)[0] == 0x9FC0, save


def test_compacted_form_writes_only_components_in_use():
    data = bytes([0x77]) * harness.DATA_SIZE
    out = run(f"mov eax, 7\nxor edx, edx\nxsavec [rbp + {AREA}]", data, ymmh=[0] * 16)
    assert out.vector is None
    assert header(out.data) == (2, (1 << 63) | 7)           # x87 and AVX initial: not saved
    assert out.data[AREA + 576:AREA + 832] == data[AREA + 576:AREA + 832]
    assert out.data[AREA + 32:AREA + 160] == data[AREA + 32:AREA + 160]
    assert xmm_in(out.data) == XMM
    assert struct.unpack_from("<Q", out.data, AREA + 528)[0] == 0x7777777777777777   # header bytes 16+ kept
    out = run(f"mov eax, 5\nxor edx, edx\nxsavec64 [rbp + {AREA}]", data)
    assert header(out.data) == (4, (1 << 63) | 5)
    assert ymmh_in(out.data) == YMMH


def test_xrstor_initialises_components_absent_from_xstate_bv():
    data = bytearray(b"\x33" * harness.DATA_SIZE)
    struct.pack_into("<QQ", data, AREA + 512, 0, 0)
    data[AREA + 528:AREA + 576] = bytes(48)
    struct.pack_into("<I", data, AREA + 24, 0x1F00)
    out = run(f"fninit\nfldpi\nmov eax, 7\nxor edx, edx\nxrstor [rbp + {AREA}]\nfnstsw [rbp]\nfnstcw [rbp + 2]\n"
              "stmxcsr [rbp + 4]", bytes(data))
    assert out.vector is None
    assert out.cpu.ymmh == [0] * 16 and out.cpu.xmm[:16] == [0] * 16
    assert struct.unpack_from("<HHI", out.data, 0) == (0, 0x37F, 0x1F00)    # standard form: MXCSR from memory
    assert bx.xinuse(out.cpu) == 0 or bx.xinuse(out.cpu) == 2       # MXCSR 0x1F00 keeps SSE "in use"
    struct.pack_into("<QQ", data, AREA + 512, 0, (1 << 63) | 7)
    out = run(f"mov eax, 7\nxor edx, edx\nxrstor [rbp + {AREA}]\nstmxcsr [rbp + 4]", bytes(data))
    assert out.vector is None
    assert struct.unpack_from("<I", out.data, 4)[0] == 0x1F80                # compacted: MXCSR initial
    assert bx.xinuse(out.cpu) == 0
    # a component outside RFBM is left alone
    out = run(f"mov eax, 3\nxor edx, edx\nxrstor [rbp + {AREA}]", bytes(data))
    assert out.cpu.ymmh == YMMH and out.cpu.xmm[:16] == [0] * 16


def test_only_xmm0_7_and_ymm0_7_outside_64_bit_mode():
    cpu = harness.BtOracle().run(b"", [0] * 16, 2, bytes(64), setup=setup()).cpu
    cpu.mode = (32,) + tuple(cpu.mode[1:])
    assert bx._nregs(cpu) == 8


# -- XGETBV / XSETBV -------------------------------------------------------------------------
def test_xsetbv_and_xgetbv():
    out = run("xor ecx, ecx\nmov eax, 7\nxor edx, edx\nxsetbv\nxgetbv\nmov r8, rax\nmov r9, rdx\n"
              "mov ecx, 1\nxgetbv\nmov r10, rax", xcr0=1, ymmh=[0] * 16)
    assert out.vector is None
    assert out.cpu.xcr0 == 7 and out.regs[8] == 7 and out.regs[9] == 0
    assert out.regs[10] == 2                                  # XINUSE: only SSE (XMM non-zero)


@pytest.mark.parametrize("value, ecx", [(5, 0), (6, 0), (0xF, 0), (1 << 32 | 7, 0), (7, 1), (3, 2)])
def test_xsetbv_rejects_bad_values(value, ecx):
    """AVX without SSE, x87 clear, MPX/unknown bits, a high bit, ECX != 0: #GP(0)."""
    out = run(f"mov ecx, {ecx}\nmov eax, {value & 0xFFFFFFFF}\nmov edx, {value >> 32}\nxsetbv", xcr0=3)
    assert (out.vector, out.error_code) == (GP, 0)
    assert out.cpu.xcr0 == 3


def test_xcr0_offers_avx_only_with_the_avx_state_in_cpuid():
    plain = CpuidTable(model="v2")
    out = run("xor ecx, ecx\nmov eax, 3\nxor edx, edx\nxsetbv", xcr0=1, table=plain)
    assert out.vector is None and out.cpu.xcr0 == 3        # no XSAVE in CPUID: x87|SSE only
    no_avx = avx_table()
    no_avx.leaves[(0xD, 0)] = (3, 576, 576, 0)
    out = run("xor ecx, ecx\nmov eax, 7\nxor edx, edx\nxsetbv", xcr0=3, table=no_avx)
    assert out.vector == GP


def test_xgetbv1_index_and_unknown_index():
    out = run("mov ecx, 2\nxgetbv")
    assert (out.vector, out.error_code) == (GP, 0)
    t = avx_table()
    t.leaves[(0xD, 1)] = (1, 576, 0, 0)                    # no XGETBV1
    out = run("mov ecx, 1\nxgetbv", table=t)
    assert out.vector == GP


def test_faults():
    assert run("xor ecx, ecx\nxgetbv", cr4=0).vector == UD
    assert run(f"xsave [rbp + {AREA}]", cr4=0).vector == UD
    assert run(f"xrstor [rbp + {AREA}]", cr4=0).vector == UD
    assert run("xsetbv", cr4=0).vector == UD
    assert run(f"xsave [rbp + {AREA}]", cr0=8).vector == NM              # CR0.TS
    assert run(f"xsavec [rbp + {AREA}]", cr0=8).vector == NM
    for op in ("xsave", "xsavec", "xrstor", "xsaveopt"):
        assert (run(f"{op} [rbp + {AREA + 32}]").vector, run(f"{op} [rbp + 8]").error_code) == (GP, 0), op


def _bad_header(bv: int, comp: int, rest: bytes = bytes(48), mxcsr: int = 0x1F80) -> int | None:
    data = bytearray(harness.DATA_SIZE)
    struct.pack_into("<QQ", data, AREA + 512, bv, comp)
    data[AREA + 528:AREA + 576] = rest
    struct.pack_into("<I", data, AREA + 24, mxcsr)
    return run(f"mov eax, 7\nxor edx, edx\nxrstor [rbp + {AREA}]", bytes(data), xcr0=7).vector


def test_xrstor_header_checks():
    assert _bad_header(7, 0) is None
    assert _bad_header(8, 0) == GP                                    # XSTATE_BV outside XCR0
    assert _bad_header(7, 1) == GP                                    # standard form: XCOMP_BV must be 0
    assert _bad_header(7, 0, b"\1" + bytes(47)) == GP                 # bytes 23:16
    assert _bad_header(7, 0, bytes(8) + b"\1" + bytes(39)) is None    # bytes 63:24: not checked (standard)
    assert _bad_header(7, (1 << 63) | 7) is None
    assert _bad_header(7, (1 << 63) | 3) == GP                        # XSTATE_BV outside XCOMP_BV
    assert _bad_header(3, (1 << 63) | 0xF) == GP                      # XCOMP_BV outside XCR0
    assert _bad_header(3, (1 << 63) | 3, bytes(47) + b"\1") == GP     # compacted: bytes 63:16
    assert _bad_header(7, 0, mxcsr=1 << 16) == GP                     # illegal MXCSR


def test_a_page_fault_changes_nothing():
    """An area running into an unmapped page: #PF before any register or
    byte changes (the CPU checks the whole access first)."""
    u = harness.UserBtOracle()
    u.state.cr4 |= OSXSAVE
    regs = [0] * 16
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    at = harness.DATA_SIZE - 256
    data = bytes([0x44]) * harness.DATA_SIZE
    u.set_page(harness.DATA_ADDR + harness.DATA_SIZE, 0)
    try:
        for op in ("xrstor", "xsave", "xsavec"):
            code = harness.assemble(f"mov eax, 7\nxor edx, edx\n{op} [rbp + {at}]")
            out = u.run(code, regs, 2, data, setup=setup())
            assert out.vector == 14 and out.cr2 == harness.DATA_ADDR + harness.DATA_SIZE, op
            assert out.cpu.ymmh == YMMH and out.cpu.xmm[:16] == XMM, op
            assert out.data == data, op
    finally:
        u.reset_pages()


def test_xsetbv_at_cpl3_is_gp():
    u = harness.UserBtOracle()
    u.state.cr4 |= OSXSAVE
    out = u.run(harness.assemble("xor ecx, ecx\nmov eax, 3\nxor edx, edx\nxsetbv"), [0] * 16, 2, bytes(64),
                setup=setup(xcr0=7))
    assert (out.vector, out.error_code) == (GP, 0) and out.cpu.xcr0 == 7


# -- CPUID leaf 0xD against the instructions -------------------------------------------------
def _cpuid(leaf: int, sub: int, **kw) -> tuple[int, int, int, int]:
    out = run(f"mov eax, {leaf}\nmov ecx, {sub}\ncpuid", **kw)
    r = out.regs
    return r[0], r[3], r[1], r[2]


def test_leaf_0xd_describes_what_xsave_writes():
    a, b, c, d = _cpuid(0xD, 0, xcr0=7)
    assert (a, d) == (7, 0) and b == c == 832               # size for XCR0=7, and the largest
    assert _cpuid(0xD, 0, xcr0=3)[1] == 576                  # follows the current XCR0
    assert _cpuid(0xD, 2) == (256, 576, 0, 0)                # where xsave put YMMH (above)
    assert _cpuid(0xD, 1)[0] & 7 == 7                        # XSAVEOPT, XSAVEC, XGETBV1: all implemented
    assert _cpuid(0xD, 3) == (0, 0, 0, 0)
    assert _cpuid(1, 0)[2] >> 27 & 1                         # OSXSAVE mirrors CR4.OSXSAVE
    assert not _cpuid(1, 0, cr4=0)[2] >> 27 & 1


def test_default_table_offers_xsave_and_the_avx_state_with_avx():
    t = CpuidTable()
    assert t.lookup(1, 0)[2] >> 26 & 1
    avx = bool(t.lookup(1, 0)[2] >> 28 & 1)
    assert t.lookup(0xD, 0)[0] == (7 if avx else 3)
    assert t.lookup(0xD, 0)[2] == (832 if avx else 576)
    assert t.lookup(0xD, 2) == ((256, 576, 0, 0) if avx else (0, 0, 0, 0))


def test_cr4_osxsave_needs_xsave_in_cpuid():
    src = "mov rax, cr4\nbts rax, 18\nmov cr4, rax"
    assert run(src, cr4=0, table=CpuidTable(model="v2")).vector == GP
    assert run(src, cr4=0, table=CpuidTable(model="v3")).vector is None


# -- the real CPU: XSAVE at CPL3 through KVM ------------------------------------------------
def _kvm_oracle():
    from kvm_oracle import KvmOracle, kvm_usable
    why = kvm_usable()
    if why:
        pytest.skip(f"no usable /dev/kvm: {why}")
    from pyvmm.engines.kvm import abi, cpuid, state
    from pyvmm.engines.kvm.device import ioctl
    k = KvmOracle()
    k.vcpu.set_cpuid(cpuid.guest_cpuid(k.kvm.supported_cpuid(), 0, 1, set()))
    k.sregs.cr4 |= OSXSAVE
    k.vcpu.set_sregs(k.sregs)
    state.set_xcr0(k.vcpu, 7)
    assert state.get_xcr0(k.vcpu) == 7
    return k, abi, state, ioctl


def test_xsave_area_matches_the_real_cpu():
    """The same registers saved by the CPU (XCR0 set with KVM_SET_XCRS, YMM
    loaded with KVM_SET_XSAVE, as hybrid does) and by bt: legacy region
    (without FOP/FIP/FDP), XSTATE_BV and the AVX component agree."""
    k, abi, state, ioctl = _kvm_oracle()
    try:
        ref = run("nop").cpu                                 # XMM, MXCSR as both start
        buf = bytearray(abi.XSAVE_AREA_SIZE)
        cbuf = (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(buf)
        ioctl(k.vcpu.fd, abi.GET_XSAVE, cbuf)
        buf[0:416] = to_fxsave(ref)[0:416]
        struct.pack_into("<Q", buf, 512, struct.unpack_from("<Q", buf, 512)[0] | 3)
        state.put_ymmh(buf, YMMH)
        ioctl(k.vcpu.fd, abi.SET_XSAVE, cbuf)
        src = (f"fninit\nfldpi\nfld1\nmov eax, 7\nxor edx, edx\nxsave [rbp + {AREA}]\nxor ecx, ecx\nxgetbv\nmov r8, rax\n"
               f"mov eax, 7\nxor edx, edx\nxsavec [rbp + {AREA + 0x400}]")
        regs = [0] * 16
        regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
        want = k.run(harness.assemble(src), list(regs), 2, bytes(harness.DATA_SIZE))
        got = run(src, ymmh=YMMH)
        assert want.vector is None and got.vector is None
        # XCR0 as user code reads it: kvm_pvm runs it with the host's XCR0
        # (AVX-512 bits too), so only the guest's bits are compared.
        assert got.regs[8] == 7 and want.regs[8] & 7 == 7
        for at in (AREA, AREA + 0x400):
            w, g = want.data, got.data
            assert g[at:at + 6] == w[at:at + 6], hex(at)                       # FCW FSW FTW
            assert g[at + 24:at + 28] == w[at + 24:at + 28], hex(at)           # MXCSR (not AMD's MXCSR_MASK)
            assert g[at + 32:at + 416] == w[at + 32:at + 416], hex(at)         # ST0-7, XMM0-15
            assert header(g, at) == header(w, at), hex(at)
            assert g[at + 576:at + 832] == w[at + 576:at + 832], hex(at)       # YMM_Hi128
        # and back: KVM's copy of the state is what bt loaded into it
        ioctl(k.vcpu.fd, abi.GET_XSAVE, cbuf)
        assert state.ymmh_from_xsave(buf) == YMMH
    finally:
        k.close()


@pytest.mark.parametrize("save, restore", [("xsave", "xrstor"), ("xsave64", "xrstor64")])
def test_x87_pointers_survive_a_round_trip(save, restore):
    """FOP/FIP/FDP (bytes 6-23) as XSAVE stored them come back with XRSTOR."""
    first = run(f"fninit\nfld qword ptr [rbp + 8]\nfsqrt\nmov eax, 7\nxor edx, edx\n{save} [rbp + {AREA}]")
    assert first.vector is None
    again = run(f"mov eax, 7\nxor edx, edx\n{restore} [rbp + {AREA}]\n{save} [rbp + {AREA + 0x400}]", first.data)
    assert again.vector is None
    assert again.data[AREA + 0x400:AREA + 0x400 + 24] == first.data[AREA:AREA + 24]
    assert first.data[AREA + 8:AREA + 12] != bytes(4)        # FIP: the fsqrt's address
