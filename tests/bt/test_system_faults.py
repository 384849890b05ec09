"""System instructions fault as the SDM says, under bt, with QEMU TCG
running the same guest as the reference.

The guest is one Multiboot ELF (32-bit protected mode, paging off, CPL0),
assembled with GNU as at test time.  Its own GDT and IDT catch every
exception; each probe writes one line to COM1:

    <name> v=<vector or ff> e=<error code> f=<pushed EFLAGS> ip=<pushed EIP - probe end> d=<DR6>

and the guest leaves through isa-debug-exit.  It first prints the CPUID
words that decide which CR4/EFER bits exist, so bt is judged against its
own CPUID.  bt's lines are checked against the SDM; QEMU TCG runs the same
guest (less the probes that wreck its run) and, where QEMU 7.2 follows the
SDM, bt must give its vector, error code, pushed EIP, DR6 and trap RF.
The deviations of QEMU 7.2 are listed below.  Long-mode checks (CR3 above
MAXPHYADDR, PAE in long mode, CR0.PG in 64-bit mode, ...) run through
translated code on tests/bt/test_system.py's 64-bit harness, and the rule
tables in sysregs.py are checked to follow CPUID."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pyvmm.engines.bt import sysregs  # noqa: E402
from pyvmm.engines.bt.faults import GP  # noqa: E402
from tests.asm import assemble  # noqa: E402
from tests.hostfacts import require_from_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GUESTS = REPO / "tests" / "guests"
QEMU = shutil.which("qemu-system-x86_64")
NOFAULT = 0xFF
RF, TF, DR6_BS = 1 << 16, 1 << 8, 1 << 14

# (name, instructions).  Each probe starts at label `p_<name>`; the handler
# resumes at the label after it.  ECX/EAX/EDX are free; CR0/CR4/EFER are
# restored after each probe from the values saved at start.
FIXED_PROBES = [
    ("cr0_pg_without_pe", "mov eax, [cr0_0]\nand eax, ~1\nor eax, 0x80000000\nmov cr0, eax"),
    ("cr0_nw_without_cd", "mov eax, [cr0_0]\nand eax, ~0x40000000\nor eax, 0x20000000\nmov cr0, eax"),
    ("cr0_cd_and_nw", "mov eax, [cr0_0]\nor eax, 0x60000000\nmov cr0, eax"),
    ("wrmsr_fs_base_noncanon", "mov ecx, 0xc0000100\nxor eax, eax\nmov edx, 0x8000\nwrmsr"),
    ("wrmsr_fs_base_canon", "mov ecx, 0xc0000100\nxor eax, eax\nmov edx, 0xffff8000\nwrmsr"),
    ("wrmsr_gs_base_noncanon", "mov ecx, 0xc0000101\nxor eax, eax\nmov edx, 0x00010000\nwrmsr"),
    ("wrmsr_kgs_base_noncanon", "mov ecx, 0xc0000102\nxor eax, eax\nmov edx, 0x80000000\nwrmsr"),
    ("wrmsr_lstar_noncanon", "mov ecx, 0xc0000082\nxor eax, eax\nmov edx, 0x7fff0000\nwrmsr"),
    ("wrmsr_lstar_canon", "mov ecx, 0xc0000082\nmov eax, 0x1000\nxor edx, edx\nwrmsr"),
    ("wrmsr_cstar_noncanon", "mov ecx, 0xc0000083\nxor eax, eax\nmov edx, 0xfff00000\nwrmsr"),
    ("wrmsr_sysenter_esp_noncanon", "mov ecx, 0x175\nxor eax, eax\nmov edx, 0x00800000\nwrmsr"),
    ("wrmsr_sysenter_eip_noncanon", "mov ecx, 0x176\nxor eax, eax\nmov edx, 0x00800000\nwrmsr"),
    ("efer_lme_with_paging_off", "mov ecx, 0xc0000080\nrdmsr\nor eax, 0x100\nwrmsr"),
    ("ud2_is_a_fault", "ud2"),
    ("int3_is_a_trap", "int3"),
    ("icebp_is_a_trap", ".byte 0xf1"),
    ("div_by_zero", "xor edx, edx\nxor eax, eax\nxor ecx, ecx\ndiv ecx"),
    # POPF cannot set RF: the int3 after it pushes RF = 0.
    ("popf_clears_rf", "pushfd\nor dword ptr [esp], 0x10000\npopfd\nint3"),
    # IRET loads RF=1; the int3 right after it pushes EFLAGS before it
    # completes, so with RF still set (RF ends at the end of that instruction).
    ("iret_rf_then_int3", "pushfd\nor dword ptr [esp], 0x10000\npush 0x08\npush OFFSET 1f\niretd\n1: int3"),
    # ... and after a nop completed, RF is clear again.
    ("iret_rf_nop_int3", "pushfd\nor dword ptr [esp], 0x10000\npush 0x08\npush OFFSET 1f\niretd\n1: nop\nint3"),
    # TF set by POPF: the instruction after it runs, then #DB with DR6.BS.
    ("tf_single_step", "xor eax, eax\nmov dr6, eax\npushfd\nor dword ptr [esp], 0x100\npopfd\nnop"),
]
# Where QEMU 7.2 TCG (Debian 12) does not do what the SDM says: it accepts
# CR0.NW without CD, non-canonical MSR bases, and answers int1 with #UD; it
# pushes RF=0 for faults.  bt is held to the SDM there (test_bt_faults_as_the_sdm_says).
QEMU_DEVIATES = frozenset({"cr0_nw_without_cd", "wrmsr_fs_base_noncanon", "wrmsr_gs_base_noncanon",
                           "wrmsr_kgs_base_noncanon", "wrmsr_lstar_noncanon", "wrmsr_cstar_noncanon",
                           "wrmsr_sysenter_esp_noncanon", "wrmsr_sysenter_eip_noncanon",
                           "icebp_is_a_trap"})
# QEMU clears RF at the end of a translated block, not after each instruction.
QEMU_RF_DEVIATES = frozenset({"iret_rf_nop_int3"})
# Probes that would wreck QEMU's run, left out of the guest it runs: it
# accepts CR0.PG without PE (then page-faults forever) and CR4.UMIP, which
# its CPUID does not offer (the run hangs there); it takes reserved EFER
# bits without #GP.
QEMU_UNSAFE = frozenset({"cr0_pg_without_pe"} | {f"cr4_bit{i}" for i in range(32)}
                        | {f"efer_bit{i}" for i in list(range(16)) + [32, 63]})


def _probes(leave_out: frozenset = frozenset()) -> list[tuple[str, str]]:
    out = list(FIXED_PROBES)
    for bit in range(32):
        out.append((f"cr4_bit{bit}", f"mov eax, [cr4_0]\nor eax, {1 << bit:#x}\nmov cr4, eax"))
    for bit in list(range(16)) + [32, 63]:
        lo, hi = (1 << bit, 0) if bit < 32 else (0, 1 << (bit - 32))
        out.append((f"efer_bit{bit}", f"mov ecx, 0xc0000080\nrdmsr\nor eax, {lo:#x}\nor edx, {hi:#x}\nwrmsr"))
    return [p for p in out if p[0] not in leave_out]


GUEST = r"""
.intel_syntax noprefix
.section .multiboot, "a"
.align 4
.long 0x1BADB002, 0, -0x1BADB002
.text
.globl _start
_start:
    mov esp, OFFSET stack_top
    lgdt [gdtr]
    push 0x08
    push OFFSET 1f
    retf
1:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov edi, OFFSET idt
    mov esi, OFFSET stubs
    xor ecx, ecx
2:  mov eax, esi
    mov word ptr [edi], ax
    mov word ptr [edi + 2], 0x08
    mov word ptr [edi + 4], 0x8E00
    shr eax, 16
    mov word ptr [edi + 6], ax
    add edi, 8
    add esi, 16
    inc ecx
    cmp ecx, 32
    jne 2b
    lidt [idtr]
    mov eax, cr0
    mov [cr0_0], eax
    mov eax, cr4
    mov [cr4_0], eax
    mov ecx, 0xc0000080
    rdmsr
    mov [efer_0], eax
    mov [efer_0 + 4], edx
    mov esi, OFFSET s_cpuid
    call puts
    mov eax, 1
    xor ecx, ecx
    cpuid
    push ecx
    mov eax, edx
    call hex
    pop eax
    call hex
    mov eax, 7
    xor ecx, ecx
    cpuid
    push ecx
    mov eax, ebx
    call hex
    pop eax
    call hex
    mov eax, 0x80000001
    cpuid
    mov eax, edx
    call hex
    call newline
{probes}
    mov dx, 0xf4
    mov eax, 0x21
    out dx, eax
    hlt

/* Each probe: clear the record, run, restore CR0/CR4/EFER, print. */
restore:
    mov eax, [cr0_0]
    mov cr0, eax
    mov eax, [cr4_0]
    mov cr4, eax
    mov ecx, 0xc0000080
    mov eax, [efer_0]
    mov edx, [efer_0 + 4]
    wrmsr
    ret

