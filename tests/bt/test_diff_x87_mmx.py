"""Differential tests of bt's MMX and x87 forms against the real CPU (KVM at
CPL3, the host's silicon) and Unicorn.

Every sequence starts from `fninit` and MM/ST values loaded from the data
page, and ends by storing the whole x87 state (fxsave: FCW, FSW, abridged
FTW, ST0-7 as 80-bit images; fnstenv: the full tag word). Compared: GPRs,
RFLAGS, the exception vector, the data page (those images included) -
except FIP/FCS/FOP/FDP/FDS, which bt does not track.

- MMX forms and the exact x87 forms (FCMOVcc, FSAVE/FRSTOR, FSTENV/FLDENV in
  16- and 32-bit layouts, FPREM/FPREM1/FSCALE/FXTRACT): bit-exact against
  the CPU and against Unicorn.
- Transcendentals (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X,
  FYL2XP1): the CPU's results are within 1 ulp of the exact value but not
  always correctly rounded, while bt rounds correctly (x87math.py). So each
  80-bit result must be bit-exact or 1 ulp off, and at least MIN_EXACT of
  them bit-exact; C1 (the direction the CPU rounded its own approximation)
  is not compared, all other FSW bits are. Unicorn computes these in
  binary64 and is not compared.

PYVMM_BT_X87_EXAMPLES scales the number of random sequences (default 120
per group); PYVMM_BT_RANDOM=1 draws new ones."""

from __future__ import annotations

import os
import random
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

from pyvmm.engines.bt.cpuid import CpuidTable  # noqa: E402
from tests.hostfacts import require_from_setup  # noqa: E402

_why = kvm_usable()
if _why is not None:     # the host fact: the reference is the real CPU through KVM
    pytest.skip(_why, allow_module_level=True)
require_from_setup(programs=["as"], modules=["unicorn"], package="binutils")
pytestmark = pytest.mark.kvm

EXAMPLES = int(os.environ.get("PYVMM_BT_X87_EXAMPLES", "120"))
SEED = random.randrange(1 << 30) if os.environ.get("PYVMM_BT_RANDOM") == "1" else 2026
MIN_EXACT = 0.9
BIAS = 16383
SIGN = 1 << 79
M64 = (1 << 64) - 1

# Data page layout (rbp = DATA_ADDR).
MM_IN, XMM_IN, MEM_IN, ST_IN = 0x000, 0x080, 0x040, 0x100   # MM0-7, XMM0-1, memory operands, 80-bit values
SAVE_AREA, ENV_AREA = 0x400, 0x600      # fnsave/frstor and fnstenv/fldenv in sequences
RANDOM_IMAGE = 0x700                    # a random fsave image (frstor)
CW_IN, XMM_OUT, FX_OUT, ENV_OUT = 0x3F0, 0xB00, 0xC00, 0xE00
ARITH = 0x8D5
SF, ES = 0x40, 0x80
INDEFINITE = 0xFFFFC000000000000000     # what a masked stack fault leaves
CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 9, 1 << 10

PRE_MMX = "fninit\n" + "".join(f"movq mm{i}, [rbp + {MM_IN + 8 * i}]\n" for i in range(8)) + \
    f"movdqu xmm0, [rbp + {XMM_IN}]\nmovdqu xmm1, [rbp + {XMM_IN + 16}]\n"
POST = f"\nfxsave [rbp + {FX_OUT}]\nfnstenv [rbp + {ENV_OUT}]"
POST_MMX = f"\nmovdqu [rbp + {XMM_OUT}], xmm0\nmovdqu [rbp + {XMM_OUT + 16}], xmm1" + POST


# -- comparison -------------------------------------------------------------------------
class Spans(list):
    unicorn: list = []


def _untracked(env16_at=(), env32_at=()) -> list[tuple[int, int]]:
    """Byte ranges bt does not model: FOP/FIP/FDP in the fxsave image, the
    instruction/operand pointers of environment images, fxsave's reserved
    bytes and the XMM area (XMM registers are compared through XMM_OUT)."""
    spans = Spans([(FX_OUT + 5, FX_OUT + 24), (FX_OUT + 24, FX_OUT + 32), (FX_OUT + 160, FX_OUT + 512)])
    spans += [(FX_OUT + 32 + 16 * i + 10, FX_OUT + 48 + 16 * i) for i in range(8)]
    spans += [(a + 12, a + 28) for a in (ENV_OUT, *env32_at)] + [(a + 6, a + 14) for a in env16_at]
    # Unicorn (QEMU 5) stores the reserved upper words of a 32-bit
    # environment as 0 where the CPU stores 0xFFFF: not compared with it.
    spans.unicorn = [(a + o, a + o + 2) for a in (ENV_OUT, *env32_at) for o in (2, 6, 10)]
    return spans


