"""Differential tests of what guests reach beyond plain ALU sequences: the
bt translator (compiled and cold paths, at CPL3 with 4 KiB user pages:
harness.UserBtOracle) against the real CPU (KvmOracle, CPL3 under KVM).

- data accesses (loads, stores, read-modify-writes, push/pop, SSE) that
  cross into a page that is not present, read-only or supervisor-only, or
  fault on their first page: the vector, RIP, error code, CR2, every GPR,
  RFLAGS and both pages (no partial write) must match;
- string instructions, with and without rep/repe/repne, both directions,
  every size, that fault after some iterations: RCX/RSI/RDI at the fault;
- addressing: r12/r13/rsp/rbp as bases and indexes, no base, RIP-relative,
  the 0x67 address-size prefix, fs/gs overrides with bases;
- 32-bit code in compatibility mode at CPL3;
- self-modifying code: a store into the same block, a later block, an
  instruction already run in a loop.

RFLAGS is compared whole except for the flags the instructions leave
undefined and RF, which the CPU sets in the image a fault pushes (the
frame's RFLAGS belongs to fault delivery, tested with the system tests).
Snippets run with IF set: kvm_pvm runs user code with IF=1 whatever the
RFLAGS given (pushfq shows it), and user code cannot change IF."""

from __future__ import annotations

import os
import random
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import iced_x86 as X  # noqa: E402

import harness  # noqa: E402
import pool  # noqa: E402
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

_why = kvm_usable()
if _why is not None:     # the host fact: the oracle is the real CPU through KVM
    pytest.skip(_why, allow_module_level=True)
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")
pytestmark = pytest.mark.kvm

D = harness.DATA_ADDR
PAGE = 0x1000
SPAN = 3 * PAGE                 # the data pages compared: D, D+4K (the one protected), D+8K
HOLE = D + PAGE
RF, IF = 0x10000, 0x200
P, W, U = 1, 2, 4
SECOND_PAGE = {"not-present": 0, "read-only": P | U, "supervisor": P | W}
SEED = random.randrange(1 << 30) if os.environ.get("PYVMM_BT_RANDOM") == "1" else 1414

_kvm = KvmOracle()
_bts = {"compiled": harness.UserBtOracle(harness.COMPILED), "cold": harness.UserBtOracle(harness.COLD)}


def undefined_flags(code: bytes, bits: int = 64) -> int:
    """The x86 mask of arithmetic flags `code` leaves undefined at its end;
    fails the test when an instruction reads one (the snippets here are
    written so none does)."""
    undef = 0
    for ins in X.Decoder(bits, code):
        assert not ins.rflags_read & undef, f"snippet reads an undefined flag at {ins}"
        written = ins.rflags_modified & pool._ARITH
        if ins.mnemonic in pool._SHIFTS:
            last = ins.op_count - 1
            if ins.op_kind(last) == X.OpKind.REGISTER or ins.immediate(last) & 0x1F == 0:
                written = 0
        undef = (undef & ~written) | (ins.rflags_undefined & pool._ARITH)
    return pool._x86(undef)


def run_both(code: bytes, regs: list[int], rflags: int, data: bytes, *, pages: dict[int, int] | None = None,
             bits: int = 64, fs: int = 0, gs: int = 0) -> str | None:
    """Runs `code` on the CPU and on both bt paths from the same state;
    returns what differs (None when everything agrees)."""
    _kvm.reset_pages()
    _kvm.set_code_bits(bits)
    _kvm.sregs.fs.base, _kvm.sregs.gs.base = fs, gs
    for la, flags in (pages or {}).items():
        _kvm.set_page(la, flags)
    rflags |= IF
    want = _kvm.run(code, regs, rflags, data)
    undef = 0
    start = harness.CODE_ADDR - (harness.CODE16_BASES[0] if bits == 16 else 0)   # RIP is CS-relative
    if want.vector is None or 0 <= want.rip - start <= len(code):
        # at a fault, the flags are those the instructions before it left
        upto = len(code) if want.vector is None else want.rip - start
        undef = undefined_flags(code[:upto], bits)
    for path, bt in _bts.items():
        bt.reset_pages()
        bt.set_code_bits(bits)
        bt.state.fs.base, bt.state.gs.base = fs, gs
        for la, flags in (pages or {}).items():
            bt.set_page(la, flags)
        d = compare(want, bt.run(code, regs, rflags, data), undef)
        if d is not None:
            return f"{path}: {d}"
    return None


