"""Instruction fetches that cross into a page the CPU may not fetch from:
bt and hybrid against the real CPU (hw: user code runs natively under KVM
on every host).

A 64-bit CPL0 loop places one user instruction so that its first k bytes
end page A and the rest would come from page B, irets to it at CPL3, and
records what the fault handler sees (vector, error code, RIP, CR2).  Page B
is, in turn, not present, present but NX, and present but supervisor-only.
Instructions of every length 2..15 are split at every point; k == length
means the instruction fits on A, runs, and the next fetch faults at B's
first byte.  The CPU raises #PF with CR2 = B's first byte and the
instruction's own RIP; a translator that decodes the cut-off bytes raises
#UD instead (issue 14: Debian's busybox init died that way under hybrid)."""

from __future__ import annotations

import struct

import pytest

from pyvmm.cli.exitcodes import exit_code
from pyvmm.config import VmConfig
from pyvmm.cpu import EFER_NXE

from .modeguests import IDT_STUBS, USTACK, boot_for, idt_setup
from .rawguest import build_guest, require_kvm, run_machine

IDT = 0x120000
CASES, RESULTS = 0x200000, 0x210000
PAGE_A, PAGE_B = 0x400000, 0x401000         # linear: 4 KiB pages of the table at PT
FRAME_A, FRAME_B = 0x700000, 0x701000       # where they live (identity-mapped 2 MiB page)
PT = 0x180000
P, W, U, NX = 1, 2, 4, 1 << 63
PAGE_B_KINDS = {"not-present": 0, "nx": FRAME_B | P | W | U | NX, "supervisor": FRAME_B | P | W}
# Error codes: user fetch (U/S and I/D, with EFER.NXE on), plus P when B is present.
ERROR = {"not-present": 0x14, "nx": 0x15, "supervisor": 0x15}

SOURCE = """
.intel_syntax noprefix
    mov ecx, 0xc0000080; rdmsr; or eax, 0x800; wrmsr      /* EFER.NXE */
""" + idt_setup(IDT) + """
    xor r15, r15
next_case:
    cmp r15, [{cases:#x} - 8]
    jae finish
    mov rbx, r15
    shl rbx, 5
    add rbx, {cases:#x}
    mov rdi, [rbx]                  /* linear address of the instruction */
    mov rsi, rdi
    sub rsi, {page_a:#x}
    add rsi, {frame_a:#x}           /* ... written through the frame's identity map */
    mov rax, [rbx + 16]
    mov [rsi], rax
    mov rax, [rbx + 24]
    mov [rsi + 8], rax
    push 0x1b
    push {ustack}
    push 0x2
    push 0x23
    push rdi
    iretq
common:
    mov rbx, r15
    shl rbx, 5
    add rbx, {results:#x}
    mov rax, [rsp]
    mov [rbx], rax                  /* vector */
    mov rax, [rsp + 8]
    mov [rbx + 8], rax              /* error code */
    mov rax, [rsp + 16]
    mov [rbx + 16], rax             /* RIP of the frame */
    mov rax, cr2
    mov [rbx + 24], rax
    mov rsp, {kstack}
    inc r15
    jmp next_case
finish:
    cli
    hlt
""" + IDT_STUBS


def _nop(length: int) -> bytes:
    """A multi-byte NOP of `length` (2..15) bytes: 0F 1F forms, then 66 prefixes."""
    base = {2: "6690", 3: "0f1f00", 4: "0f1f4000", 5: "0f1f440000", 6: "660f1f440000",
            7: "0f1f8000000000", 8: "0f1f840000000000"}
    if length in base:
        return bytes.fromhex(base[length])
    return b"\x66" * (length - 8) + bytes.fromhex(base[8])


# Ordinary instructions beside the NOPs: the 8-byte store of the busybox report,
# a 10-byte immediate load, a 12-byte store of an immediate, 2/3-byte ALU forms.
OTHERS = [bytes.fromhex(h) for h in ("01d8", "4801d8", "48898424a0000000", "48b88877665544332211",
                                     "48c78424a000000078563412")]