def _masked(data: bytes, spans) -> bytes:
    b = bytearray(data)
    for lo, hi in spans:
        b[lo:hi] = bytes(hi - lo)
    return bytes(b)


def st_images(data: bytes) -> list[int]:
    return [int.from_bytes(data[FX_OUT + 32 + 16 * i:FX_OUT + 42 + 16 * i], "little") for i in range(8)]


def fsw(data: bytes) -> int:
    return struct.unpack_from("<H", data, FX_OUT + 2)[0]


def differences(want, got, spans, who: str) -> list[str]:
    out = []
    if want.vector != got.vector:
        return [f"exception {who}={got.vector} cpu={want.vector}"]
    for i, (a, b) in enumerate(zip(want.regs, got.regs)):
        if a != b:
            out.append(f"{harness.GPR_NAMES[i]} {who}={b:#x} cpu={a:#x}")
    if (want.rflags ^ got.rflags) & ARITH:
        out.append(f"rflags {who}={got.rflags:#x} cpu={want.rflags:#x}")
    if who == "unicorn":
        spans = spans + spans.unicorn
    wd, gd = _masked(want.data, spans), _masked(got.data, spans)
    if wd != gd:
        offs = [i for i in range(len(wd)) if wd[i] != gd[i]]
        out.append(f"data differs at {len(offs)} bytes from +{offs[0]:#x}: "
                   f"{who}={gd[offs[0]:offs[0] + 10].hex()} cpu={wd[offs[0]:offs[0] + 10].hex()}")
    return out