def compare(want: harness.Outcome, got: harness.Outcome, undef: int) -> str | None:
    out = []
    for what in ("vector", "rip", "error_code", "cr2"):
        a, b = getattr(want, what), getattr(got, what)
        if a != b:
            out.append(f"{what}: bt={b if b is None else hex(b)} cpu={a if a is None else hex(a)}")
    for i, (x, y) in enumerate(zip(want.regs, got.regs)):
        if x != y:
            out.append(f"{harness.GPR_NAMES[i]}: bt={y:#x} cpu={x:#x}")
    mask = ~(undef | RF) & 0xFFFFFFFF
    if (got.rflags ^ want.rflags) & mask:
        out.append(f"rflags: bt={got.rflags & mask:#x} cpu={want.rflags & mask:#x}")
    if got.data != want.data:
        offs = [i for i in range(len(want.data)) if want.data[i] != got.data[i]]
        out.append(f"memory differs at {len(offs)} bytes from {D + offs[0]:#x}: "
                   f"bt={got.data[offs[0]:offs[0] + 8].hex()} cpu={want.data[offs[0]:offs[0] + 8].hex()}")
    return "; ".join(out) or None


def state(rng: random.Random, **named: int) -> list[int]:
    """Random GPRs with rsp at the stack and rbp at the data page, then `named`."""
    regs = [rng.getrandbits(64) for _ in range(16)]
    regs[4], regs[5] = harness.STACK_TOP, D
    for name, value in named.items():
        regs[harness.GPR_NAMES.index(name)] = value
    return regs


def page_data(rng: random.Random) -> bytes:
    return rng.randbytes(SPAN)


def check_all(cases) -> None:
    """Runs (label, code, regs, rflags, data, kwargs) cases; fails listing
    every mismatch, and when none ran."""
    bad, ran = [], 0
    for label, code, regs, rflags, data, kw in cases:
        d = run_both(code, regs, rflags, data, **kw)
        ran += 1
        if d is not None:
            bad.append(f"{label}: {d}")
    assert ran, "no case ran"
    assert not bad, f"{len(bad)} of {ran} differ:\n" + "\n".join(bad[:25])


# ---------------------------------------------------------------- page crossing
SIZE_REG = {1: "bl", 2: "bx", 4: "ebx", 8: "rbx"}
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword", 16: "xmmword"}
# {m}: the memory operand, {r}: a register of its size, {s}: the ptr size.
ACCESSES = {
    "load": ["mov {r}, {s} ptr {m}", "add {r}, {s} ptr {m}", "cmp {s} ptr {m}, {r}", "movzx eax, {s} ptr {m}:12"],
    "store": ["mov {s} ptr {m}, {r}", "mov {s} ptr {m}, 0x5a"],
    "rmw": ["add {s} ptr {m}, {r}", "inc {s} ptr {m}", "neg {s} ptr {m}", "xchg {s} ptr {m}, {r}",
            "lock xadd {s} ptr {m}, {r}", "cmpxchg {s} ptr {m}, {r}", "shr {s} ptr {m}, 1", "not {s} ptr {m}"],
    "bit": ["bts {s} ptr {m}, 3:248", "btc {s} ptr {m}, 9:248"],
    "stack": ["push {s} ptr {m}:6", "pop {s} ptr {m}:6"],
    "sse": ["movdqu xmm1, xmmword ptr {m}\nmovq rdx, xmm1:16", "movq xmm1, rbx\nmovdqu xmmword ptr {m}, xmm1:16",
            "movq xmm1, rbx\npaddb xmm1, xmmword ptr {m}\nmovq rdx, xmm1:16x"],
}


def _access_cases(kind: str, page: str) -> list:
    rng = random.Random(f"{SEED}-{kind}-{page}")
    cases = []
    for template in ACCESSES[kind]:
        text, _, sizes = template.partition(":")
        if sizes == "12":
            size_list = [1, 2]
        elif sizes == "248":
            size_list = [2, 4, 8]
        elif sizes == "6":
            size_list = [2, 8]
        elif sizes.startswith("16"):
            size_list = [16]
        else:
            size_list = [1, 2, 4, 8]
        for size in size_list:
            # every split across the boundary, then accesses that end just
            # before it and start on the protected page
            for first in list(range(1, size)) + [size, 0]:
                off = PAGE - first
                if sizes == "16x" and off % 16:
                    continue  # a legacy-SSE memory operand must be aligned
                src = text.format(r=SIZE_REG.get(size, ""), s=PTR[size], m=f"[rbp + {off}]")
                code = harness.assemble(f"mov rax, 7\n{src}\nmov rcx, 9")
                regs = state(rng)
                flags = (rng.getrandbits(12) & harness.ARITH) | 2
                cases.append((f"{src} ({page})", code, regs, flags, page_data(rng),
                              dict(pages={HOLE: SECOND_PAGE[page]})))
    return cases