def _cases() -> list[tuple[int, int, bytes]]:
    """(linear address, length, bytes) for each instruction and split point."""
    out = []
    for insn in [_nop(n) for n in range(2, 16)] + OTHERS:
        for k in range(1, len(insn) + 1):
            out.append((PAGE_B - k, len(insn), insn))
    return out


def _boot(kind: str, code: bytes):
    cases = _cases()
    inner = boot_for(code)

    def boot(memory):
        result = inner(memory)
        st = result.cpu
        st.efer |= EFER_NXE
        pml4 = st.cr3
        pdpt = memory.read_u64(pml4) & ~0xFFF
        pd = memory.read_u64(pdpt) & ~0xFFF
        # The 2 MiB page at PAGE_A becomes a 4 KiB table: A user code, B as the case says.
        memory.write(PT, bytes(0x1000))
        memory.write_u64(PT + 8 * ((PAGE_A >> 12) & 0x1FF), FRAME_A | P | W | U)
        memory.write_u64(PT + 8 * ((PAGE_B >> 12) & 0x1FF), PAGE_B_KINDS[kind])
        memory.write_u64(pd + 8 * (PAGE_A >> 21), PT | P | W | U)
        memory.write(FRAME_A, b"\xcc" * 0x1000)
        memory.write_u64(CASES - 8, len(cases))
        for i, (addr, _n, insn) in enumerate(cases):
            # The guest's 16-byte copy runs on into B's frame, which follows A's.
            memory.write(CASES + 32 * i, struct.pack("<QQ", addr, len(insn)) + insn.ljust(16, b"\xcc"))
        return result
    return boot


def _run(engine: str, kind: str) -> list[tuple[int, int, int, int]]:
    """The recorded (vector, error, rip, cr2) of every case under `engine`."""
    code = build_guest(SOURCE.format(cases=CASES, results=RESULTS, page_a=PAGE_A,
                                     frame_a=FRAME_A, ustack=USTACK, kstack=0x151000), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    n = len(_cases())
    machine, _ = run_machine(cfg, _boot(kind, code), timeout=240,
                             inspect=lambda m: m.memory.read(RESULTS, 32 * n))
    assert exit_code(machine.stop_status) == 4, f"{engine}: the guest did not finish: {machine.stop_status}"
    raw = machine.inspected
    return [struct.unpack_from("<4Q", raw, 32 * i) for i in range(n)]


def _expected(kind: str) -> list[tuple[int, int, int, int]]:
    out = []
    for addr, length, _insn in _cases():
        rip = addr if PAGE_B - addr < length else PAGE_B
        out.append((14, ERROR[kind], rip, PAGE_B))
    return out


_HW: dict[str, list] = {}


def _hw(kind: str) -> list:
    if kind not in _HW:
        _HW[kind] = _run("hw", kind)
    return _HW[kind]


@pytest.mark.kvm
@pytest.mark.parametrize("kind", sorted(PAGE_B_KINDS))
def test_the_real_cpu_faults_on_the_second_page(kind):
    """The reference itself: what the architecture says, on this host's CPU."""
    require_kvm()
    assert _hw(kind) == _expected(kind)


@pytest.mark.kvm
@pytest.mark.parametrize("engine", ["bt", "hybrid"])
@pytest.mark.parametrize("kind", sorted(PAGE_B_KINDS))
def test_page_crossing_fetch_faults_match_the_cpu(engine, kind):
    require_kvm()
    got = _run(engine, kind)
    diffs = [(i, c[:2], g, e) for i, (c, g, e) in enumerate(zip(_cases(), got, _hw(kind))) if g != e]
    assert not diffs, f"{len(diffs)} of {len(got)} cases differ from the CPU, first: {diffs[:3]}"