class HostVendorCpuid:
    """bt's CPUID table with the host's vendor in leaf 0, for the one place
    where x87/MMX behaviour depends on the vendor (EMMS and TOP, mmx.py)."""

    def __init__(self):
        self.table = CpuidTable(0, 1, [])
        with open("/proc/cpuinfo") as f:
            vendor = next(line.split(":")[1].strip() for line in f if line.startswith("vendor_id")).encode()
        w = [int.from_bytes(vendor[i:i + 4], "little") for i in (0, 4, 8)]
        self.leaf0 = (self.table.lookup(0, 0)[0], w[0], w[2], w[1])

    def lookup(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        return self.leaf0 if leaf == 0 else self.table.lookup(leaf, sub)


_HOST_CPUID = HostVendorCpuid()


def _host_vendor(cpu) -> None:
    cpu.cpuid = _HOST_CPUID


class Oracles:
    def __init__(self):
        self.kvm = KvmOracle()
        self.bt = harness.BtOracle()
        self.bt_cold = harness.BtOracle(harness.COLD)
        for bt in (self.bt, self.bt_cold):
            bt.state.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT   # as the KVM guest has them
        self.uc = harness.UnicornOracle()
        self.runs = 0

    def run_all(self, code: bytes, regs: list[int], rflags: int, data: bytes, unicorn: bool = True):
        self.runs += 1
        outs = {"cpu": self.kvm.run(code, list(regs), rflags, data)}
        for who, bt in (("bt", self.bt), ("bt-cold", self.bt_cold)):
            outs[who] = bt.run(code, list(regs), rflags, data, setup=_host_vendor)
        if unicorn:
            outs["unicorn"] = self.uc.run(code, list(regs), rflags, data)
        return outs


_oracles = Oracles()


def _regs(rng: random.Random) -> list[int]:
    regs = [rng.choice([rng.getrandbits(64), rng.getrandbits(16), 0x8000000080008000]) for _ in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    regs[7] = harness.DATA_ADDR + 0x200 + rng.randrange(0, 0x100)   # maskmovq's rdi
    return regs


# -- MMX --------------------------------------------------------------------------------------
MMX_BINARY = ("paddb paddw paddd paddq psubb psubw psubd psubq paddsb paddsw paddusb paddusw psubsb "
              "psubsw psubusb psubusw pcmpeqb pcmpeqw pcmpeqd pcmpgtb pcmpgtw pcmpgtd pmullw pmulhw "
              "pmulhuw pmaddwd pmuludq pand pandn por pxor packsswb packssdw packuswb punpcklbw "
              "punpcklwd punpckldq punpckhbw punpckhwd punpckhdq pavgb pavgw pminub pmaxub pminsw "
              "pmaxsw psadbw").split()
MMX_SHIFTS = "psllw pslld psllq psrlw psrld psrlq psraw psrad".split()
SSSE3_MMX = ("pshufb phaddw phaddd phaddsw phsubw phsubd phsubsw pmaddubsw pmulhrsw psignb psignw "
             "psignd pabsb pabsw pabsd").split()
G32 = ["eax", "ebx", "ecx", "edx", "esi", "r8d", "r9d"]
G64 = ["rax", "rbx", "rcx", "rdx", "rsi", "r8", "r9"]


def mmx_snippet(rng: random.Random) -> str:
    mm = lambda: f"mm{rng.randrange(8)}"  # noqa: E731
    mem = lambda: f"qword ptr [rbp + {MEM_IN + rng.randrange(0x30)}]"  # noqa: E731
    k = rng.randrange(13)
    if k <= 4:
        op = rng.choice(MMX_BINARY)
        src = mm() if rng.random() < .6 else (
            f"dword ptr [rbp + {MEM_IN + rng.randrange(0x30)}]" if op.startswith("punpckl") else mem())
        return f"{op} {mm()}, {src}"
    if k == 5:
        cnt = rng.choice([str(rng.choice([0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 255])), mm(), mem()])
        return f"{rng.choice(MMX_SHIFTS)} {mm()}, {cnt}"
    if k == 6:
        return f"pshufw {mm()}, {rng.choice([mm(), mem()])}, {rng.randrange(256)}"
    if k == 7:
        return rng.choice([f"pmovmskb {rng.choice(G32)}, {mm()}", f"pextrw {rng.choice(G32)}, {mm()}, {rng.randrange(8)}",
                           f"pinsrw {mm()}, {rng.choice(G32)}, {rng.randrange(8)}",
                           f"pinsrw {mm()}, word ptr [rbp + {MEM_IN + rng.randrange(0x30)}], {rng.randrange(4)}"])
    if k == 8:
        return rng.choice([f"movd {mm()}, {rng.choice(G32)}", f"movq {mm()}, {rng.choice(G64)}",
                           f"movd {rng.choice(G32)}, {mm()}", f"movq {rng.choice(G64)}, {mm()}",
                           f"movd {mm()}, dword ptr [rbp + {MEM_IN + rng.randrange(0x30)}]",
                           f"movd dword ptr [rbp + {0x200 + rng.randrange(0x100)}], {mm()}"])
    if k == 9:
        return rng.choice([f"movq {mm()}, {mm()}", f"movq {mm()}, {mem()}",
                           f"movq qword ptr [rbp + {0x200 + rng.randrange(0x100)}], {mm()}",
                           f"movntq qword ptr [rbp + {0x200 + 8 * rng.randrange(0x20)}], {mm()}"])
    if k == 10:
        return rng.choice([f"maskmovq {mm()}, {mm()}", f"movq2dq xmm{rng.randrange(2)}, {mm()}",
                           f"movdq2q {mm()}, xmm{rng.randrange(2)}"])
    if k == 11:     # the SSSE3 forms on MM registers (ssse3.py, through this state)
        if rng.random() < .2:
            return f"palignr {mm()}, {rng.choice([mm(), mem()])}, {rng.randrange(20)}"
        return f"{rng.choice(SSSE3_MMX)} {mm()}, {rng.choice([mm(), mem()])}"
    # the x87/MMX transitions: emms empties the tags, an x87 load after it
    return rng.choice(["emms", "emms\nfld1", "fld1\nfldz", f"emms\nfld tbyte ptr [rbp + {ST_IN}]"])


def _random_bytes(rng: random.Random, n: int) -> bytes:
    special = [b"\x00", b"\xff", b"\x80", b"\x7f", b"\x01"]
    return b"".join(rng.choice(special) if rng.random() < .3 else bytes([rng.getrandbits(8)]) for _ in range(n))


def _unicorn_comparable(text: str) -> bool:
    """Whether Unicorn (QEMU 5) models a MMX sequence as the CPU does: not
    with x87 loads amid MMX (no stack faults, TOP kept at EMMS), in-place
    horizontal adds/subtracts (phaddd mm4, mm4 reads a half-written
    destination), or SSSE3 forms after EMMS (no MMX transition for them)."""
    if "fld" in text or "phadd" in text or "phsub" in text:
        return False
    return "emms" not in text or not any(op in text for op in SSSE3_MMX + ["palignr"])


def test_mmx_sequences_match_the_cpu_and_unicorn():
    rng = random.Random(SEED)
    texts = [mmx_snippet(rng) for _ in range(400)]
    codes = harness.assemble_many(texts)
    pre, post = harness.assemble(PRE_MMX), harness.assemble(POST_MMX)
    failures = []
    for _ in range(EXAMPLES * 2):
        picks = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 4))]
        code = pre + b"".join(codes[p] for p in picks) + post
        data = (_random_bytes(rng, 0x100) + _st_values(rng, 8)).ljust(harness.DATA_SIZE, b"\x5a")
        text = "; ".join(texts[p] for p in picks).replace("\n", "; ")
        outs = _oracles.run_all(code, _regs(rng), rng.choice([2, 0x8D7]), data,
                                unicorn=_unicorn_comparable(text))
        spans = _untracked()
        # Unicorn (QEMU 5) leaves the exponent of a register MMX wrote as it
        # was (the CPU sets it to 0xFFFF), and so derives other full tags.
        spans.unicorn += [(FX_OUT + 40 + 16 * i, FX_OUT + 42 + 16 * i) for i in range(8)]
        spans.unicorn.append((ENV_OUT + 8, ENV_OUT + 10))
        for who in [w for w in outs if w != "cpu"]:
            d = differences(outs["cpu"], outs[who], spans, who)
            if d:
                failures.append(f"{text} -> " + "; ".join(d))
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:8])