/* Prints "<esi> v=.. e=.. f=.. ip=..\n" from the record; EBX = probe end. */
report:
    call puts
    mov esi, OFFSET s_v
    call puts
    mov eax, [got_vec]
    call hex
    mov esi, OFFSET s_e
    call puts
    mov eax, [got_err]
    call hex
    mov esi, OFFSET s_f
    call puts
    mov eax, [got_fl]
    call hex
    mov esi, OFFSET s_ip
    call puts
    mov eax, [got_ip]
    sub eax, ebx
    call hex
    mov esi, OFFSET s_d
    call puts
    mov eax, [got_dr6]
    call hex
    call newline
    ret

puts:
    push eax
    push edx
    mov dx, 0x3f8
3:  lodsb
    test al, al
    jz 4f
    out dx, al
    jmp 3b
4:  pop edx
    pop eax
    ret

newline:
    push eax
    push edx
    mov dx, 0x3f8
    mov al, 10
    out dx, al
    pop edx
    pop eax
    ret

/* EAX in hex, then a space. */
hex:
    push ecx
    push edx
    push eax
    mov ecx, 8
    mov dx, 0x3f8
5:  rol eax, 4
    push eax
    and eax, 15
    mov al, [digits + eax]
    out dx, al
    pop eax
    dec ecx
    jnz 5b
    mov al, 32
    out dx, al
    pop eax
    pop edx
    pop ecx
    ret

common:
    push eax
    mov eax, [esp + 4]
    mov [got_vec], eax
    mov eax, [esp + 8]
    mov [got_err], eax
    mov eax, [esp + 12]
    mov [got_ip], eax
    mov eax, [esp + 20]
    mov [got_fl], eax
    mov eax, dr6
    mov [got_dr6], eax
    and dword ptr [esp + 20], ~0x100
    mov eax, [resume]
    mov [esp + 12], eax
    pop eax
    add esp, 8
    iretd

.align 16
stubs:
.set i, 0
.rept 32
  .if i == 8 || (i >= 10 && i <= 14) || i == 17 || i == 21
    push i
  .else
    push 0
    push i
  .endif
    jmp common
    .align 16
.set i, i+1
.endr

.data
.align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
gdtr:
    .word 23
    .long gdt
.align 8
idtr:
    .word 32 * 8 - 1
    .long idt
digits: .ascii "0123456789abcdef"
s_cpuid: .asciz "cpuid "
s_v: .asciz " v="
s_e: .asciz "e="
s_f: .asciz "f="
s_ip: .asciz "ip="
s_d: .asciz "d="
{names}
.bss
.align 8
cr0_0: .long 0
cr4_0: .long 0
efer_0: .quad 0
resume: .long 0
got_vec: .long 0
got_err: .long 0
got_ip: .long 0
got_fl: .long 0
got_dr6: .long 0
idt: .space 32 * 8
.space 4096
stack_top:
"""

PROBE = """
    mov dword ptr [got_vec], 0xff
    mov dword ptr [got_err], 0
    mov dword ptr [got_fl], 0
    mov dword ptr [got_dr6], 0
    mov dword ptr [got_ip], OFFSET p_{name}
    mov dword ptr [resume], OFFSET r_{name}
