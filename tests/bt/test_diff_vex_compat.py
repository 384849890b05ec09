"""VEX in compatibility mode: bt against the real CPU (issue 14, part 6).

A 32-bit code segment under long mode decodes VEX differently from 64-bit
code: 0xC4/0xC5 are VEX only when ModRM.mod would be 11 (else they are LES
and LDS), only eight vector and general registers exist (VEX.R, X and B
cannot reach r8-r15), and VEX.W1 does not make vmovd, vpextrd/vpinsrd,
vcvtsi2ss/sd, vcvt(t)ss2si or the BMI forms 64-bit.  The reference is the
host CPU running the same bytes natively in Linux's 32-bit user code segment
(native_compat.py): KvmOracle cannot be it here, since kvm_pvm emulates its
guests' 32-bit user code and answers every VEX form there with #UD.

Each sequence loads MXCSR and YMM0-7 from the data page, runs one
instruction and stores YMM0-7 and MXCSR back; GPRs (low 32 bits),
arithmetic flags and DF, the whole data page and MXCSR are compared (MXCSR's
exception flags only where bt computes them, as in test_diff_avx).  Both
translator paths (compiled, cold) run.  Fixed cases hand-encode what an
assembler never emits: VEX.W1 where 32-bit mode ignores it, inverted
VEX.B/vvvv[3] bits, LDS/LES, and a VEX with an invalid opcode map (#UD).

PYVMM_BT_VEX32_EXAMPLES sets the random sequences per group (default 40)."""

from __future__ import annotations

import functools
import os
import random
import shutil
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness
import iced_x86 as X
import native_compat
import pool

if shutil.which("as") is None:
    pytest.fail("GNU as is not installed (scripts/setup.sh installs binutils)", pytrace=False)

EXAMPLES = int(os.environ.get("PYVMM_BT_VEX32_EXAMPLES", "40"))
SEED = 3232
YIN, YOUT, MXIN, MXOUT, GIDX = 0x400, 0x500, 0x600, 0x604, 0x700
ARITH_DF = harness.ARITH | 0x400
MXCSR_FLAGS = 0x3F
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword", 16: "xmmword", 32: "ymmword"}
GPR32 = ["eax", "ebx", "ecx", "edx", "esi", "edi"]
ALIGNED = ("vmovaps", "vmovdqa")

PROLOGUE = f"ldmxcsr dword ptr [ebp + {MXIN}]\n" + "".join(
    f"vmovdqu ymm{i}, ymmword ptr [ebp + {YIN + 32 * i}]\n" for i in range(8))
EPILOGUE = "".join(f"vmovdqu ymmword ptr [ebp + {YOUT + 32 * i}], ymm{i}\n" for i in range(8)) + \
    f"stmxcsr dword ptr [ebp + {MXOUT}]\n"