@pytest.mark.parametrize("prog", ["fld1\nfld1\nemms\nfld1", "fld1\nfstp st(0)\nfld1\nemms",
                                  "paddb mm0, mm1\nfld1\nfldz\nemms\nfld1"])
def test_emms_and_top_as_on_the_cpu(prog):
    """What EMMS does to TOP (AMD sets it to 0; bt follows the vendor it
    reports, here the host's) and the stack faults of x87 loads after MMX."""
    outs = _oracles.run_all(harness.assemble(CLEAR + prog + POST), _regs(random.Random(3)), 2,
                            bytes(harness.DATA_SIZE), unicorn=False)
    for who in ("bt", "bt-cold"):
        assert not differences(outs["cpu"], outs[who], _untracked(), who), prog


@pytest.mark.parametrize("cr0,vector", [(8, 7), (4, 6)])
def test_mmx_faults_before_changing_state(cr0, vector):
    """CR0.TS gives #NM and CR0.EM #UD (the CPU: SDM vol. 2, MMX exceptions);
    the tags stay as fninit left them. Checked in bt alone: the oracle runs
    at CPL3, where CR0 cannot be set."""
    code = harness.assemble("paddb mm0, mm1")
    regs = _regs(random.Random(1))
    out = _oracles.bt.run(code, regs, 2, bytes(harness.DATA_SIZE), setup=lambda c: setattr(c, "cr0", c.cr0 | cr0))
    assert out.vector == vector
    assert getattr(out.cpu, "fpu", None) is None or all(out.cpu.fpu.empty)


# -- x87 values ----------------------------------------------------------------------------
def x80(rng: random.Random, lo: int = -70, hi: int = 70) -> int:
    """A random 80-bit value: mostly normals with exponents in [lo, hi], and
    the special classes."""
    k = rng.randrange(20)
    sign = rng.getrandbits(1) << 79
    if k == 0:
        return sign
    if k == 1:
        return sign | 0x7FFF << 64 | 1 << 63                          # infinity
    if k == 2:
        return sign | 0x7FFF << 64 | 3 << 62 | rng.getrandbits(40)    # quiet NaN
    if k == 3:
        return sign | rng.getrandbits(63)                            # denormal
    if k == 4:
        return sign | rng.choice([1, 0x7FFE, BIAS, BIAS + 63, BIAS - 1]) << 64 | 1 << 63 | rng.getrandbits(63)
    mant = 1 << 63 | (rng.getrandbits(63) if rng.random() < .7 else rng.getrandbits(8) << 55)
    return sign | min(max(BIAS + rng.randint(lo, hi), 1), 0x7FFE) << 64 | mant