p_{name}:
{body}
r_{name}:
    call restore
    mov ebx, OFFSET r_{name}
    mov esi, OFFSET n_{name}
    call report
"""


def guest_source(leave_out: frozenset = frozenset()) -> str:
    probes = "".join(PROBE.format(name=n, body=b) for n, b in _probes(leave_out))
    names = "".join(f'n_{n}: .asciz "{n}"\n' for n, _ in _probes(leave_out))
    return GUEST.replace("{probes}", probes).replace("{names}", names)


@lru_cache(maxsize=2)
def guest_elf(leave_out: frozenset = frozenset()) -> Path:
    require_from_setup(programs=["as", "ld"], package="binutils")
    return assemble(guest_source(leave_out), fmt="elf32", ld_script=GUESTS / "guest.ld")


Record = tuple[int, int, int, int, int]   # vector, error code, pushed EFLAGS, pushed EIP - probe end, DR6


def parse(out: str) -> tuple[list[int], dict[str, Record]]:
    """(CPUID words: 1.EDX, 1.ECX, 7.EBX, 7.ECX, 80000001.EDX; probe name -> record)."""
    cpuid, rec = None, {}
    for line in out.splitlines():
        if line.startswith("cpuid "):
            cpuid = [int(w, 16) for w in line.split()[1:]]
            continue
        m = re.fullmatch(r"(\w+) v=(\w+) e=(\w+) f=(\w+) ip=(\w+) d=(\w+)", line.strip())
        if m:
            rec[m[1]] = tuple(int(m[i], 16) for i in range(2, 7))
    assert cpuid is not None and len(cpuid) == 5, out
    return cpuid, rec


def run_bt(kernel: Path) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--engine", "bt", "--kernel", str(kernel),
                           "--mem", "32M", "--debug-exit", "iobase=0xf4,iosize=4", "--no-reboot"],
                          cwd=REPO, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return proc.stdout.decode("latin-1") + proc.stderr.decode("latin-1"), proc.returncode


def run_qemu(kernel: Path) -> tuple[str, int]:
    proc = subprocess.run([QEMU, "-accel", "tcg", "-m", "32", "-kernel", str(kernel), "-display", "none",
                           "-serial", "stdio", "-monitor", "none", "-no-reboot",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc.stdout.decode("latin-1") + proc.stderr.decode("latin-1"), proc.returncode


class FakeCpuid:
    """A CPUID table answering from five words, as the guest printed them."""

    def __init__(self, words: list[int]):
        edx1, ecx1, ebx7, ecx7, edx81 = words
        self.leaves = {1: (0, 0, ecx1, edx1), 7: (0, ebx7, ecx7, 0), 0x80000001: (0, 0, 0, edx81),
                       0x80000000: (0x80000008, 0, 0, 0), 0x80000008: (40, 0, 0, 0), 0xD: (0, 0, 0, 0)}

    def lookup(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        return self.leaves.get(leaf, (0, 0, 0, 0))


class FakeCpu:
    def __init__(self, table, **regs):
        self.cpuid, self.index = table, 0
        self.cr0, self.cr3, self.cr4, self.efer, self.mode = 0x11, 0, 0, 0, (32, 32, 0)
        self.__dict__.update(regs)


def expected(name: str, cpuid: list[int]) -> int:
    """The vector the SDM gives for a CPUID-dependent probe (CPL0, paging off)."""
    cpu = FakeCpu(FakeCpuid(cpuid))
    if name.startswith("cr4_bit"):
        bit = int(name[7:])
        if bit == 17:                # PCIDE outside IA-32e mode
            return GP
        if bit == 23:                # CET needs CR0.WP, clear at Multiboot entry
            return GP
        return NOFAULT if sysregs.cr4_allowed(cpu) >> bit & 1 else GP
    bit = int(name[8:])
    if bit == 10:                    # LMA: read-only, the write is ignored
        return NOFAULT
    return NOFAULT if sysregs.efer_allowed(cpu) >> bit & 1 else GP


SDM = {   # name -> (vector, RF in the pushed EFLAGS, pushed EIP is past the probe)
    "cr0_pg_without_pe": (GP, 1, 0), "cr0_nw_without_cd": (GP, 1, 0), "cr0_cd_and_nw": (NOFAULT, 0, 0),
    "wrmsr_fs_base_noncanon": (GP, 1, 0), "wrmsr_fs_base_canon": (NOFAULT, 0, 0),
    "wrmsr_gs_base_noncanon": (GP, 1, 0), "wrmsr_kgs_base_noncanon": (GP, 1, 0),
    "wrmsr_lstar_noncanon": (GP, 1, 0), "wrmsr_lstar_canon": (NOFAULT, 0, 0),
    "wrmsr_cstar_noncanon": (GP, 1, 0), "wrmsr_sysenter_esp_noncanon": (GP, 1, 0),
    "wrmsr_sysenter_eip_noncanon": (GP, 1, 0), "efer_lme_with_paging_off": (NOFAULT, 0, 0),
    "ud2_is_a_fault": (6, 1, 0), "int3_is_a_trap": (3, 0, 1), "icebp_is_a_trap": (1, 0, 1),
    "div_by_zero": (0, 1, 0), "popf_clears_rf": (3, 0, 1), "tf_single_step": (1, 0, 1),
    "iret_rf_then_int3": (3, 1, 1),    # INT3 pushes before it completes: RF still 1
    "iret_rf_nop_int3": (3, 0, 1),
}


def check(cpuid: list[int], rec: dict[str, Record], skip: set[str] = frozenset()) -> list[str]:
    """The probes whose record breaks the SDM, as readable lines."""
    bad = []
    for name, _body in _probes():
        if name in skip:
            continue
        if name not in rec:
            bad.append(f"{name}: no line")
            continue
        vec, _err, fl, ip, dr6 = rec[name]
        if name in SDM:
            want_vec, want_rf, past = SDM[name]
            if vec != want_vec:
                bad.append(f"{name}: vector {vec:#x}, SDM {want_vec:#x}")
            elif vec != NOFAULT:
                if bool(fl & RF) != bool(want_rf):
                    bad.append(f"{name}: pushed RF={int(bool(fl & RF))}, SDM {want_rf}")
                if (ip == 0) != bool(past):
                    bad.append(f"{name}: pushed EIP {'at' if ip else 'past'} the instruction, SDM the other")
                if name == "tf_single_step" and not (dr6 & DR6_BS and fl & TF):
                    bad.append(f"{name}: DR6 {dr6:#x} / pushed EFLAGS {fl:#x}: want BS and TF set")
        else:
            want = expected(name, cpuid)
            if vec != want:
                bad.append(f"{name}: vector {vec:#x}, SDM {want:#x}")
            elif vec == GP and not fl & RF:
                bad.append(f"{name}: #GP pushed RF=0")
    return bad


@lru_cache(maxsize=1)
def bt_run() -> tuple[list[int], dict[str, Record]]:
    out, rc = run_bt(guest_elf())
    assert rc == (0x21 << 1) | 1, out[-3000:]
    return parse(out)


def test_bt_faults_as_the_sdm_says():
    cpuid, rec = bt_run()
    assert len(rec) == len(_probes())
    assert check(cpuid, rec) == []


def test_qemu_agrees():
    """QEMU TCG runs the same guest (less the probes that wreck its run):
    where it follows the SDM, bt gives the same vector, error code and
    pushed EIP, and DR6 (its fixed bits, and BS after a single step).  RF is
    not compared: QEMU 7.2 pushes RF=0 for faults."""
    require_from_setup(programs=["qemu-system-x86_64"], package="qemu-system-x86")
    out, rc = run_qemu(guest_elf(QEMU_UNSAFE))
    assert rc == (0x21 << 1) | 1, out[-3000:]
    _qcpuid, qrec = parse(out)
    _cpuid, rec = bt_run()
    compared = [n for n in SDM if n not in QEMU_DEVIATES | QEMU_UNSAFE]
    assert len(compared) >= 8
    for name in compared:
        (v, e, f, ip, dr6), (qv, qe, qf, qip, qdr6) = rec[name], qrec[name]
        assert (v, e, ip, dr6) == (qv, qe, qip, qdr6), name
        if SDM[name][2] and name not in QEMU_RF_DEVIATES:   # traps: QEMU's RF follows the SDM
            assert f & RF == qf & RF, name


# -- checks that need long mode (bt's 64-bit harness; no QEMU reference) ------------------
def _cpu(**kw) -> FakeCpu:
    from pyvmm.engines.bt.cpuid import CpuidTable
    return FakeCpu(CpuidTable(), **kw)


def _cpu_v2(**kw) -> FakeCpu:
    """A vCPU of --cpu-model v2: no XSAVE."""
    from pyvmm.engines.bt.cpuid import CpuidTable
    return FakeCpu(CpuidTable(model="v2"), **kw)


LMA = sysregs.EFER_LMA | sysregs.EFER_LME


@pytest.mark.parametrize("what,call", [
    ("CR3 bit 40 (MAXPHYADDR is 40)", lambda: sysregs.check_cr3(_cpu(mode=(64, 64, 0)), 1 << 40)),
    ("CR3 bit 63 without PCIDE", lambda: sysregs.check_cr3(_cpu(mode=(64, 64, 0)), 1 << 63)),
    ("CR4.PAE cleared in long mode", lambda: sysregs.check_cr4(_cpu(efer=LMA, cr4=0x20), 0)),
    ("CR0.PG cleared in 64-bit mode", lambda: sysregs.check_cr0(_cpu(efer=LMA, mode=(64, 64, 0)), 0x11)),
    ("CR0.PG with LME but no PAE", lambda: sysregs.check_cr0(_cpu(efer=sysregs.EFER_LME), 0x80000011)),
    ("CR0 bit 32", lambda: sysregs.check_cr0(_cpu(), 1 << 32 | 0x11)),
    ("CR8 bit 4", lambda: sysregs.check_cr8(0x10)),
    ("EFER.LME changed with paging on", lambda: sysregs.check_efer(_cpu(cr0=0x80000011), sysregs.EFER_LME)),
    ("XCR0 AVX (not offered)", lambda: sysregs.check_xcr0(_cpu_v2(), 7)),
    ("XCR0 MPX (not offered)", lambda: sysregs.check_xcr0(_cpu(), 0x1F)),
    ("XCR0 without x87", lambda: sysregs.check_xcr0(_cpu(), 2)),
])
def test_long_mode_and_xcr0_rules(what, call):
    from pyvmm.engines.bt.faults import GuestFault
    with pytest.raises(GuestFault) as e:
        call()
    assert (e.value.vector, e.value.error_code) == (GP, 0), what


def test_rules_follow_cpuid():
    """A feature added to CPUID is accepted without a change in sysregs."""
    from pyvmm.engines.bt.cpuid import CpuidTable
    table = CpuidTable(model="v2")
    cpu = FakeCpu(table, mode=(64, 64, 0), efer=LMA, cr4=0x20)
    assert not sysregs.cr4_allowed(cpu) & (1 << 18 | 1 << 17 | 1 << 22)   # no XSAVE (v2), PCID, PKU
    a, b, c, d = table.lookup(1, 0)
    table.leaves[(1, 0)] = (a, b, c | 1 << 26 | 1 << 17, d)                # offer XSAVE and PCID
    a, b, c, d = table.lookup(7, 0)
    table.leaves[(7, 0)] = (a, b, c | 1 << 3, d)                           # and PKU
    table.leaves[(0xD, 0)] = (7, 0, 0, 0)                                  # x87, SSE, AVX
    sysregs.check_cr4(cpu, 0x20 | 1 << 18 | 1 << 17 | 1 << 22)
    sysregs.check_xcr0(cpu, 7)
    sysregs.check_cr3(cpu, (1 << 40) - 0x1000)
    from pyvmm.engines.bt.faults import GuestFault
    with pytest.raises(GuestFault):
        sysregs.check_xcr0(cpu, 5)                                         # AVX without SSE


def test_wrmsr_and_cr_writes_on_the_vcpu():
    """The helpers the translated code calls: #GP leaves the state as it was."""
    from pyvmm.engines.bt import system
    from pyvmm.engines.bt.faults import GuestFault
    from pyvmm.engines.bt.cpu import VCpu
    from pyvmm.engines.bt.cpuid import CpuidTable
    from pyvmm.bus import Bus
    from pyvmm.memory import GuestMemory
    mem = GuestMemory(4 << 20)
    try:
        c = VCpu(mem, Bus("io"), Bus("mmio"))
        c.cpuid = CpuidTable()
        for idx in (0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0xC0000083, 0x175, 0x176):
            with pytest.raises(GuestFault):
                system.wrmsr(c, idx, 0x0000800000000000)
            system.wrmsr(c, idx, 0xFFFF800000001000)
            assert system.rdmsr(c, idx) == 0xFFFF800000001000
        with pytest.raises(GuestFault):
            system.rdmsr(c, 0x12345678)
        with pytest.raises(GuestFault):
            system.wrmsr(c, 0x12345678, 0)
        cr4 = c.cr4
        with pytest.raises(GuestFault):
            system.write_cr(c, 4, 1 << 22)        # PKE: PKU is not offered
        assert c.cr4 == cr4
        with pytest.raises(GuestFault):
            system.write_cr(c, 8, 0x10)
    finally:
        mem.close()