@pytest.mark.parametrize("page", list(SECOND_PAGE))
@pytest.mark.parametrize("kind", list(ACCESSES))
def test_access_across_a_page(kind, page):
    """A load, store or read-modify-write whose bytes reach the protected
    page: #PF with CR2 at its first byte, or at the access on that page,
    and memory on the first page untouched."""
    check_all(_access_cases(kind, page))


@pytest.mark.parametrize("page", list(SECOND_PAGE))
def test_stack_across_a_page(page):
    """push/pop/call/ret with RSP straddling the protected page."""
    rng = random.Random(f"{SEED}-stack-{page}")
    cases = []
    for src in ["push rbx", "push bx", "pop rbx", "pop bx", "push 0x1234", "call 1f\n1: nop", "ret",
                "enter 16, 0", "leave", "pushfq"]:
        for rsp in [HOLE + PAGE + 4, HOLE + PAGE + 2, HOLE + PAGE, HOLE + PAGE + 8, HOLE - 4, HOLE - 2, HOLE - 8,
                    HOLE, HOLE - 1]:
            code = harness.assemble(src)
            regs = state(rng, rsp=rsp, rbp=(rsp - 8) if src == "leave" else D)
            flags = (rng.getrandbits(12) & harness.ARITH) | 2
            cases.append((f"{src} rsp={rsp:#x} ({page})", code, regs, flags, page_data(rng),
                          dict(pages={HOLE: SECOND_PAGE[page]})))
    check_all(cases)


def test_branch_to_a_non_canonical_address():
    """A near jmp/call/ret to a non-canonical address raises #GP at the
    branch with nothing changed (RSP, the stack); a canonical one that is
    not mapped faults at the target."""
    rng = random.Random(f"{SEED}-canon")
    cases = []
    # (No canonical upper-half target: kvm_pvm keeps that half for the guest
    # kernel and reports a user fetch there with RSVD set.)
    for target in (0x800000000000, 0xFFFF7FFFFFFFFFFF, 0x7FFFFFFFF000, 0x123456789ABCDEF0):
        for src in ("jmp rbx", "call rbx", "jmp qword ptr [rbp + 8]", "call qword ptr [rbp + 8]",
                    "mov qword ptr [rsp - 8], rbx\n sub rsp, 8\n ret", "push rbx\n ret 16", "push rbx\n ret"):
            data = bytearray(page_data(rng))
            struct.pack_into("<Q", data, 8, target)
            cases.append((f"{src!r} to {target:#x}", harness.assemble(src), state(rng, rbx=target), 2,
                          bytes(data), {}))
    check_all(cases)


def test_fault_on_the_first_page():
    """A crossing access whose first page is the protected one faults there."""
    rng = random.Random(f"{SEED}-first")
    cases = []
    for page, flags in SECOND_PAGE.items():
        for src in ["mov rbx, qword ptr [rbp + {o}]", "mov qword ptr [rbp + {o}], rbx",
                    "add dword ptr [rbp + {o}], ebx",
                    "movq xmm0, rbx\n movdqu xmmword ptr [rbp + {o}], xmm0"]:
            for o in (2 * PAGE - 3, 2 * PAGE - 1):
                code = harness.assemble(src.format(o=o))
                cases.append((f"{src.format(o=o)} ({page})", code, state(rng), 2, page_data(rng),
                              dict(pages={HOLE: flags})))
    check_all(cases)


# ---------------------------------------------------------------- strings
STRING_OPS = {"movs": ["", "rep "], "stos": ["", "rep "], "lods": ["", "rep "],
              "cmps": ["", "repe ", "repne "], "scas": ["", "repe ", "repne "]}