def _st_values(rng: random.Random, n: int, gen=None) -> bytes:
    gen = gen or (lambda: x80(rng))
    return b"".join(gen().to_bytes(10, "little").ljust(16, b"\0") for _ in range(n))


def _ld(i: int) -> str:
    return f"fld tbyte ptr [rbp + {ST_IN + 16 * i}]"


_CW = [0x37F, 0x77F, 0xB7F, 0xF7F, 0x27F, 0x07F, 0xE7F]   # RC 0..3, PC 53/24 bits


def exact_snippet(rng: random.Random) -> tuple[str, list[int], list[int]]:
    """(text, 16-bit env offsets, 32-bit env offsets) of one exact-form snippet."""
    k = rng.randrange(8)
    if k == 0:
        cc = rng.choice(["b", "e", "be", "u", "nb", "ne", "nbe", "nu"])
        flags = rng.choice(["stc", "clc", "cmp eax, ebx", "test ecx, ecx", "cmp al, 0x80", "xor eax, eax"])
        return f"{flags}\nfcmov{cc} st, st({rng.randrange(8)})", [], []
    if k == 1:
        n16 = rng.random() < .5
        p = "data16 " if n16 else ""
        mid = rng.choice(["fld1", "fldz\nfldpi", _ld(rng.randrange(8)), "fincstp", "paddb mm1, mm2"])
        text = f"{p}fnsave [rbp + {SAVE_AREA}]\n{mid}\n{p}frstor [rbp + {SAVE_AREA}]"
        return text, [SAVE_AREA] if n16 else [], [] if n16 else [SAVE_AREA]
    if k == 2:
        n16 = rng.random() < .5
        p = "data16 " if n16 else ""
        text = f"{p}fnstenv [rbp + {ENV_AREA}]\nfld1\nfldcw [rbp + {CW_IN}]\n{p}fldenv [rbp + {ENV_AREA}]"
        return text, [ENV_AREA] if n16 else [], [] if n16 else [ENV_AREA]
    if k == 3:
        # a stored image, then a load of a random one (tags: only empty/not empty count)
        n16 = rng.random() < .5
        p = "data16 " if n16 else ""
        return f"{p}frstor [rbp + {RANDOM_IMAGE}]", [], []
    if k == 4:
        return rng.choice(["fprem", "fprem1", "fprem\nfprem\nfprem", "fprem1\nfprem1"]), [], []
    if k == 5:
        return "fscale", [], []
    if k == 6:
        return "fxtract", [], []
    return rng.choice(["fxch st(2)", "fstp st(0)", "fld st(1)", "ffree st(1)", "fdecstp"]), [], []


# The physical registers of an empty stack keep what was there, which on
# the CPU is whatever an earlier run left: zero them all first.
CLEAR = "fninit\n" + "fldz\n" * 8 + "fninit\n"


def _x87_prologue(rng: random.Random, n: int) -> str:
    cw = "" if rng.random() < .5 else f"fldcw [rbp + {CW_IN}]\n"
    return CLEAR + cw + "\n".join(_ld(i) for i in range(n)) + "\n"


def _x87_data(rng: random.Random, gen=None) -> bytes:
    data = bytearray(_random_bytes(rng, 0x100) + _st_values(rng, 8, gen))
    data = data.ljust(harness.DATA_SIZE, b"\x5a")
    struct.pack_into("<H", data, CW_IN, rng.choice(_CW))
    # a random fsave image for frstor: exceptions masked (bt raises no #MF)
    image = bytearray(_random_bytes(rng, 28))
    for i in range(8):
        image += (gen or (lambda: x80(rng)))().to_bytes(10, "little")
    struct.pack_into("<H", image, 0, rng.choice(_CW))
    for off in (2, 4):   # FSW of the 16- and 32-bit layouts: ES and B clear (Unicorn loads them as they are)
        struct.pack_into("<H", image, off, struct.unpack_from("<H", image, off)[0] & 0x7F7F)
    data[RANDOM_IMAGE:RANDOM_IMAGE + len(image)] = image
    return bytes(data)