# -- the same rules in 64-bit mode, through translated code ------------------------------
LONG_PROBES = [   # (instructions, faults?)
    ("mov rax, cr3\nbts rax, 40\nmov cr3, rax", True),        # at MAXPHYADDR (40)
    ("mov rax, cr3\nbts rax, 63\nmov cr3, rax", True),        # no-flush bit without PCIDE
    ("mov rax, cr3\nmov cr3, rax", False),                    # the fast path: same CR3
    ("mov rax, cr4\nand eax, ~0x20\nmov cr4, rax", True),     # PAE cleared in long mode
    ("mov rax, cr4\nbts eax, 22\nmov cr4, rax", True),        # PKE: PKU not offered
    ("mov rax, cr4\nbts eax, 17\nmov cr4, rax", True),        # PCIDE: PCID not offered
    ("mov rax, cr0\nbtr eax, 31\nmov cr0, rax", True),        # PG cleared in 64-bit mode
    ("mov eax, 0x10\nmov cr8, rax", True),                    # CR8 bits 63:4
    ("mov eax, 0xf\nmov cr8, rax\nxor eax, eax\nmov cr8, rax", False),
    ("mov rax, 1\nshl rax, 32\nor rax, 0x400\nmov dr7, rax", True),   # DR7 bits 63:32
    ("mov ecx, 0xc0000100\nxor eax, eax\nmov edx, 0x8000\nwrmsr", True),
    ("mov ecx, 0xc0000100\nxor eax, eax\nmov edx, 0xffff8000\nwrmsr", False),
    ("mov ecx, 0xc0000080\nrdmsr\nbtr eax, 8\nwrmsr", True),  # LME changed with paging on
    ("mov ecx, 0x12345678\nrdmsr", True),                     # an MSR that does not exist
]


def test_long_mode_probes_under_bt():
    from tests.bt.test_system import run as run64
    body = ""
    for i, (ins, _faults) in enumerate(LONG_PROBES):
        body += f"    lea r15, [rip + p{i}]\n{ins}\n    mov al, 'N'\n    mov dx, 0x3f8\n    out dx, al\np{i}:\n"
    asm = f"{body}    hlt\n.org 0x800\n    add rsp, 8\n    mov [rsp], r15\n" \
          "    mov al, 'G'\n    mov dx, 0x3f8\n    out dx, al\n    iretq\n"
    out, _reason, _stats = run64(asm, {GP: (0x800, 0)})
    assert out.decode() == "".join("G" if f else "N" for _i, f in LONG_PROBES)