# "mnemonic spec,spec,..." as in test_diff_avx: V vector of the width (b: .128
# and .256, x: 128 only, y: 256 only), X xmm, Y ymm, Vm/Xm vector or memory,
# Hm half width, M memory of the width, mN / xN memory of N bytes (or xmm),
# r4 GPR, rm4 GPR or memory, i imm8, k rounding imm (0-15), p predicate.
GROUPS = {
    "fp": """
b vaddps V,V,Vm; vmulpd V,V,Vm; vdivps V,V,Vm; vsqrtpd V,Vm; vminps V,V,Vm; vhaddps V,V,Vm; vaddsubpd V,V,Vm
b vcmpps V,V,Vm,p; vshufps V,V,Vm,i; vblendvps V,V,Vm,V; vroundps V,Vm,k; vcvtps2dq V,Vm; vcvtdq2pd V,Hm
b vmovmskps r4,V; vandnps V,V,Vm; vunpckhpd V,V,Vm; vmovshdup V,Vm
x vaddss X,X,x4; vsubsd X,X,x8; vsqrtss X,X,x4; vcvtsi2ss X,X,rm4; vcvtsi2sd X,X,rm4; vcvttsd2si r4,x8
x vcvtss2si r4,x4; vcomiss X,x4; vucomisd X,x8; vinsertps X,X,x4,i; vextractps rm4,X,i; vdpps X,X,Xm,i
""",
    "move": """
b vmovups V,Vm; vmovups M,V; vmovaps V,M; vbroadcastss V,m4; vpermilps V,V,Vm; vpermilpd V,Vm,i
b vmaskmovps V,V,M; vmaskmovpd M,V,V; vtestps V,Vm; vptest V,Vm
y vbroadcastsd Y,m8; vinsertf128 Y,Y,Xm,i; vextractf128 Xm,Y,i; vperm2f128 Y,Y,Vm,i; vbroadcastf128 Y,m16
x vmovd X,rm4; vmovd rm4,X; vmovq X,x8; vmovq m8,X; vpextrd rm4,X,i; vpinsrd X,X,rm4,i; vpextrb r4,X,i; vpextrw r4,X,i
x vpinsrw X,X,r4,i; vpinsrb X,X,r4,i; vmovlps X,X,m8; vmovhpd m8,X; vmovss X,X,X; vmovsd X,m8
""",
    "avx2": """
b vpaddd V,V,Vm; vpsubq V,V,Vm; vpmulld V,V,Vm; vpmuludq V,V,Vm; vpshufb V,V,Vm; vpsadbw V,V,Vm; vpavgw V,V,Vm
b vpcmpgtq V,V,Vm; vpminub V,V,Vm; vpmaxsd V,V,Vm; vpabsw V,Vm; vpsignb V,V,Vm; vpalignr V,V,Vm,i
b vpsllvd V,V,Vm; vpsravd V,V,Vm; vpsrlvq V,V,Vm; vpsllw V,V,X; vpsrad V,V,i; vpslldq V,V,i
b vpbroadcastb V,x1; vpbroadcastq V,x8; vpmaskmovd V,V,M; vpmaskmovq M,V,V; vpblendd V,V,Vm,i
b vpunpckhbw V,V,Vm; vpackusdw V,V,Vm; vpmovzxbd V,x8; vpmovsxwq V,x8; vpmovmskb r4,V; vpshufd V,Vm,i
y vpermd Y,Y,Vm; vpermq Y,Vm,i; vpermpd Y,Vm,i; vperm2i128 Y,Y,Vm,i; vinserti128 Y,Y,Xm,i
y vextracti128 Xm,Y,i; vbroadcasti128 Y,m16
""",
    "fma": """
b vfmadd132ps V,V,Vm; vfmsub231pd V,V,Vm; vfnmadd213ps V,V,Vm; vfnmsub132pd V,V,Vm; vfmaddsub231ps V,V,Vm
x vfmadd213ss X,X,x4; vfmsub132sd X,X,x8
b vcvtph2ps V,Hm; vcvtps2ph Hm,V,k
""",
    "bmi": """
x andn r4,r4,rm4; bextr r4,rm4,r4; bzhi r4,rm4,r4; pdep r4,r4,rm4; pext r4,r4,rm4; rorx r4,rm4,i
x sarx r4,rm4,r4; shlx r4,rm4,r4; shrx r4,rm4,r4; mulx r4,r4,rm4; blsi r4,rm4; blsmsk r4,rm4; blsr r4,rm4
""",
}
FULL_MXCSR = {"avx2", "move", "fma", "bmi"}


def _mem(rng: random.Random, size: int, mnemonic: str) -> str:
    off = rng.randrange(0, YIN - 32, 32 if mnemonic in ALIGNED else 1)
    return f"{PTR[size]} ptr [ebp + {off}]"