def test_exact_x87_forms_match_the_cpu_and_unicorn():
    rng = random.Random(SEED + 1)
    snippets = [exact_snippet(rng) for _ in range(300)]
    codes = harness.assemble_many([s[0] for s in snippets])
    post = harness.assemble(POST)
    prologues: dict[str, bytes] = {}
    failures = []
    for _ in range(EXAMPLES * 2):
        picks = [rng.randrange(len(snippets)) for _ in range(rng.randint(1, 3))]
        pro = _x87_prologue(rng, rng.randint(2, 8))
        if pro not in prologues:
            prologues[pro] = harness.assemble(pro)
        code = prologues[pro] + b"".join(codes[p] for p in picks) + post
        spans = _untracked([a for p in picks for a in snippets[p][1]], [a for p in picks for a in snippets[p][2]])
        text = "; ".join(snippets[p][0] for p in picks).replace("\n", "; ")
        # unicorn (QEMU 5) computes fprem in binary64 and sets no C1 in fscale/fxtract: bt vs the CPU only there
        unicorn = not any(w in text for w in ("fprem", "fscale", "fxtract"))
        outs = _oracles.run_all(code, _regs(rng), rng.choice([2, 0x8D7, 0x47, 0x803]), _x87_data(rng), unicorn)
        if fsw(outs["cpu"].data) & (SF | ES) or INDEFINITE in st_images(outs["cpu"].data) \
                or f"frstor [rbp + {RANDOM_IMAGE}]" in text:
            # Unicorn (QEMU 5) flags no stack fault and does not take unnormal
            # or pseudo-NaN images as the CPU does: such runs are compared with the CPU only
            outs.pop("unicorn", None)
        for who in [w for w in outs if w != "cpu"]:
            d = differences(outs["cpu"], outs[who], spans, who)
            if d:
                failures.append(f"{pro!r} {text} -> " + "; ".join(d))
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:8])


def test_fsave_image_layouts():
    """The full tag word (valid, zero, special, empty) and the 16/32-bit
    layouts, on fixed values of every class; fnsave reinitialises."""
    vals = [0, 1 << 79, 0x7FFF << 64 | 1 << 63, 0x12345, BIAS << 64 | 1 << 63, BIAS << 64 | 0x1234]
    data = bytearray(harness.DATA_SIZE)
    struct.pack_into("<H", data, CW_IN, 0x37F)
    for i, v in enumerate(vals):
        data[ST_IN + 16 * i:ST_IN + 16 * i + 10] = v.to_bytes(10, "little")
    prog = (_x87_prologue(random.Random(0), 0) + "\n".join(_ld(i) for i in range(6))
            + f"\nfnsave [rbp + {SAVE_AREA}]\nfld1\ndata16 fnsave [rbp + {SAVE_AREA + 0x80}]\n"
            + f"frstor [rbp + {SAVE_AREA}]\ndata16 fnstenv [rbp + {ENV_AREA}]" + POST)
    outs = _oracles.run_all(harness.assemble(prog), _regs(random.Random(0)), 2, bytes(data))
    spans = _untracked([SAVE_AREA + 0x80, ENV_AREA], [SAVE_AREA])
    for who in ("bt", "bt-cold", "unicorn"):
        assert not differences(outs["cpu"], outs[who], spans, who)
    # R7..R2 hold zero, -zero, infinity, a denormal, 1.0, an unnormal; R1, R0 empty
    for who in ("cpu", "bt"):
        assert struct.unpack_from("<H", outs[who].data, SAVE_AREA + 8)[0] == 0b01_01_10_10_00_10_11_11, who


def test_fnsave_that_faults_changes_nothing():
    """fnsave whose area runs into an unmapped page raises #PF and leaves
    the stack as it was (the BtOracle identity-maps only the first 4 GiB)."""
    code = harness.assemble("fninit\nfld1\nfnsave [rbx]")
    regs = _regs(random.Random(2))
    regs[3] = (1 << 32) - 0x20
    out = _oracles.bt.run(code, regs, 2, bytes(harness.DATA_SIZE))
    assert out.vector == 14
    assert out.cpu.fpu.top == 7 and not out.cpu.fpu.empty[7]


# -- basic arithmetic in 80 bits -------------------------------------------------------------
_MEM_OUT = 0x200          # where stores of the sequences go