@pytest.mark.parametrize("op", list(STRING_OPS))
def test_string_faults_mid_way(op):
    """A string instruction that reaches the protected page after some
    iterations: RCX, RSI and RDI as the CPU leaves them at the #PF."""
    rng = random.Random(f"{SEED}-str-{op}")
    cases = []
    for rep in STRING_OPS[op]:
        for sfx, size in (("b", 1), ("w", 2), ("d", 4), ("q", 8)):
            for df in (0, 1):
                for which in ("rsi", "rdi"):
                    if (op in ("stos", "scas") and which == "rsi") or (op == "lods" and which == "rdi"):
                        continue
                    page = rng.choice(list(SECOND_PAGE))
                    done = rng.randrange(0, 5)       # iterations before the fault
                    mis = rng.randrange(0, size)     # how far the faulting element reaches in
                    if df == 0:
                        addr = HOLE - done * size - size + mis
                    else:
                        addr = HOLE + PAGE + done * size - mis
                    other = D + 0x100 if df == 0 else D + 2 * PAGE + 0x800
                    regs = state(rng, rcx=done + rng.randrange(1, 4) if rep else 1,
                                 rsi=addr if which == "rsi" else other,
                                 rdi=addr if which == "rdi" else other + 0x40)
                    data = bytearray(page_data(rng))
                    if op in ("cmps", "scas") and rng.random() < 0.6:
                        data = bytearray(SPAN)           # equal elements: repe runs on
                        regs[0] = 0
                    text = f"{'std' if df else 'cld'}\n{rep}{op}{sfx}\ncld"
                    code = harness.assemble(text)
                    cases.append((f"{text!r} {which}={addr:#x} rcx={regs[1]} ({page})", code, regs,
                                  (rng.getrandbits(12) & harness.ARITH) | 2, bytes(data),
                                  dict(pages={HOLE: SECOND_PAGE[page]})))
    check_all(cases)


def test_string_addr32_and_counts():
    """rep forms under the 0x67 prefix (ECX/ESI/EDI, upper halves ignored
    and cleared), and without a fault."""
    rng = random.Random(f"{SEED}-str32")
    cases = []
    for op in ("movs", "stos", "lods", "cmps", "scas"):
        for sfx in "bwdq":
            rep = "rep " if op in ("movs", "stos", "lods") else rng.choice(["repe ", "repne "])
            for df in (0, 1):
                text = f"{'std' if df else 'cld'}\naddr32 {rep}{op}{sfx}\ncld"
                hi = rng.getrandbits(32) << 32
                regs = state(rng, rcx=hi | rng.randrange(0, 9), rsi=hi | (D + 0x400), rdi=hi | (D + 0x900))
                cases.append((text, harness.assemble(text), regs, 2, page_data(rng), {}))
    check_all(cases)


def test_loop_count_register_by_address_size():
    """loop/loope/loopne/jecxz/jrcxz count in ECX under 0x67 in 64-bit mode
    (upper half of RCX junk)."""
    rng = random.Random(f"{SEED}-loop32")
    cases = []
    for src in ("2: inc eax\n addr32 loop 2b", "2: inc eax\n cmp eax, 2\n addr32 loope 2b",
                "2: inc eax\n cmp eax, 3\n addr32 loopne 2b", "jecxz 1f\n inc ebx\n1:", "jrcxz 1f\n inc ebx\n1:",
                "2: inc eax\n loop 2b"):
        for count in ((0, 1, 3, 5) if "cxz" in src else (1, 3, 5)):   # a zero count loops 2^32 or 2^64 times
            high = rng.choice([0, rng.getrandbits(32) << 32]) if "loop 2b" not in src or "addr32" in src else 0
            regs = state(rng, rax=0, rbx=0, rcx=high | count)
            cases.append((f"{src!r} rcx={high | count:#x}", harness.assemble(src), regs, 2, page_data(rng), {}))
    check_all(cases)


# ---------------------------------------------------------------- addressing
BASES = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
INDEXES = [r for r in BASES if r != "rsp"]