def _operand(rng: random.Random, spec: str, width: int, mnemonic: str) -> str:
    vec = "ymm" if width == 32 else "xmm"
    reg = lambda kind: f"{kind}{rng.randrange(8)}"
    if spec in ("V", "X", "Y"):
        return reg({"V": vec, "X": "xmm", "Y": "ymm"}[spec])
    if spec == "M":
        return _mem(rng, width, mnemonic)
    if spec in ("Vm", "Xm", "Hm"):
        size = {"Vm": width, "Xm": 16, "Hm": width // 2}[spec]
        return _mem(rng, size, mnemonic) if rng.random() < 0.35 else reg(vec if spec == "Vm" else "xmm")
    if spec[0] in "mx":
        n = int(spec[1:])
        return _mem(rng, n, mnemonic) if spec[0] == "m" or rng.random() < 0.35 else reg("xmm")
    if spec == "r4":
        return rng.choice(GPR32)
    if spec == "rm4":
        return _mem(rng, 4, mnemonic) if rng.random() < 0.35 else rng.choice(GPR32)
    return str(rng.randrange({"i": 256, "k": 16, "p": 32}[spec]))


def build(group: str, n: int) -> list[str]:
    rng = random.Random(f"{group}:{SEED}")
    table = harness.templates(GROUPS[group])
    out = []
    for i in range(n):
        widths, name, specs = table[i % len(table)]
        width = {"x": 16, "y": 32, "b": rng.choice((16, 32))}[widths]
        out.append(f"{name} " + ", ".join(_operand(rng, s, width, name) for s in specs.split(",")))
    return out


def _lane(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return struct.pack("<ff", rng.uniform(-1e3, 1e3), rng.choice((0.0, -0.0, 1.5, float("inf"), 1e-40)))
    if kind == 1:
        return struct.pack("<d", rng.choice((rng.uniform(-1e6, 1e6), 2.5, -0.0, float("nan"), 1e-310)))
    if kind == 2:
        return struct.pack("<ii", rng.randrange(-300, 300), rng.randrange(-(1 << 31), 1 << 31))
    return rng.getrandbits(64).to_bytes(8, "little")


def inputs(rng: random.Random, group: str) -> tuple[list[int], int, bytes]:
    page = bytearray(b"".join(_lane(rng) for _ in range(0x1000 // 8)))
    mx = rng.choice((0x1F80, 0x1F80, 0x9F80, 0x3F80, 0x5F80, 0x1F80 | 0x40))
    struct.pack_into("<I", page, MXIN, mx)
    regs = [rng.getrandbits(32) for _ in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
    if group == "bmi":      # shift and bit-field counts: small ones too
        for i in (0, 1, 2, 3, 6, 7):
            if rng.random() < 0.5:
                regs[i] = rng.randrange(0x2040)
    rflags = (rng.getrandbits(12) & harness.ARITH) | 2
    return regs, rflags, bytes(page)


def _bt_oracles():
    out = []
    for hot in (harness.COMPILED, harness.COLD):
        o = harness.UserBtOracle(hot)
        o.state.cr4 |= 1 << 18           # OSXSAVE (XCR0 is set per run)
        o.set_code_bits(32)
        out.append(o)
    return out


def _enable_avx(cpu) -> None:
    cpu.xcr0 = 7


def undefined_flags(body: bytes) -> int:
    """The x86 mask of the arithmetic flags the (one-instruction) body leaves undefined."""
    undef = 0
    for ins in X.Decoder(32, body):
        undef |= ins.rflags_undefined & pool._ARITH
    return pool._x86(undef)


def diff(want: harness.Outcome, got: harness.Outcome, full_mxcsr: bool, undef: int = 0) -> str | None:
    out = []
    if want.vector != got.vector:
        return f"vector: bt={got.vector} cpu={want.vector}"
    if want.vector is not None:
        return None
    for i in range(8):
        if (want.regs[i] ^ got.regs[i]) & 0xFFFFFFFF:
            out.append(f"{harness.GPR_NAMES[i]}: bt={got.regs[i]:#x} cpu={want.regs[i]:#x}")
    if (want.rflags ^ got.rflags) & ARITH_DF & ~undef:
        out.append(f"rflags: bt={got.rflags:#x} cpu={want.rflags:#x}")
    mask = 0xFFFF if full_mxcsr else 0xFFFF & ~MXCSR_FLAGS
    (mw,), (mg,) = struct.unpack_from("<I", want.data, MXOUT), struct.unpack_from("<I", got.data, MXOUT)
    if (mw ^ mg) & mask:
        out.append(f"mxcsr: bt={mg:#x} cpu={mw:#x}")
    rest = bytearray(want.data), bytearray(got.data)
    for b in rest:
        b[MXOUT:MXOUT + 4] = bytes(4)
    if rest[0] != rest[1]:
        o = next(i for i in range(len(rest[0])) if rest[0][i] != rest[1][i]) & ~15
        out.append(f"memory +{o:#x}: bt={got.data[o:o + 16].hex()} cpu={want.data[o:o + 16].hex()}")
    return "; ".join(out) or None


def check(cases: list[tuple[str, bytes, bytes, list[int], int, bytes]], full_mxcsr: bool) -> int:
    """Runs every (name, body the CPU runs, body bt runs, regs, rflags, data)
    natively and on both bt paths (the body wrapped in PROLOGUE/EPILOGUE);
    returns how many sequences ran."""
    wants = native_compat.run_cases([(_wrap(cpu), regs, fl, data) for _, cpu, _, regs, fl, data in cases])
    assert len(wants) == len(cases)
    bad, ran = [], 0
    bts = _bt_oracles()
    for (name, _, body, regs, fl, data), want in zip(cases, wants):
        undef = undefined_flags(body)
        for label, o in zip(("bt", "bt-cold"), bts):
            d = diff(want, o.run(_wrap(body), regs, fl, data, setup=_enable_avx), full_mxcsr, undef)
            if d:
                bad.append(f"{label}: {d}\n  {name} ({body.hex()})")
        ran += 1
    assert not bad, f"{len(bad)} differences in {len(cases)} sequences:\n" + "\n".join(bad[:12])
    return ran


def assemble32_many(snippets: list[str]) -> list[bytes]:
    """Assembles 32-bit snippets in one `as` run, each padded to 64 bytes
    with int3 (one instruction each, at most 15 bytes)."""
    blob = harness.assemble("".join(f"{s}\n.balign 64, 0xcc\n" for s in snippets), bits=32)
    out = []
    for i in range(len(snippets)):
        chunk = blob[64 * i:64 * (i + 1)]
        ins = X.Decoder(32, chunk).decode()
        out.append(chunk[:ins.len])
    return out


@functools.cache
def _wrapping() -> tuple[bytes, bytes]:
    return harness.assemble(PROLOGUE, bits=32), harness.assemble(EPILOGUE, bits=32)


def _wrap(body: bytes) -> bytes:
    head, tail = _wrapping()
    return head + body + tail


@pytest.mark.parametrize("group", list(GROUPS))
def test_group_matches_cpu_in_compat_mode(group):
    rng = random.Random(f"in:{group}:{SEED}")
    bodies = build(group, EXAMPLES)
    codes = assemble32_many(bodies)
    cases = [(b, c, c, *inputs(rng, group)) for b, c in zip(bodies, codes)]
    assert check(cases, group in FULL_MXCSR) == EXAMPLES


# -- hand-encoded forms ---------------------------------------------------------------

def _vex3(sources: list[str]) -> list[bytes]:
    """Each source assembled with a three-byte VEX prefix (C4) in 32-bit code."""
    codes = assemble32_many(["{vex3} " + src for src in sources])
    assert all(code[0] == 0xC4 for code in codes), codes
    return codes


def _set(code: bytes, index: int, bit: int, value: int) -> bytes:
    b = bytearray(code)
    b[index] = (b[index] & ~(1 << bit)) | (value << bit)
    return bytes(b)


W1_IGNORED = ["vmovd xmm1, eax", "vmovd xmm2, dword ptr [ebp + 12]", "vmovd ebx, xmm3",
              "vmovd dword ptr [ebp + 20], xmm4", "vpextrd ecx, xmm5, 2", "vpinsrd xmm6, xmm1, edx, 3",
              "vpinsrd xmm0, xmm2, dword ptr [ebp + 8], 1", "vcvtsi2ss xmm1, xmm2, esi",
              "vcvtsi2sd xmm3, xmm4, dword ptr [ebp + 4]", "vcvttss2si edi, xmm5", "vcvtss2si eax, dword ptr [ebp + 16]",
              "andn eax, ebx, ecx", "bextr edx, esi, edi", "pdep eax, ebx, dword ptr [ebp + 24]",
              "pext ecx, edx, esi", "rorx edi, eax, 7", "sarx ebx, ecx, edx", "shlx esi, edi, eax",
              "mulx eax, ebx, ecx", "blsr edx, esi", "bzhi edi, eax, ebx"]
INVERTED_BITS = ["vpaddd ymm0, ymm1, ymm2", "vaddps xmm3, xmm4, xmm5", "vpshufb ymm6, ymm7, ymm1",
                 "vmovdqu ymm2, ymm3", "andn eax, ebx, ecx", "vpermq ymm1, ymm2, 0x1b"]


@functools.lru_cache(maxsize=1)
def _fixed_cases() -> list[tuple[str, bytes, bytes]]:
    """(name, the bytes the CPU runs, the bytes bt runs)."""
    out = []
    for src, w0 in zip(W1_IGNORED, _vex3(W1_IGNORED)):
        # VEX.W1 (byte 2, bit 7) outside 64-bit mode "behaves as if the W0
        # version is used" (SDM, e.g. VPEXTRD): bt's W1 against the CPU's W0.
        out.append((f"{src} (VEX.W1)", w0, _set(w0, 2, 7, 1)))
    for src, code in zip(INVERTED_BITS, _vex3(INVERTED_BITS)):
        b0 = _set(code, 1, 5, 0)                       # B̄ = 0: register +8 in 64-bit code
        out.append((f"{src} (VEX.B clear)", b0, b0))
        if "vmovdqu" not in src and "vpermq" not in src:
            v0 = _set(code, 2, 6, 0)                   # V̄3 = 0
            out.append((f"{src} (vvvv[3] clear)", v0, v0))
    raw = [("lds eax, [ebp + 8] (c5)", "c54508"),     # 0xC4/0xC5 with ModRM.mod != 11: LDS/LES
           ("les ebx, [ebp + 0x10] (c4)", "c45d10"),   # (null selectors: the loads succeed)
           ("les ecx, [esi] (c4, mod 00)", "c40e"),
           ("VEX with opcode map 0 (#UD)", "c4e07c58c1"),
           ("VEX with opcode map 4 (#UD)", "c4e47c58c1"),
           ("VEX after a 66 prefix (#UD)", "66c5f458c2")]
    out.extend((name, bytes.fromhex(h), bytes.fromhex(h)) for name, h in raw)
    return out


def test_hand_encoded_forms_match_cpu():
    rng = random.Random(f"fixed:{SEED}")
    cases = []
    for name, cpu, body in _fixed_cases():
        for _ in range(1 if "#UD" in name else 3):
            regs, rflags, page = inputs(rng, "bmi")
            page = bytearray(page)
            page[12:14] = page[0x14:0x16] = bytes(2)      # the LDS/LES selectors: null
            if "[esi]" in name:
                regs[6] = harness.DATA_ADDR + 0x40
                page[0x44:0x46] = bytes(2)
            cases.append((name, cpu, body, regs, rflags, bytes(page)))
    assert check(cases, True) == len(cases)


# Measured on AMD EPYC (AuthenticAMD, family 0x19): these W1 forms are #UD in
# 32-bit code, where Intel's SDM has W ignored.  bt follows the SDM of the
# GenuineIntel CPU it advertises (the test above).
AMD_W1_UD = ("vpextrd", "vpinsrd")


def test_the_host_cpu_ignores_w1_outside_64_bit_mode_as_its_vendor_does():
    from pyvmm.engines.bt.hostcpu import host_cpuid
    _, b, c, d = host_cpuid(0)
    amd = struct.pack("<3I", b, d, c) == b"AuthenticAMD"
    regs, rflags, page = inputs(random.Random(7), "bmi")
    cases = [(name, cpu, body) for name, cpu, body in _fixed_cases() if name.endswith("(VEX.W1)")]
    runs = native_compat.run_cases([(_wrap(code), regs, rflags, page) for _, cpu, body in cases
                                    for code in (cpu, body)])
    for i, (name, _, _) in enumerate(cases):
        w0, w1 = runs[2 * i], runs[2 * i + 1]
        if amd and name.split()[0] in AMD_W1_UD:    # #UD here; another AMD generation may follow Intel
            assert w1.vector == 6 or diff(w0, w1, True) is None, f"{name}: neither #UD nor the W0 result"
        else:
            assert diff(w0, w1, True) is None, f"{name}: the CPU does not ignore VEX.W1: {diff(w0, w1, True)}"


def test_the_oracle_runs_32_bit_code():
    """The reference really runs compatibility mode: `dec eax` (0x48, REX.W
    in 64-bit code) and a `call`/`pop` pair that pushes 4 bytes."""
    code = harness.assemble("dec eax\n call 1f\n1: pop ecx\n mov edx, esp", bits=32)
    regs = [5, 0, 0, 0, harness.STACK_TOP, harness.DATA_ADDR, 0, 0] + [0] * 8
    (got,) = native_compat.run_cases([(code, regs, 2, bytes(16))])
    assert got.vector is None
    assert got.regs[0] == 4 and got.regs[1] == harness.CODE_ADDR + 6 and got.regs[2] == harness.STACK_TOP