def arith_snippet(rng: random.Random) -> str:
    i = lambda: rng.randrange(1, 8)  # noqa: E731
    m32 = lambda: f"dword ptr [rbp + {MEM_IN + 4 * rng.randrange(8)}]"  # noqa: E731
    m64 = lambda: f"qword ptr [rbp + {MEM_IN + 8 * rng.randrange(4)}]"  # noqa: E731
    out = lambda: f"[rbp + {_MEM_OUT + 16 * rng.randrange(8)}]"  # noqa: E731
    k = rng.randrange(8)
    op = rng.choice(["fadd", "fsub", "fsubr", "fmul", "fdiv", "fdivr"])
    if k == 0:
        return rng.choice([f"{op} st, st({i()})", f"{op} st({i()}), st", f"{op}p st({i()}), st"])
    if k == 1:
        return f"{op} {rng.choice([m32(), m64()])}"
    if k == 2:
        return f"fi{op[1:]} {rng.choice(['word', 'dword'])} ptr [rbp + {MEM_IN + 2 * rng.randrange(16)}]"
    if k == 3:
        return rng.choice(["fsqrt", "frndint", "fchs", "fabs", "fxam", "ftst"])
    if k == 4:
        return rng.choice([f"fcom st({i()})", f"fucom st({i()})", f"fcomp {m64()}", f"fcom {m32()}",
                           f"fcomi st, st({i()})", f"fucomi st, st({i()})", f"ffreep st({i()})",
                           f"fi{rng.choice(['com', 'comp'])} {rng.choice(['word', 'dword'])} ptr "
                           f"[rbp + {MEM_IN + 2 * rng.randrange(16)}]"])
    if k == 5:
        return rng.choice([f"fst dword ptr {out()}", f"fst qword ptr {out()}", f"fstp tbyte ptr {out()}",
                           f"fist dword ptr {out()}", f"fistp qword ptr {out()}", f"fisttp word ptr {out()}"])
    if k == 6:
        return rng.choice([f"fld {m32()}", f"fld {m64()}", f"fild dword ptr [rbp + {MEM_IN + 4 * rng.randrange(8)}]"])
    return f"fldcw [rbp + {CW_IN}]"


def _float_bits(rng: random.Random, size: int) -> int:
    """Random binary32/64 bits, every class well represented."""
    ebits, fbits = (8, 23) if size == 4 else (11, 52)
    k = rng.randrange(6)
    sign = rng.getrandbits(1) << (ebits + fbits)
    if k == 0:
        return sign | rng.getrandbits(fbits) >> rng.randrange(fbits)           # denormal or zero
    if k == 1:
        return sign | ((1 << ebits) - 1) << fbits | rng.choice([0, 1, 1 << (fbits - 1), rng.getrandbits(fbits)])
    bias = (1 << (ebits - 1)) - 1
    e = bias + rng.randint(-8, 8) if k < 4 else rng.randrange(1, (1 << ebits) - 1)
    return sign | e << fbits | rng.getrandbits(fbits)


def test_basic_arithmetic_in_80_bits_matches_the_cpu():
    """fadd/fsub/fmul/fdiv (register, m32/m64, integer forms), fsqrt,
    frndint, compares, stores to m32/m64/m80/integers and loads, under
    every rounding mode and precision control: bit-exact with the CPU
    (results, FSW with C1 and the exception flags, EFLAGS of fcomi)."""
    rng = random.Random(SEED + 2)
    texts = [arith_snippet(rng) for _ in range(400)]
    codes = harness.assemble_many(texts)
    post = harness.assemble(POST)
    prologues: dict[str, bytes] = {}
    failures = []
    for _ in range(EXAMPLES * 2):
        picks = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 5))]
        pro = _x87_prologue(rng, rng.randint(3, 7))
        if pro not in prologues:
            prologues[pro] = harness.assemble(pro)
        data = bytearray(_x87_data(rng, lambda: x80(rng, -80, 80) if rng.random() < .8 else x80(rng, -16400, 16400)))
        for j in range(4):
            struct.pack_into("<Q", data, MEM_IN + 8 * j, _float_bits(rng, 8))
        if rng.random() < .5:
            for j in range(8):
                struct.pack_into("<I", data, MEM_IN + 4 * j, _float_bits(rng, 4))
        code = prologues[pro] + b"".join(codes[p] for p in picks) + post
        outs = _oracles.run_all(code, _regs(rng), 2, bytes(data), unicorn=False)
        for who in ("bt", "bt-cold"):
            d = differences(outs["cpu"], outs[who], _untracked(), who)
            if d:
                failures.append(f"cw={struct.unpack_from('<H', data, CW_IN)[0]:#x} {pro.count('fld ')} values; "
                                + "; ".join(texts[p] for p in picks) + " -> " + "; ".join(d))
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:8])