def _addressing_case(rng: random.Random):
    """A load or store through a random ModRM/SIB form whose address lands on
    the data pages: every base (rsp, rbp, r12, r13 included), index and
    scale, disp 0/8/32, and a 0x67 form whose upper register halves are junk."""
    base = rng.choice(BASES + [None])
    index = rng.choice(INDEXES + [None, None])
    scale = rng.choice([1, 2, 4, 8])
    disp = rng.choice([0, rng.randrange(-128, 128), rng.randrange(-0x800, 0x800)])
    addr32 = rng.random() < 0.25
    target = D + 0x800 + rng.randrange(-0x400, 0x400)
    regs = state(rng)
    if rng.random() < 0.5 and base in (None, "rsp"):   # a store through rsp would move the stack off
        base = "rbp"
    parts = []
    value = 0
    if index is not None:
        iv = rng.randrange(0, 0x40)
        regs[harness.GPR_NAMES.index(index)] = (rng.getrandbits(32) << 32 | iv) if addr32 else iv
        value += iv * scale
        parts.append(f"{index if not addr32 else _r32(index)}*{scale}")
    if base is not None:
        bv = (target - value - disp) & 0xFFFFFFFF
        junk = rng.getrandbits(32) << 32 if addr32 and base != "rsp" else 0   # rsp stays a stack address
        regs[harness.GPR_NAMES.index(base)] = junk | bv
        if base == index:
            # one register as both: solve base*(1+scale) for an address on the page
            v = (target - disp) // (1 + scale)
            regs[harness.GPR_NAMES.index(base)] = v
            if addr32 and base != "rsp":
                regs[harness.GPR_NAMES.index(base)] |= rng.getrandbits(32) << 32
            parts = [f"{_r32(base) if addr32 else base}", f"{_r32(base) if addr32 else base}*{scale}"]
        else:
            parts.insert(0, _r32(base) if addr32 else base)
    else:
        disp = target - value
    mem = "[" + " + ".join(parts + [str(disp)]) + "]"
    size = rng.choice([1, 2, 4, 8])
    reg = {1: "dl", 2: "dx", 4: "edx", 8: "rdx"}[size] if "rdx" not in (base, index) else \
        {1: "r14b", 2: "r14w", 4: "r14d", 8: "r14"}[size]
    if "r14" in (base, index) and reg.startswith("r14"):
        reg = {1: "r15b", 2: "r15w", 4: "r15d", 8: "r15"}[size]
    form = rng.randrange(4)
    prefix = "addr32 " if addr32 and base is None and index is None else ""
    src = [f"mov {reg}, {PTR[size]} ptr {mem}", f"mov {PTR[size]} ptr {mem}, {reg}",
           f"add {PTR[size]} ptr {mem}, {reg}", f"lea {reg if size > 1 else 'rdx'}, {mem}"][form]
    if form == 3 and size == 1:
        src = f"lea rdx, {mem}"
    return prefix + src, regs


def _r32(reg: str) -> str:
    return {"rax": "eax", "rbx": "ebx", "rcx": "ecx", "rdx": "edx", "rsi": "esi", "rdi": "edi",
            "rsp": "esp", "rbp": "ebp"}.get(reg, reg + "d")


def _addressing_cases() -> list:
    rng = random.Random(f"{SEED}-addr")
    cases = []
    for _ in range(400):
        src, regs = _addressing_case(rng)
        cases.append((src, harness.assemble(src), regs, 2, page_data(rng), {}))
    return cases


def test_addressing_forms():
    """Random ModRM/SIB forms, with and without 0x67."""
    check_all(_addressing_cases())


def test_rip_relative():
    """RIP-relative loads, stores and lea, to the data page and to code."""
    rng = random.Random(f"{SEED}-rip")
    cases = []
    for template in ["mov {r}, {s} ptr [rip + {d}]", "mov {s} ptr [rip + {d}], {r}", "add {s} ptr [rip + {d}], 5",
                     "lea rax, [rip + {d}]", "cmp {s} ptr [rip + {d}], 0x11", "movdqu xmm0, xmmword ptr [rip + {d}]\n"
                     "movdqu xmmword ptr [rbp + 0x40], xmm0"]:
        for size in (1, 2, 4, 8):
            for target in (D + rng.randrange(0, 0x1000), D + 2 * PAGE - rng.randrange(1, 8),
                           harness.CODE_ADDR + rng.randrange(0, 4)):
                if target < D and "ptr [rip + {d}], " in template:
                    continue     # stores into code: test_self_modifying_code
                fmt = dict(r=SIZE_REG[size], s=PTR[size])
                probe = harness.assemble(template.format(d=0, **fmt))
                first = next(iter(X.Decoder(64, probe)))
                src = template.format(d=target - (harness.CODE_ADDR + first.len), **fmt)
                # nops after it: a read of code never reaches the oracles' different end markers
                cases.append((src, harness.assemble(src + "\n.fill 24, 1, 0x90"), state(rng), 2, page_data(rng), {}))
    check_all(cases)


SEG_PREFIX = {"es": "0x26", "cs": "0x2e", "ss": "0x36", "ds": "0x3e", "fs": "0x64", "gs": "0x65"}


