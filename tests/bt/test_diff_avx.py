"""Differential tests of the VEX encodings against the real CPU (KvmOracle:
CPL3 under KVM runs natively on the host): the VEX.128/VEX.256 forms of the
SSE instructions, AVX-only moves and shuffles, AVX2 (256-bit integer ops,
broadcasts, permutes, per-element shifts, masked moves, gathers), FMA3 and
F16C.

Each sequence loads MXCSR and all sixteen YMM registers from the data page,
runs one instruction (with an index vector loaded first for a gather), and
stores all YMM registers and MXCSR back, so both engines are compared on
every GPR, the arithmetic flags and DF, the whole data page (memory
operands, the 16 YMM images) and MXCSR.  MXCSR's exception flags are
compared where bt computes them (FMA, F16C and the integer and shuffle
groups, which set none); the VEX forms of the legacy SSE floating point
run the legacy code, not all of which sets the flags yet (conversions,
rounding, horizontal ops), so for them only the control bits are compared.  Both translator paths (compiled, cold) run.

Fixed cases: gathers and masked moves faulting on a not-present page (the
YMM state after the fault read back through KVM_GET_XSAVE), unmasked FMA
and F16C exceptions (#XM, likewise), encodings the CPU refuses (#UD) and
misaligned aligned forms (#GP); and, bt only, the AVX-state checks (#UD,
#NM) that the CPU under test cannot be set up for at CPL3.  Compatibility
mode is compared in test_diff_vex_compat.py, against the host CPU itself:
this host's kvm_pvm answers every VEX instruction and LDMXCSR in 32-bit
user code with #UD.

PYVMM_BT_AVX_EXAMPLES sets the sequences per weight unit (default 45: 2,160
sequences); PYVMM_BT_RANDOM=1 draws new ones (a failure names the seed)."""

from __future__ import annotations

import functools
import os
import random
import shutil
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import iced_x86 as X  # noqa: E402

import harness  # noqa: E402
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

_why = kvm_usable()
if _why is not None:
    pytest.skip(f"KVM oracle unavailable: {_why}", allow_module_level=True)
if shutil.which("as") is None:
    pytest.skip("GNU as is not installed", allow_module_level=True)
pytestmark = pytest.mark.kvm