# -- transcendentals ------------------------------------------------------------------------
def _trig_arg(rng):
    return x80(rng, -30, 70) if rng.random() < .15 else x80(rng, -30, 5)


def _unit_arg(rng):
    v = x80(rng, -40, -1)
    return v if rng.random() < .9 else rng.choice([BIAS << 64 | 1 << 63, 1 << 79 | BIAS << 64 | 1 << 63, 0])


def _small_arg(rng):
    """fyl2xp1's domain, |x| < 1 - sqrt(2) / 2 (the SDM leaves the rest undefined)."""
    v = x80(rng, -40, -3)
    return v if v >> 64 & 0x7FFF <= BIAS - 3 else v & SIGN | (BIAS - 3) << 64 | 1 << 63


def _positive(rng):
    return x80(rng, -60, 60) & ~(1 << 79) if rng.random() < .9 else x80(rng)


TRANSCENDENTAL = [  # (program after the prologue, how many values it loads, value generator)
    ("fsin", 1, _trig_arg), ("fcos", 1, _trig_arg), ("fsincos", 1, _trig_arg), ("fptan", 1, _trig_arg),
    ("fpatan", 2, lambda rng: x80(rng, -60, 60)), ("f2xm1", 1, _unit_arg),
    ("fyl2x", 2, _positive), ("fyl2xp1", 2, _small_arg),
]


def ulps(a: int, b: int) -> int:
    """Distance in units of the last place of two 80-bit images of one sign."""
    if a >> 79 != b >> 79:
        return 0 if (a | b) & ((1 << 79) - 1) == 0 else 1 << 80
    return abs((a & ((1 << 79) - 1)) - (b & ((1 << 79) - 1)))


@pytest.mark.parametrize("op,nargs,gen", TRANSCENDENTAL, ids=[t[0] for t in TRANSCENDENTAL])
def test_transcendentals_match_the_cpu_to_the_last_bit_or_within_one_ulp(op, nargs, gen):
    rng = random.Random(f"{SEED}-{op}")
    code = harness.assemble(f"{CLEAR}fldcw [rbp + {CW_IN}]\n" + "\n".join(_ld(i) for i in range(nargs))
                            + f"\n{op}" + POST)
    exact = total = 0
    failures = []
    for _ in range(EXAMPLES):
        data = bytearray(_x87_data(rng, lambda: gen(rng)))
        struct.pack_into("<H", data, CW_IN, rng.choice(_CW[:4]))    # precision control does not apply
        outs = _oracles.run_all(bytes(code), _regs(rng), 2, bytes(data), unicorn=False)
        want = outs["cpu"]
        for who in ("bt", "bt-cold"):
            got = outs[who]
            w_st, g_st = st_images(want.data), st_images(got.data)
            dist = max(ulps(a, b) for a, b in zip(w_st, g_st))
            # C1 says which way the CPU rounded its own approximation, so it
            # can differ even where the two results agree: not compared
            c1 = 0x200
            g = bytearray(got.data)
            struct.pack_into("<H", g, FX_OUT + 2, (fsw(got.data) & ~c1) | (fsw(want.data) & c1))
            struct.pack_into("<H", g, ENV_OUT + 4, (fsw(got.data) & ~c1) | (fsw(want.data) & c1))
            for i in range(8):
                g[FX_OUT + 32 + 16 * i:FX_OUT + 42 + 16 * i] = want.data[FX_OUT + 32 + 16 * i:FX_OUT + 42 + 16 * i]
            got.data = bytes(g)
            d = differences(want, got, _untracked(), who)
            if dist > 1:
                d.append(f"result {dist} ulps off: {who}={[hex(v) for v in g_st[:2]]} cpu={[hex(v) for v in w_st[:2]]}")
            if d:
                failures.append(f"{op} of {[hex(int.from_bytes(data[ST_IN + 16 * i:ST_IN + 16 * i + 10], 'little')) for i in range(nargs)]}"
                                f" cw={struct.unpack_from('<H', data, CW_IN)[0]:#x}: " + "; ".join(d))
            if who == "bt":
                total += 1
                exact += dist == 0
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:8])
    assert exact >= MIN_EXACT * total, f"{op}: only {exact}/{total} results bit-exact"
