"""A pool of short 64-bit instruction snippets for differential testing,
assembled once; rbp points at the data page, rsp at the stack."""

from __future__ import annotations

import random

import iced_x86 as X

REGS = {8: ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"],
        4: ["eax", "ebx", "ecx", "edx", "esi", "edi", "r8d", "r9d", "r10d", "r11d"],
        2: ["ax", "bx", "cx", "dx", "si", "di", "r8w", "r9w", "r10w", "r11w"],
        1: ["al", "bl", "cl", "dl", "sil", "dil", "r8b", "r9b"]}
LEGACY8 = ["al", "bl", "cl", "dl", "ah", "bh", "ch", "dh"]
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
IMMS = [0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, -1, -2, -0x80, 0x1234]
CC = ["o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g"]


def _imm(rng, size):
    v = rng.choice(IMMS + [rng.getrandbits(8 * min(size, 4))])
    lim = 1 << (8 * min(size, 4) - 1)
    if size == 1:
        return v & 0xFF if v >= 0 else max(v, -128)
    return v if -lim <= v < lim else v & (lim - 1)


def _reg(rng, size, no_high=False):
    regs = REGS[size]
    if no_high and size == 1:
        regs = regs[:8]
    return rng.choice(regs)


def _mem(rng, size):
    return f"{PTR[size]} ptr [rbp + {rng.randrange(0, 0x100) * 8 + rng.randrange(8)}]"


def snippet(rng: random.Random) -> str:
    size = rng.choice([1, 2, 4, 8])
    r = lambda: _reg(rng, size)  # noqa: E731
    kind = rng.randrange(18)
    if kind == 17:
        op = rng.choice(["add", "sub", "xor", "cmp", "mov", "xchg", "adc"])
        return f"{op} {rng.choice(LEGACY8)}, {rng.choice(LEGACY8)}"
    if kind <= 3:
        op = rng.choice(["add", "adc", "sub", "sbb", "and", "or", "xor", "cmp", "test"])
        form = rng.randrange(4)
        if form == 0:
            return f"{op} {r()}, {r()}"
        if form == 1:
            return f"{op} {r()}, {_imm(rng, size)}"
        if form == 2 and op != "test":
            return f"{op} {_reg(rng, size, True)}, {_mem(rng, size)}"
        return f"{op} {_mem(rng, size)}, {_reg(rng, size, True)}"
    if kind == 4:
        op = rng.choice(["inc", "dec", "neg", "not"])
        return f"{op} {r() if rng.random() < 0.7 else _mem(rng, size)}"
    if kind == 5:
        op = rng.choice(["shl", "shr", "sar", "rol", "ror", "rcl", "rcr"])
        cnt = rng.choice(["1", "cl", str(rng.randrange(0, 70) & 0xFF)])
        return f"{op} {_reg(rng, size, True) if cnt != 'cl' else _reg(rng, size, True).replace('cl', 'al')}, {cnt}"
    if kind == 6:
        if size == 1:
            size = 4
        op = rng.choice(["shld", "shrd"])
        return f"{op} {_reg(rng, size)}, {_reg(rng, size)}, {rng.randrange(0, size * 8)}"
    if kind == 7:
        op = rng.choice(["mul", "imul", "div", "idiv"])
        return f"{op} {_reg(rng, size, True) if rng.random() < 0.7 else _mem(rng, size)}"
    if kind == 8:
        if size == 1:
            size = 4
        if rng.random() < 0.5:
            return f"imul {_reg(rng, size)}, {_reg(rng, size)}"
        return f"imul {_reg(rng, size)}, {_reg(rng, size)}, {_imm(rng, min(size, 4))}"
    if kind == 9:
        if size == 1:
            size = 4
        op = rng.choice(["bt", "bts", "btr", "btc"])
        if rng.random() < 0.5:
            return f"{op} {_reg(rng, size)}, {rng.randrange(0, 256)}"
        return f"{op} {_reg(rng, size)}, {_reg(rng, size)}"
    if kind == 10:
        if size == 1:
            size = 4
        op = rng.choice(["bsf", "bsr", "tzcnt", "lzcnt", "popcnt"])
        return f"{op} {_reg(rng, size)}, {_reg(rng, size)}"
    if kind == 11:
        c = rng.choice(CC)
        if rng.random() < 0.5:
            return f"set{c} {_reg(rng, 1)}"
        s2 = rng.choice([2, 4, 8])
        return f"cmov{c} {_reg(rng, s2)}, {_reg(rng, s2)}"
    if kind == 12:
        op = rng.choice(["movzx", "movsx"])
        s1 = rng.choice([1, 2])
        s0 = rng.choice([s for s in (2, 4, 8) if s > s1])
        return f"{op} {_reg(rng, s0)}, {_reg(rng, s1, True)}" if rng.random() < .6 else f"{op} {_reg(rng, s0)}, {_mem(rng, s1)}"
    if kind == 13:
        return rng.choice(["cbw", "cwde", "cdqe", "cwd", "cdq", "cqo", "lahf", "sahf", "clc", "stc",
                           "cmc", f"movsxd {_reg(rng, 8)}, {_reg(rng, 4)}", f"bswap {_reg(rng, rng.choice([4, 8]))}",
                           f"lea {_reg(rng, rng.choice([2, 4, 8]))}, [{_reg(rng, 8)} + {_reg(rng, 8)}*{rng.choice([1, 2, 4, 8])} + {rng.randrange(-200, 200)}]"])
    if kind == 14:
        op = rng.choice(["xchg", "xadd", "cmpxchg"])
        if rng.random() < 0.5:
            return f"{op} {_reg(rng, size, True)}, {_reg(rng, size, True)}"
        return f"{op} {_mem(rng, size)}, {_reg(rng, size, True)}"
    if kind == 15:
        c = rng.choice(CC)
        return f"j{c} 1f\n inc {r()}\n1:"
    # string ops with a small count
    op = rng.choice(["movs", "stos", "lods", "cmps", "scas"])
    sfx = {1: "b", 2: "w", 4: "d", 8: "q"}[size]
    rep = rng.choice(["", "rep " if op in ("movs", "stos", "lods") else rng.choice(["repe ", "repne "])])
    df = rng.choice(["cld", "std"])
    return (f"lea rsi, [rbp + {rng.randrange(64, 1024)}]\n lea rdi, [rbp + {rng.randrange(1024, 2048)}]\n"
            f" mov ecx, {rng.randrange(0, 6)}\n {df}\n {rep}{op}{sfx}\n cld")