EXAMPLES = int(os.environ.get("PYVMM_BT_AVX_EXAMPLES", "45"))
SEED = random.randrange(1 << 30) if os.environ.get("PYVMM_BT_RANDOM") == "1" else 5151
ARITH_DF = harness.ARITH | 0x400
YIN, YOUT, MXIN, MXOUT, GIDX = 0x400, 0x600, 0x800, 0x804, 0x900
MXCSR_FLAGS = 0x3F
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword", 16: "xmmword", 32: "ymmword"}
GPR = {4: ["eax", "ebx", "ecx", "edx", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d", "r13d", "r14d"],
       8: ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14"]}
ALIGNED = ("vmovaps", "vmovapd", "vmovdqa", "vmovntps", "vmovntpd", "vmovntdq", "vmovntdqa")

# -- operand specs ------------------------------------------------------------------
# A template is "mnemonic spec,spec,..." with widths "b" (VEX.128 and .256),
# "x" (128 only) or "y" (256 only).  Specs: V vector of the width, X xmm,
# Y ymm, Vm/Xm vector or memory, M memory of the width, Hm/Qm/Em a vector or
# memory of half/quarter/eighth the width, mN memory of N bytes, xN xmm or N
# bytes of memory, r4/r8 GPRs, rmN GPR or memory, i imm8, c imm8 below 8,
# k imm8 for rounding (0-15), p a compare predicate (0-31).


def _mem(rng, size, mnemonic):
    aligned = mnemonic in ALIGNED
    off = rng.randrange(0, 0x400 - 32, 32 if aligned else 1)
    if aligned:
        off &= ~(size - 1)
    return f"{PTR[size]} ptr [rbp + {off}]"


def _operand(rng, spec, width, mnemonic, p_mem=0.3):
    vec = "ymm" if width == 32 else "xmm"
    reg = lambda kind: f"{kind}{rng.randrange(16)}"
    if spec == "V":
        return reg(vec)
    if spec == "X":
        return reg("xmm")
    if spec == "Y":
        return reg("ymm")
    if spec == "M":
        return _mem(rng, width, mnemonic)
    if spec in ("Vm", "Xm", "Hm", "Qm", "Em"):
        size = {"Vm": width, "Xm": 16, "Hm": width // 2, "Qm": width // 4, "Em": width // 8}[spec]
        if rng.random() < p_mem:
            return _mem(rng, size, mnemonic)
        return reg(vec if spec == "Vm" else "xmm")
    if spec.startswith("m"):
        return _mem(rng, int(spec[1:]), mnemonic)
    if spec.startswith("x"):
        return _mem(rng, int(spec[1:]), mnemonic) if rng.random() < p_mem else reg("xmm")
    if spec in ("r4", "r8"):
        return rng.choice(GPR[int(spec[1])])
    if spec.startswith("rm"):
        n = int(spec[2:])
        return _mem(rng, n, mnemonic) if rng.random() < p_mem else rng.choice(GPR[n])
    if spec == "i":
        return str(rng.randrange(256))
    if spec == "c":
        return str(rng.randrange(8))
    if spec == "k":
        return str(rng.randrange(16))
    if spec == "p":
        return str(rng.randrange(32))
    raise ValueError(spec)


FP = harness.templates("""
b vaddps V,V,Vm; vaddpd V,V,Vm; vsubps V,V,Vm; vsubpd V,V,Vm; vmulps V,V,Vm; vmulpd V,V,Vm
b vdivps V,V,Vm; vdivpd V,V,Vm; vminps V,V,Vm; vminpd V,V,Vm; vmaxps V,V,Vm; vmaxpd V,V,Vm
b vandps V,V,Vm; vandnpd V,V,Vm; vorps V,V,Vm; vxorpd V,V,Vm; vunpcklps V,V,Vm; vunpckhpd V,V,Vm
b vaddsubps V,V,Vm; vaddsubpd V,V,Vm; vhaddps V,V,Vm; vhsubpd V,V,Vm; vsqrtps V,Vm; vsqrtpd V,Vm
b vcmpps V,V,Vm,p; vcmppd V,V,Vm,p; vshufps V,V,Vm,i; vshufpd V,V,Vm,i; vblendps V,V,Vm,i
b vblendpd V,V,Vm,i; vblendvps V,V,Vm,V; vblendvpd V,V,Vm,V; vdpps V,V,Vm,i; vroundps V,Vm,k
b vroundpd V,Vm,k; vcvtdq2ps V,Vm; vcvtps2dq V,Vm; vcvttps2dq V,Vm; vcvtps2pd V,Hm; vcvtdq2pd V,Hm
b vmovshdup V,Vm; vmovsldup V,Vm; vmovmskps r4,V; vmovmskpd r8,V
x vaddss X,X,x4; vsubsd X,X,x8; vmulss X,X,x4; vdivsd X,X,x8; vminss X,X,x4; vmaxsd X,X,x8
x vsqrtss X,X,x4; vsqrtsd X,X,x8; vcmpss X,X,x4,p; vcmpsd X,X,x8,p; vroundss X,X,x4,k; vroundsd X,X,x8,k
x vmovddup X,x8; vcvtss2sd X,X,x4; vcvtsd2ss X,X,x8; vcvtsi2ss X,X,rm4; vcvtsi2sd X,X,rm8; vcvtss2si r4,x4
x vcvttsd2si r8,x8; vcomiss X,x4; vucomisd X,x8; vdppd X,X,Xm,i; vinsertps X,X,x4,i
x vextractps rm4,X,i; vcvtpd2ps X,Xm; vcvtpd2dq X,Xm; vcvttpd2dq X,Xm
y vcvtpd2ps X,Y; vcvtpd2dq X,Y; vcvttpd2dq X,Y; vmovddup Y,Vm
""")

INT = harness.templates("""
b vpaddb V,V,Vm; vpaddw V,V,Vm; vpaddd V,V,Vm; vpaddq V,V,Vm; vpsubb V,V,Vm; vpsubq V,V,Vm
b vpaddsb V,V,Vm; vpaddusw V,V,Vm; vpsubsw V,V,Vm; vpsubusb V,V,Vm; vpcmpeqb V,V,Vm; vpcmpeqq V,V,Vm
b vpcmpgtw V,V,Vm; vpcmpgtd V,V,Vm; vpcmpgtq V,V,Vm; vpminub V,V,Vm; vpminsd V,V,Vm; vpmaxuw V,V,Vm
b vpmaxsb V,V,Vm; vpminud V,V,Vm; vpavgb V,V,Vm; vpavgw V,V,Vm; vpmullw V,V,Vm; vpmulld V,V,Vm
b vpmulhw V,V,Vm; vpmulhuw V,V,Vm; vpmuludq V,V,Vm; vpmuldq V,V,Vm; vpmaddwd V,V,Vm
b vpmaddubsw V,V,Vm; vpmulhrsw V,V,Vm; vpsadbw V,V,Vm; vpacksswb V,V,Vm; vpackssdw V,V,Vm
b vpackuswb V,V,Vm; vpackusdw V,V,Vm; vpunpcklbw V,V,Vm; vpunpckhwd V,V,Vm; vpunpckldq V,V,Vm
b vpunpckhqdq V,V,Vm; vpand V,V,Vm; vpandn V,V,Vm; vpor V,V,Vm; vpxor V,V,Vm; vpshufb V,V,Vm
b vpsignb V,V,Vm; vpsignd V,V,Vm; vphaddw V,V,Vm; vphaddsw V,V,Vm; vphsubd V,V,Vm; vpabsb V,Vm
b vpabsw V,Vm; vpabsd V,Vm; vpshufd V,Vm,i; vpshufhw V,Vm,i; vpshuflw V,Vm,i; vpalignr V,V,Vm,i
b vpblendw V,V,Vm,i; vmpsadbw V,V,Vm,i; vpblendvb V,V,Vm,V; vpsllw V,V,Xm; vpslld V,V,Xm
b vpsllq V,V,Xm; vpsrlw V,V,Xm; vpsrld V,V,Xm; vpsrlq V,V,Xm; vpsraw V,V,Xm; vpsrad V,V,Xm
b vpsllw V,V,i; vpsrld V,V,i; vpsraw V,V,i; vpsrad V,V,i; vpsllq V,V,i; vpslldq V,V,i; vpsrldq V,V,i
b vpmovzxbw V,Hm; vpmovsxbw V,Hm; vpmovzxbd V,Qm; vpmovsxbq V,Em; vpmovzxwd V,Hm; vpmovsxwq V,Qm
b vpmovzxdq V,Hm; vpmovsxdq V,Hm; vptest V,Vm; vpmovmskb r4,V
x vpextrb r4,X,i; vpextrb m1,X,i; vpextrw r4,X,i; vpextrd rm4,X,i; vpextrq rm8,X,i; vpinsrb X,X,r4,i
x vpinsrw X,X,r4,i; vpinsrd X,X,rm4,i; vpinsrq X,X,rm8,i; vphminposuw X,Xm; vmovd X,rm4
x vmovq X,rm8; vmovd rm4,X; vmovq r8,X; vmovq X,x8; vpcmpistri X,Xm,i; vpcmpistrm X,Xm,i
""")

SHUF = harness.templates("""
b vmovaps V,Vm; vmovups V,Vm; vmovdqa V,Vm; vmovdqu V,Vm; vmovapd M,V; vmovdqu M,V; vmovntdq M,V
b vlddqu V,M; vmovntps M,V; vmovntpd M,V; vmovupd V,Vm; vmovapd V,Vm; vpermilps V,V,Vm; vpermilpd V,V,Vm; vpermilps V,Vm,i; vpermilpd V,Vm,i; vpblendd V,V,Vm,i
b vpsllvd V,V,Vm; vpsllvq V,V,Vm; vpsrlvd V,V,Vm; vpsrlvq V,V,Vm; vpsravd V,V,Vm; vtestps V,Vm
b vtestpd V,Vm; vmaskmovps V,V,M; vmaskmovpd M,V,V; vpmaskmovd V,V,M; vpmaskmovq M,V,V
b vpbroadcastb V,x1; vpbroadcastw V,x2; vpbroadcastd V,x4; vpbroadcastq V,x8; vbroadcastss V,x4
x vmovss X,m4; vmovss m4,X; vmovss X,X,X; vmovsd X,m8; vmovsd X,X,X; vmovlps X,X,m8; vmovhpd m8,X
x vmovhlps X,X,X; vmovlhps X,X,X; vmovntdqa X,M; vmaskmovdqu X,X
y vbroadcastsd Y,x8; vbroadcastf128 Y,m16; vbroadcasti128 Y,m16; vinsertf128 Y,Y,x16,i
y vinserti128 Y,Y,x16,i; vextractf128 x16,Y,i; vextracti128 x16,Y,i; vperm2f128 Y,Y,Vm,i
y vperm2i128 Y,Y,Vm,i; vpermd Y,Y,Vm; vpermps Y,Y,Vm; vpermq Y,Vm,i; vpermpd Y,Vm,i; vmovntdqa Y,M
y vzeroupper ; vzeroall
""")

FMA = [("b", f"vf{k}{o}p{t}", "V,V,Vm") for k in ("madd", "msub", "nmadd", "nmsub", "maddsub", "msubadd")
       for o in ("132", "213", "231") for t in "sd"]
FMA += [("x", f"vf{k}{o}s{t}", f"X,X,x{4 if t == 's' else 8}") for k in ("madd", "msub", "nmadd", "nmsub")
        for o in ("132", "213", "231") for t in "sd"]
F16C = [("b", "vcvtph2ps", "V,Hm"), ("b", "vcvtps2ph", "Hm,V,i")]


def _from_templates(table):
    def make(rng) -> str:
        widths, name, specs = rng.choice(table)
        width = {"b": rng.choice([16, 32]), "x": 16, "y": 32}[widths]
        if not specs:
            return name
        ops = []
        pre = f"lea rdi, [rbp + {rng.randrange(0x3F0)}]\n" if name == "vmaskmovdqu" else ""   # its DS:rDI
        for k, spec in enumerate(specs.split(",")):
            if spec == "Hm" and k == 0:        # vcvtps2ph's destination: half the source
                ops.append(_mem(rng, width // 2, name) if rng.random() < .3 else f"xmm{rng.randrange(16)}")
            else:
                ops.append(_operand(rng, spec, width, name))
        return f"{pre}{name} {', '.join(ops)}"
    return make


_GATHERS = {"vgatherdps": (4, 4), "vgatherqps": (8, 4), "vgatherdpd": (4, 8), "vgatherqpd": (8, 8),
            "vpgatherdd": (4, 4), "vpgatherqd": (8, 4), "vpgatherdq": (4, 8), "vpgatherqq": (8, 8)}


def gather(rng) -> str:
    """A gather with an index vector of small signed indices loaded first
    (from GIDX) and a random mask; the three registers distinct."""
    op = rng.choice(list(_GATHERS))
    iw, ew = _GATHERS[op]
    wide = rng.random() < .5
    # VEX.L=1: the wider of index and data vectors is a ymm
    idx_ymm = wide and iw >= ew
    data_ymm = wide and ew >= iw
    d, x, k = rng.sample(range(16), 3)
    vx, vd = ("ymm" if idx_ymm else "xmm"), ("ymm" if data_ymm else "xmm")
    scale = rng.choice([1, 2, 4, 8])
    return (f"vmovdqu ymm{x}, ymmword ptr [rbp + {GIDX + (0 if iw == 4 else 32)}]\n"
            f"{op} {vd}{d}, [rbp + {vx}{x}*{scale} + 0x200], {vd}{k}")


GROUPS = {"fp": _from_templates(FP), "int": _from_templates(INT), "shuffle": _from_templates(SHUF),
          "fma": _from_templates(FMA), "f16c": _from_templates(F16C), "gather": gather}
WEIGHT = {"fp": 12, "int": 14, "shuffle": 10, "fma": 8, "f16c": 2, "gather": 2}
# Groups whose MXCSR exception flags bt computes (the others: control bits only).
FULL_MXCSR = {"int", "shuffle", "fma", "f16c", "gather"}
# Groups run with random rounding control, DAZ and FTZ.
ROUNDING = {"fma", "f16c"}

_PROLOGUE = f"ldmxcsr [rbp + {MXIN}]\n" + "\n".join(f"vmovdqu ymm{i}, [rbp + {YIN + 32 * i}]" for i in range(16))
_EPILOGUE = "\n".join(f"vmovdqu [rbp + {YOUT + 32 * i}], ymm{i}" for i in range(16)) + f"\nvstmxcsr [rbp + {MXOUT}]"


@functools.cache
def build(group: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(f"{group}:{seed}")
    bodies = [GROUPS[group](rng) for _ in range(n)]
    return list(zip(bodies, harness.assemble_many([f"{_PROLOGUE}\n{b}\n{_EPILOGUE}" for b in bodies])))


# -- inputs -----------------------------------------------------------------------------
_F32 = [0, 0x80000000, 0x3F800000, 0xBF800000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7FA00000,
        0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0x4B000001, 0x3EFFFFFF, 0x33800000, 0x477FE000,
        0x477FF000, 0x387FC000, 0x33000001, 0xC7800000]
_F64 = [0, 1 << 63, 0x3FF0000000000000, 0xBFF0000000000000, 0x7FF0000000000000, 0xFFF0000000000000,
        0x7FF8000000000000, 0x7FF4000000000000, 1, 0x800FFFFFFFFFFFFF, 0x0010000000000000, 0x7FEFFFFFFFFFFFFF,
        0x4330000000000001, 0x3CA0000000000000, 0x3FDFFFFFFFFFFFFF]
_F16 = [0, 0x8000, 0x3C00, 0xBC00, 0x7C00, 0xFC00, 0x7E00, 0x7D00, 0xFE01, 0x0001, 0x83FF, 0x0400, 0x7BFF]


def _lane_value(rng, kind) -> bytes:
    if kind == 0:
        return rng.randbytes(16)
    if kind == 1:   # floats near each other and specials: products and sums that round, cancel, overflow
        base = rng.getrandbits(32)
        return struct.pack("<4I", *(rng.choice(_F32) if rng.random() < .4 else
                                    (base ^ rng.getrandbits(rng.choice([2, 8, 20]))) for _ in range(4)))
    if kind == 2:
        base = rng.getrandbits(64)
        return struct.pack("<2Q", *(rng.choice(_F64) if rng.random() < .4 else
                                    (base ^ rng.getrandbits(rng.choice([2, 20, 50]))) for _ in range(2)))
    if kind == 3:
        return struct.pack("<8H", *(rng.choice(_F16) if rng.random() < .5 else rng.getrandbits(16)
                                    for _ in range(8)))
    return struct.pack("<16b", *(rng.choice([0, 1, -1, 127, -128, 64]) for _ in range(16)))


def _image(rng, n: int) -> bytes:
    kind = rng.randrange(5)
    return b"".join(_lane_value(rng, kind) for _ in range(n // 16))


def inputs(rng, group: str) -> tuple[list[int], int, bytes]:
    regs = [rng.getrandbits(64) if rng.random() < .7 else rng.choice([0, 1, 0x80, 0xFFFFFFFF, 1 << 63])
            for _ in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    page = bytearray(rng.randbytes(harness.DATA_SIZE))
    page[0:YOUT] = b"".join(_image(rng, 32) for _ in range(YOUT // 32))
    mx = 0x1F80
    if group in ROUNDING:
        mx |= rng.randrange(4) << 13 | (0x40 if rng.random() < .2 else 0) | (0x8000 if rng.random() < .2 else 0)
    struct.pack_into("<I", page, MXIN, mx)
    struct.pack_into("<8i", page, GIDX, *(rng.randrange(-0x40, 0x40) for _ in range(8)))
    struct.pack_into("<4q", page, GIDX + 32, *(rng.randrange(-0x40, 0x40) for _ in range(4)))
    return regs, (rng.getrandbits(12) & harness.ARITH) | 2, bytes(page)


def diff(want: harness.Outcome, got: harness.Outcome, group: str, name: str) -> str | None:
    """What differs: exception and RIP, GPRs, arithmetic flags and DF, the
    data page (memory operands and the YMM images), MXCSR."""
    if got.vector != want.vector or (want.vector is not None and got.rip != want.rip):
        return f"exception/rip {name}={got.vector}@{got.rip:#x} cpu={want.vector}@{want.rip:#x}"
    out = [f"{harness.GPR_NAMES[i]}: {name}={y:#x} cpu={x:#x}"
           for i, (x, y) in enumerate(zip(want.regs, got.regs)) if x != y]
    if got.rflags & ARITH_DF != want.rflags & ARITH_DF:
        out.append(f"rflags: {name}={got.rflags & ARITH_DF:#x} cpu={want.rflags & ARITH_DF:#x}")
    for i in range(16):
        a = want.data[YOUT + 32 * i:YOUT + 32 * i + 32]
        b = got.data[YOUT + 32 * i:YOUT + 32 * i + 32]
        if a != b:
            out.append(f"ymm{i}: {name}={b[::-1].hex()} cpu={a[::-1].hex()}")
    if want.data[:YIN] != got.data[:YIN]:
        o = next(i for i in range(YIN) if want.data[i] != got.data[i]) & ~15
        out.append(f"memory +{o:#x}: {name}={got.data[o:o + 16].hex()} cpu={want.data[o:o + 16].hex()}")
    mask = 0xFFFF if group in FULL_MXCSR else 0xFFFF & ~MXCSR_FLAGS
    (mw,), (mg,) = struct.unpack_from("<I", want.data, MXOUT), struct.unpack_from("<I", got.data, MXOUT)
    if (mw ^ mg) & mask:
        out.append(f"mxcsr: {name}={mg:#x} cpu={mw:#x}")
    return "; ".join(out) or None


def _enable_avx(cpu) -> None:
    cpu.xcr0 = 7


@pytest.fixture(scope="module")
def oracles():
    kvm = KvmOracle(avx_state=True)
    bt, bt_cold = harness.BtOracle(), harness.BtOracle(harness.COLD)
    for o in (bt, bt_cold):
        o.state.cr4 |= 1 << 9 | 1 << 10 | 1 << 18     # OSFXSR, OSXMMEXCPT, OSXSAVE
    yield kvm, bt, bt_cold
    kvm.close()


@pytest.mark.parametrize("group", list(GROUPS))
def test_group_matches_cpu(group, oracles):
    """Every sequence of the group, bt (compiled and cold paths) against the CPU."""
    kvm, bt, bt_cold = oracles
    rng = random.Random(f"in:{group}:{SEED}")
    bad, ran = [], 0
    n = EXAMPLES * WEIGHT[group]
    for body, code in build(group, n, SEED):
        regs, rflags, page = inputs(rng, group)
        want = kvm.run(code, regs, rflags, page)
        assert want.vector is None, f"the CPU faulted ({want.vector}) on: {body}"
        for name, o in (("bt", bt), ("bt-cold", bt_cold)):
            d = diff(want, o.run(code, regs, rflags, page, setup=_enable_avx), group, name)
            if d:
                bad.append(f"{d}\n  {body!r}")
        ran += 1
    assert ran == n, f"only {ran} of {n} sequences ran"
    assert not bad, f"{len(bad)} of {ran} sequences differ (seed {SEED}):\n" + "\n".join(bad[:12])


def test_every_vex_mnemonic_is_exercised():
    """The random groups reach every mnemonic of the AVX families that has
    a generator (a new emitter without one fails here)."""
    from pyvmm.engines.bt import avx_fp, avx_shuffle, f16c, fma
    seen = {ins.mnemonic for g in GROUPS for _, code in build(g, EXAMPLES * WEIGHT[g], SEED)
            for ins in X.Decoder(64, code)}
    want = set(avx_shuffle.EMITTERS) | set(avx_fp.EMITTERS) | set(fma.EMITTERS) | set(f16c.EMITTERS)
    names = {v: k for k, v in vars(X.Mnemonic).items() if k.isupper()}
    assert not want - seen, sorted(names[m] for m in want - seen)


# -- faults ---------------------------------------------------------------------------------
def _gp_reported_as_ud(kvm) -> bool:
    """Host fact (as in test_diff_sse4_bmi): kvm_pvm re-reports a CPL3 #GP of
    an instruction its emulator cannot decode as #UD."""
    code = harness.assemble("paddb xmm0, xmmword ptr [rbp + 1]")
    regs = [0] * 16
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    return kvm.run(code, regs, 2, bytes(64)).vector == 6


FAULT_CASES = [
    ("vmovaps ymm1, ymmword ptr [rbp + 16]", 13),
    ("vmovdqa xmmword ptr [rbp + 8], xmm3", 13),
    ("vmovntdq ymmword ptr [rbp + 16], ymm2", 13),
    ("vmovups ymm1, ymmword ptr [rbp + 3]\nvpaddd ymm2, ymm3, ymmword ptr [rbp + 5]", None),
    (".byte 0xc5, 0xf1, 0x70, 0xc1, 0x1b", 6),          # vpshufd with VEX.vvvv != 1111b
    (".byte 0xc5, 0xfd, 0x6e, 0xc0", 6),                # vmovd with VEX.L = 1
    (".byte 0x66, 0xc5, 0xf9, 0x6e, 0xc0", 6),          # a 66 prefix before VEX
    (".byte 0xc4, 0xe2, 0x7d, 0x90, 0x04, 0x08", 6),    # vpgatherdd ymm0, [rax + ymm1], ymm0: mask = destination
]


@pytest.mark.parametrize("src,vector", FAULT_CASES, ids=[f"fault{i}" for i in range(len(FAULT_CASES))])
def test_faults_match_cpu(src, vector, oracles):
    kvm, bt, bt_cold = oracles
    code = harness.assemble(f"{_PROLOGUE}\n{src}\n{_EPILOGUE}")
    regs, rflags, page = inputs(random.Random(src), "int")
    want = kvm.run(code, regs, rflags, page)
    if vector == 13 and want.vector == 6 and _gp_reported_as_ud(kvm):
        want.vector = 13    # the CPU's #GP, as the host's KVM re-reports it
    assert want.vector == vector, f"the CPU gave {want.vector}"
    for name, o in (("bt", bt), ("bt-cold", bt_cold)):
        d = diff(want, o.run(code, regs, rflags, page, setup=_enable_avx), "int", name)
        assert d is None, f"{name}: {d}"


# Gathers and masked moves reaching into a not-present page: the CPU's YMM
# state after the #PF (completed elements loaded, their mask bits cleared),
# CR2 and the error code.
NEXT_PAGE = harness.DATA_ADDR + 0x1000
PAGE_FAULT_CASES = [
    # dword indices 0,1,2,0x400 (*4: the next page),4..: elements 0-2 done, 3 faults
    ("gather-dps", ("vmovdqu ymm2, ymmword ptr [rbp + 0x900]\nvpcmpeqd ymm3, ymm3, ymm3\n"
                    "vgatherdps ymm1, [rbp + ymm2*4], ymm3"), [0, 1, 2, 0x400, 4, 5, 6, 7]),
    ("gather-qq", ("vmovdqu ymm2, ymmword ptr [rbp + 0x900]\nvpcmpeqd ymm3, ymm3, ymm3\n"
                   "vpgatherqq ymm1, [rbp + ymm2*8 + 0xff8], ymm3"), [0, 0, 1, 0, 2, 0, 3, 0]),
    ("gather-masked-off", ("vmovdqu ymm2, ymmword ptr [rbp + 0x900]\nvmovdqu ymm3, ymmword ptr [rbp + 0x940]\n"
                           "vgatherdps ymm1, [rbp + ymm2*4], ymm3"), [0, 1, 2, 3, 0x400, 0x401, 0x402, 0x403]),
    ("gather-xmm", ("vmovdqu ymm2, ymmword ptr [rbp + 0x900]\nvpcmpeqd ymm3, ymm3, ymm3\n"
                    "vpgatherdd xmm1, [rbp + xmm2*4], xmm3"), [0, 0x3ff, 0x400, 3, 0, 0, 0, 0]),
    ("maskmov-load", "vmovdqu ymm3, ymmword ptr [rbp + 0x940]\nvmaskmovps ymm1, ymm3, [rbp + 0xff0]", None),
    ("maskmov-store", "vpcmpeqd ymm3, ymm3, ymm3\nvpmaskmovd [rbp + 0xff0], ymm3, ymm4", None),
    ("maskmov-store-masked-off", "vmovdqu ymm3, ymmword ptr [rbp + 0x940]\nvpmaskmovd [rbp + 0xff0], ymm3, ymm4",
     None),
]


@pytest.fixture(scope="module")
def user_oracles(oracles):
    kvm = oracles[0]
    bt = harness.UserBtOracle()
    bt.state.cr4 |= 1 << 18
    for o in (kvm, bt):
        o.set_page(NEXT_PAGE, 0)
    yield kvm, bt
    for o in (kvm, bt):
        o.reset_pages()


@pytest.mark.parametrize("name,src,idx", PAGE_FAULT_CASES, ids=[c[0] for c in PAGE_FAULT_CASES])
def test_page_fault_mid_instruction_matches_cpu(name, src, idx, user_oracles):
    kvm, bt = user_oracles
    rng = random.Random(name)
    regs, rflags, page = inputs(rng, "int")
    page = bytearray(page)
    if idx is not None:
        struct.pack_into("<8i", page, GIDX, *idx)
    # mask at 0x940: elements 0-3 selected only (the low half stays on the mapped page)
    struct.pack_into("<8i", page, GIDX + 0x40, -1, -1, -1, -1, 0, 0, 0, 0)
    code = harness.assemble(f"{_PROLOGUE}\n{src}\n{_EPILOGUE}")
    want = kvm.run(code, regs, rflags, bytes(page))
    got = bt.run(code, regs, rflags, bytes(page), setup=_enable_avx)
    assert (got.vector, got.rip) == (want.vector, want.rip), \
        f"bt {got.vector}@{got.rip:#x} cpu {want.vector}@{want.rip:#x}"
    if want.vector is None:
        assert diff(want, got, "int", "bt") is None
        return
    assert want.vector == 14
    assert (got.cr2, got.error_code) == (want.cr2, want.error_code)
    ymm, _ = kvm.vector_state()
    mine = [got.cpu.xmm[i] | got.cpu.ymmh[i] << 128 for i in range(16)]
    bad = [f"ymm{i}: bt={b:#066x} cpu={a:#066x}" for i, (a, b) in enumerate(zip(ymm, mine)) if a != b]
    assert not bad, "\n".join(bad)
    assert got.data == want.data


# Unmasked SIMD exceptions (#XM): the flags set in MXCSR, the destination
# left alone.  (name, body, MXCSR, {ymm register: 32-bit lanes to load},
# the vector the CPU raises).
XM_CASES = [
    ("fma-pe", "vfmadd231ps ymm1, ymm2, ymm3", 0x1F80 & ~0x1000,
     {1: [0x3F800000] * 8, 2: [0x3F8CCCCD] * 8, 3: [0x3E4CCCCD] * 8}, 19),
    ("fma-snan", "vfmadd132sd xmm1, xmm2, xmm3", 0x1F80 & ~0x80,
     {1: [1, 0x7FF00000] * 4, 2: [0, 0x3FF00000] * 4, 3: [0, 0x40000000] * 4}, 19),
    ("fma-masked-snan", "vfmadd132sd xmm1, xmm2, xmm3", 0x1F80 & ~0x1000,
     {1: [1, 0x7FF00000] * 4, 2: [0, 0x3FF00000] * 4, 3: [0, 0x40000000] * 4}, None),
    ("ps2ph-overflow", "vcvtps2ph xmm1, ymm2, 0", 0x1F80 & ~0x400, {2: [0x501502F9] * 8}, 19),
    ("ps2ph-underflow-masked", "vcvtps2ph xmm1, ymm2, 0", 0x1F80 & ~0x400, {2: [0x33000001] * 8}, None),
]


@pytest.mark.parametrize("name,body,mx,lanes,vector", XM_CASES, ids=[c[0] for c in XM_CASES])
def test_unmasked_exception_matches_cpu(name, body, mx, lanes, vector, oracles):
    kvm, bt, bt_cold = oracles
    regs, rflags, page = inputs(random.Random(name), "fma")
    page = bytearray(page)
    struct.pack_into("<I", page, MXIN, mx)
    for reg, vals in lanes.items():
        struct.pack_into("<8I", page, YIN + 32 * reg, *vals)
    code = harness.assemble(f"{_PROLOGUE}\n{body}\n{_EPILOGUE}")
    want = kvm.run(code, regs, rflags, bytes(page))
    assert want.vector == vector, f"the CPU gave {want.vector}"
    if want.vector is None:
        for o in (bt, bt_cold):
            assert diff(want, o.run(code, regs, rflags, bytes(page), setup=_enable_avx), "fma", "bt") is None
        return
    ymm, mxcsr = kvm.vector_state()
    for o in (bt, bt_cold):
        got = o.run(code, regs, rflags, bytes(page), setup=_enable_avx)
        assert (got.vector, got.rip) == (want.vector, want.rip)
        mine = [got.cpu.xmm[i] | got.cpu.ymmh[i] << 128 for i in range(16)]
        assert mine == ymm, [i for i in range(16) if mine[i] != ymm[i]]
        assert got.cpu.mxcsr == mxcsr, f"bt={got.cpu.mxcsr:#x} cpu={mxcsr:#x}"



@pytest.mark.parametrize("cr0_ts,osxsave,xcr0,vector", [
    (False, True, 7, None), (False, True, 3, 6), (False, False, 7, 6), (True, True, 7, 7), (True, True, 3, 6)],
    ids=["enabled", "xcr0-no-avx", "no-osxsave", "ts", "ts-and-no-avx"])
def test_avx_state_checks(cr0_ts, osxsave, xcr0, vector):
    """#UD without CR4.OSXSAVE or XCR0.SSE|AVX, else #NM with CR0.TS (SDM
    2.8, exception class 1-4): the CPU under test runs with AVX enabled, so
    only bt is checked here, on a VEX.128 and a VEX.256 form."""
    bt = harness.BtOracle()
    bt.state.cr4 |= 1 << 9 | (1 << 18 if osxsave else 0)
    bt.state.cr0 |= 8 if cr0_ts else 0

    def setup(cpu) -> None:
        cpu.xcr0 = xcr0

    for src in ("vpaddd xmm1, xmm2, xmm3", "vfmadd231ps ymm1, ymm2, ymm3", "vzeroupper"):
        regs = [0] * 16
        regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
        got = bt.run(harness.assemble(src), regs, 2, bytes(64), setup=setup)
        assert got.vector == vector, (src, got.vector)