def test_segment_overrides():
    """fs/gs overrides add their bases (also under 0x67, where the 32-bit
    offset wraps before the base is added); es/ds/ss/cs overrides do not."""
    rng = random.Random(f"{SEED}-seg")
    cases = []
    for seg in ("fs", "gs", "es", "ds", "ss", "cs"):
        for form in ("mov rax, qword ptr {seg}:[rbx + 8]", "mov dword ptr {seg}:[rbx + rcx*4], esi",
                     "add word ptr {seg}:[ebx + 0x10], si", ".byte {pfx}\n lodsq", ".byte {pfx}\n lea rax, [rbx + 8]",
                     "mov eax, dword ptr {seg}:[0x100]"):
            base = D + rng.randrange(0, 0x800)
            src = form.format(seg=seg, pfx=SEG_PREFIX[seg])
            off = rng.randrange(0, 0x100)
            if seg in ("fs", "gs"):
                rbx, rsi = off, off
                if "ebx" in form:
                    rbx = rng.getrandbits(32) << 32 | off
                if "0x100" in form:
                    base = D + rng.randrange(0, 0x800)
            else:
                rbx, rsi = base + off, base + off
            regs = state(rng, rbx=rbx, rcx=rng.randrange(0, 0x20), rsi=rsi)
            kw = dict(fs=base) if seg == "fs" else dict(gs=base) if seg == "gs" else {}
            if "0x100" in form and seg not in ("fs", "gs"):
                continue   # an absolute 0x100 without a base is the supervisor page: no data
            cases.append((f"{src} base={base:#x}", harness.assemble(src), regs, 2, page_data(rng), kw))
    check_all(cases)


# ---------------------------------------------------------------- compatibility mode
COMPAT32 = [
    "mov eax, ebx\n add eax, ecx\n adc edx, eax\n sbb esi, 0x1234",
    "push eax\n push ebx\n pop ecx\n pop edx",
    "push 0x12345678\n pop eax\n push word ptr [ebp + 8]\n pop word ptr [ebp + 16]",
    "dec eax\n inc ebx\n dec ecx",                   # 0x48/0x40: REX in 64-bit mode
    "mov dword ptr [ebp + 4], ebx\n add dword ptr [ebp + 4], ecx\n mov edx, dword ptr [ebp + 4]",
    "lea eax, [ebx + ecx*4 + 0x100]\n lea si, [bx + 3]",
    "call 1f\n1: pop eax\n sub eax, 0x200000",
    "mov esi, ebp\n lea edi, [ebp + 0x200]\n mov ecx, 9\n rep movsb",
    "mov edi, ebp\n mov ecx, 5\n std\n rep stosd\n cld",
    "movzx eax, byte ptr [ebp + 3]\n movsx ebx, word ptr [ebp + 6]\n cdq\n cwde",
    "mov eax, 0x80000000\n mov ecx, 3\n shl eax, 1\n rcr ecx, 1\n setc dl\n setz dh",
    "mov eax, ebx\n mul ecx\n imul esi, edx, 77",
    "pushfd\n pop eax\n and eax, 0xcd5",
    "pushad\n mov eax, 1\n popad",
    "xchg eax, ebx\n bswap ecx\n xadd edx, esi",
    "mov ax, 0x1234\n mov bl, 0x56\n mov byte ptr [ebp], bl\n movzx ecx, word ptr [ebp]",
    "mov eax, 3\n mov ecx, 4\n2: add eax, ecx\n loop 2b",
    "mov eax, dword ptr [ebp + 0xffe]",             # crosses into the protected page
    "mov dword ptr [ebp + 0xffd], eax",             # (second page mapped: see SPLIT_STORE)
    "push dword ptr [ebp + 0xffc]",
    "addr16 mov eax, dword ptr [bx + si]",           # 16-bit addressing: below 64 KiB, the supervisor page
    "mov ecx, 2\n mov edi, ebp\n add edi, 0xffc\n rep stosd",
    "jmp 1f\n mov eax, 5\n1: mov ebx, 6",
    "push ax\n pop dx\n push eax\n pop dx\n pop dx",
]


# kvm_pvm emulates a compatibility-mode store that faults on its second page
# with KVM's instruction emulator, which writes the first page's bytes before
# it finds the fault (64-bit user code, run by the CPU, writes nothing), so
# such a store runs here with both pages mapped only.
SPLIT_STORE = "mov dword ptr [ebp + 0xffd], eax"