def build(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [snippet(rng) for _ in range(n)]


_ARITH = (X.RflagsBits.OF | X.RflagsBits.SF | X.RflagsBits.ZF | X.RflagsBits.AF
          | X.RflagsBits.CF | X.RflagsBits.PF)
_TO_X86 = {X.RflagsBits.OF: 0x800, X.RflagsBits.SF: 0x80, X.RflagsBits.ZF: 0x40,
           X.RflagsBits.AF: 0x10, X.RflagsBits.CF: 0x1, X.RflagsBits.PF: 0x4}


_M = X.Mnemonic
_SHIFTS = {_M.SHL, _M.SAL, _M.SHR, _M.SAR, _M.ROL, _M.ROR, _M.RCL, _M.RCR, _M.SHLD, _M.SHRD}


def _x86(bits: int) -> int:
    return sum(v for k, v in _TO_X86.items() if bits & k)


def flag_info(code: bytes) -> tuple[int, bool]:
    """(x86 mask of flags left undefined at the end, whether an undefined
    flag is read on the way)."""
    undef = 0
    bad = False
    branched = False  # later writes may be jumped over
    for ins in X.Decoder(64, code):
        if ins.rflags_read & undef:
            bad = True
        written = 0 if branched else ins.rflags_modified & _ARITH
        if ins.mnemonic in _SHIFTS:
            last = ins.op_count - 1
            if ins.op_kind(last) == X.OpKind.REGISTER or ins.immediate(last) & 0x1F == 0:
                written = 0  # a zero count keeps the flags as they were
        if ins.is_string_instruction and (ins.has_rep_prefix or ins.has_repe_prefix or ins.has_repne_prefix):
            written = 0      # RCX may be 0: the instruction runs no iteration, the flags stay
        undef = (undef & ~written) | (ins.rflags_undefined & _ARITH)
        if ins.flow_control != X.FlowControl.NEXT:
            branched = True
    return _x86(undef), bad