def test_compatibility_mode_32():
    """The same kind of snippets in a 32-bit code segment under long mode
    (CPL3): 32-bit stack, addressing and operand defaults, inc/dec forms,
    pushad/popad, and page faults there."""
    rng = random.Random(f"{SEED}-compat")
    cases = []
    for src in COMPAT32:
        code = harness.assemble(src, bits=32)
        for _ in range(6):
            regs = [rng.getrandbits(32) for _ in range(16)]
            regs[4], regs[5] = harness.STACK_TOP, D
            page = rng.choice(list(SECOND_PAGE))
            pages = {} if src == SPLIT_STORE else {HOLE: SECOND_PAGE[page]}
            cases.append((f"{src!r} ({page if pages else 'mapped'})", code, regs,
                          (rng.getrandbits(12) & harness.ARITH) | 2, page_data(rng), dict(bits=32, pages=pages)))
    check_all(cases)


COMPAT16 = [
    "mov ax, bx\n add ax, cx\n adc dx, ax\n sbb si, 0x1234\n dec ax\n inc bx",
    "mov word ptr [bx + si], ax\n add word ptr [bp + di + 4], cx\n mov dx, word ptr [bx + si]",
    "push ax\n push bx\n pop cx\n pop dx\n push 0x1234\n pop si",
    "call 1f\n1: pop ax\n pushf\n pop bx\n and bx, 0xcd5",
    "mov si, 0x100\n mov di, 0x300\n mov cx, 7\n rep movsb\n mov cx, 3\n std\n rep stosw\n cld",
    "lea ax, [bx + si + 0x40]\n lea dx, [bp + 3]\n movzx ecx, byte ptr [bx]\n movsx eax, word ptr [si]",
    "mov eax, ebx\n add eax, 0x12345678\n shl eax, 1\n rcr ecx, 1\n setc dl\n mul ecx",
    "mov cx, 4\n xor ax, ax\n2: add ax, cx\n loop 2b",
    "mov eax, dword ptr [0xffe]",                   # crosses into the protected page (DS base + 0x1000)
    "mov bx, 0xffc\n push word ptr [bx]\n pop word ptr [bx + 0x10]",
    "addr32 mov eax, dword ptr [ebx + 0x20]\n xchg ax, cx\n bswap edx",
    "mov di, 0xff8\n mov cx, 6\n rep stosw",         # faults mid-way at the protected page
]


def test_code_16():
    """16-bit code in compatibility mode (CS based at the code, DS/ES/SS at
    the data): 16-bit addressing ([bx+si], [bp+di] on SS), stack, operand
    and address-size prefixes, and page faults there."""
    rng = random.Random(f"{SEED}-code16")
    cases = []
    for src in COMPAT16:
        code = harness.assemble(".code16\n" + src, bits=32)
        for _ in range(6):
            regs = [rng.getrandbits(32) for _ in range(16)]
            for name in ("rbx", "rsi", "rdi", "rbp"):
                regs[harness.GPR_NAMES.index(name)] = rng.randrange(0, 0x800) & ~1
            regs[4] = 0xC00
            page = rng.choice(list(SECOND_PAGE))
            cases.append((f"{src!r} ({page})", code, regs, (rng.getrandbits(12) & harness.ARITH) | 2,
                          page_data(rng), dict(bits=16, pages={HOLE: SECOND_PAGE[page]})))
    check_all(cases)


# ---------------------------------------------------------------- self-modifying code
SMC = [
    # the next instruction's immediate, in the same block
    "mov byte ptr [rip + 1f + 1], 0x42\n1: mov eax, 0x11",
    # an opcode further on in the same block: inc eax becomes dec eax
    "mov byte ptr [rip + 1f + 1], 0xc8\n nop\n add ebx, 1\n1: inc eax\n add ecx, eax",
    # a later block (after a taken jump)
    "mov dword ptr [rip + 2f + 1], 0x77665544\n jmp 1f\n nop\n1: add ebx, ebx\n2: mov eax, 0x11111111",
    # an instruction already run: the loop's second pass sees the new immediate
    "mov ecx, 3\n xor ebx, ebx\n1: mov eax, 5\n add ebx, eax\n mov byte ptr [rip + 1b + 1], cl\n dec ecx\n jnz 1b",
    # rep movsb/stosb writes code that runs next
    "lea rsi, [rip + 3f]\n lea rdi, [rip + 1f]\n mov ecx, 5\n rep movsb\n1: mov eax, 1\n jmp 2f\n"
    "3: mov eax, 0x99\n2: nop",
    "lea rdi, [rip + 1f]\n mov al, 0x90\n mov ecx, 4\n rep stosb\n mov eax, 1\n1: inc ebx\n inc ebx\n inc ebx",
    # a store that covers the end of one instruction and the start of the
    # next: the immediate's top byte, and a REX.B that makes the nop xchg r8, rax
    "mov word ptr [rip + 1f + 4], 0x4177\n1: mov eax, 0x11223344\n nop\n nop",
    # a read-modify-write and xchg on the next instruction's bytes
    "add byte ptr [rip + 1f + 1], 3\n1: mov eax, 0x10",
    "mov dl, 0x20\n xchg byte ptr [rip + 1f + 1], dl\n1: mov eax, 0x10",
    # a store into the instruction itself that is running (takes effect next time)
    "mov ecx, 2\n xor ebx, ebx\n1: add byte ptr [rip + 1b + 2], 1\n inc ebx\n dec ecx\n jnz 1b",
    # a store into code on the stack-page side: push over the next instructions
    "lea rsp, [rip + 1f + 8]\n mov rax, 0x9090909090909090\n push rax\n1: ud2\n ud2\n ud2\n ud2",
]


def _smc_cases(src: str) -> list:
    rng = random.Random(f"{SEED}-smc")
    code = harness.assemble(src)
    return [(src, code, state(rng, rax=0, rbx=0, rcx=0), 2, page_data(rng), {}) for _ in range(2)]


@pytest.mark.parametrize("src", SMC, ids=[f"smc{i}" for i in range(len(SMC))])
def test_self_modifying_code(src):
    check_all(_smc_cases(src))


def test_unicorn_agrees():
    """The addressing and self-modifying-code cases on Unicorn (QEMU TCG),
    the second oracle, against bt: registers, data pages, the arithmetic
    flags and DF, where bt runs the case without a fault (Unicorn reports
    no CR2 or error code; faults are compared with the CPU above)."""
    harness.needs_unicorn_and_as()
    _uc = harness.UnicornOracle()
    bt = _bts["compiled"]
    bad, ran = [], 0
    for label, code, regs, rflags, data, _ in _addressing_cases() + [c for src in SMC for c in _smc_cases(src)]:
        bt.reset_pages()
        bt.set_code_bits(64)
        bt.state.fs.base = bt.state.gs.base = 0
        got = bt.run(code, regs, rflags | IF, data)
        if got.vector is not None:
            continue
        want = _uc.run(code, regs, rflags | IF, data)
        ran += 1
        mask = (harness.ARITH | 0x400) & ~undefined_flags(code)
        if (want.vector, want.regs, want.data, want.rflags & mask) != (got.vector, got.regs, got.data, got.rflags & mask):
            bad.append(f"{label}: unicorn {want.vector} rflags {want.rflags & mask:#x}, bt {got.vector} "
                       f"rflags {got.rflags & mask:#x}, regs equal: {want.regs == got.regs}, "
                       f"data equal: {want.data == got.data}")
    assert ran > 400
    assert not bad, f"{len(bad)} of {ran} differ:\n" + "\n".join(bad[:20])


def test_oracles_see_page_faults():
    """The harness itself: an unmapped page faults on both sides with the
    CPU's error codes, and maps back after reset_pages."""
    code = harness.assemble("mov rax, 1\n mov qword ptr [rbp + 0xffc], rax\n mov rax, 2")
    regs = state(random.Random(1))
    _kvm.reset_pages()
    _kvm.set_code_bits(64)
    _kvm.set_page(HOLE, 0)
    out = _kvm.run(code, regs, 2, bytes(SPAN))
    assert (out.vector, out.error_code, out.cr2, out.regs[0]) == (14, 6, HOLE, 1)
    assert out.data == bytes(SPAN), "a faulting store wrote part of its bytes"
    _kvm.set_page(HOLE, P | U)
    assert _kvm.run(code, regs, 2, bytes(SPAN)).error_code == 7
    _kvm.reset_pages()
    out = _kvm.run(code, regs, 2, bytes(SPAN))
    assert out.vector is None and out.regs[0] == 2 and struct.unpack_from("<Q", out.data, 0xFFC)[0] == 1
    assert run_both(code, regs, 2, bytes(SPAN), pages={HOLE: 0}) is None
