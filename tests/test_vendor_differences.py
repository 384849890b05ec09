"""The vendor differences that reach a guest, under bt and under hybrid
(issue 14 part 2).  pyvmm's virtual CPU is GenuineIntel, so a guest must
see Intel's behaviour even on an AMD host, where hybrid runs user code on
the host CPU:

- SYSENTER from 64-bit and from compatibility-mode user code enters the
  kernel (AMD: #UD in long mode), in 64-bit mode, at all 64 bits of
  SYSENTER_EIP with all 64 bits of SYSENTER_ESP;
- SYSCALL from compatibility mode is #UD (AMD: it enters at CSTAR), and
  leaves RCX and R11 alone;
- SYSEXIT with REX.W returns to 64-bit user code (CS = SYSENTER_CS + 32),
  without it to 32-bit code (CS = SYSENTER_CS + 16);
- SYSRET to a non-canonical RCX is #GP(0) still at CPL0 (AMD: the switch to
  CPL3 happens first and the fault hits user mode).

And every user-mode event that hybrid hands back to bt (exceptions,
`int n`, `int3`, `into`) reaches the guest kernel's IDT with the vector,
error code and frame (RIP, CS, RFLAGS, RSP, SS) and CR2 the CPU gives.
Each case runs once per engine: the bt record is checked against the Intel
facts written out below, and the hybrid record must equal bt's.  The same
guest under engine hw (user code on the host CPU, its events delivered by
KVM) is the real-CPU reference: equal to bt where the vendors agree, and on
an AMD host AMD's behaviour where they differ, which shows that each case
tells the two vendors apart."""

from __future__ import annotations

import functools

import pytest

from pyvmm.config import VmConfig
from pyvmm.engines.bt.hostcpu import host_cpuid
from pyvmm.engines.kvm import hostfit
from pyvmm.machine import StopReason

from . import vendorguest as vg
from .modeguests import KSTACK, USTACK, boot_for
from .rawguest import require_kvm, run_machine

RF = 1 << 16
UNMAPPED = 0x7FFF0000000         # above the guest's 4 GiB identity map
FROM_USER_RSP = KSTACK - 8 * 7   # RSP0, then SS, RSP, RFLAGS, CS, RIP, error code, vector

U64 = vg.enter_user(vg.USER64_CS, "user64")
U32 = vg.enter_user(vg.USER32_CS, "user32")
# Compatibility mode cannot reach past the 4 GiB identity map: unmap the 2 MiB page at 1 GiB first.
UNMAP_1G = """    mov rax, cr3; mov rax, [rax]; and rax, ~0xfff; mov rax, [rax + 8]; and rax, ~0xfff
    mov qword ptr [rax], 0
    invlpg [0x40000000]
"""

# name: (kernel text, user64 text, user32 text)
CASES = {
    "sysenter-64": (U64, "fault: sysenter\nafter:", ""),
    "sysenter-compat": (U32, "", "fault: sysenter\nafter:"),
    "syscall-64": (U64, "fault: syscall\nafter:", ""),
    "syscall-compat": (U32, "", "fault: syscall\nafter:"),
    "sysexit-64": (vg.sysexit_to(8, "user64"), "fault: ud2\nafter:", ""),
    "sysexit-32": (vg.sysexit_to(4, "user32"), "", "fault: ud2\nafter:"),
    "sysret-noncanonical": (vg.SYSRET_NONCANONICAL, "", ""),
    "sysexit-noncanonical": (vg.SYSEXIT_NONCANONICAL, "", ""),
    "sysenter-cs0": (vg.wrmsr(0x174, "0") + U64, "fault: sysenter\nafter:", ""),
    "sysexit-cpl3": (U64, "fault: .byte 0x0f, 0x35\nafter:", ""),
    "sysret-cpl3": (U64, "fault: sysretq\nafter:", ""),
    # user-mode events hybrid hands back to bt: 64-bit ...
    "ud2": (U64, "fault: ud2\nafter:", ""),
    "gp-cli": (U64, "fault: cli\nafter:", ""),
    "gp-noncanonical": (U64, f"mov rax, {vg.NONCANONICAL:#x}\nfault: mov rbx, [rax]\nafter:", ""),
    "gp-int-dpl0": (U64, "fault: int 0x81\nafter:", ""),
    "pf-read": (U64, f"mov rax, {UNMAPPED:#x}\nfault: mov rbx, [rax]\nafter:", ""),
    "pf-write": (U64, f"mov rax, {UNMAPPED:#x}\nfault: mov [rax], rbx\nafter:", ""),
    "pf-fetch": (U64, f"mov rax, {UNMAPPED:#x}\nfault: jmp rax\nafter:", ""),
    "int80": (U64, "fault: int 0x80\nafter:", ""),
    "int3": (U64, "fault: int3\nafter:", ""),
    # an iretq with RF set (as after a fault) into an int3, then into a fault
    "int3-rf": (vg.enter_user(vg.USER64_CS, "user64", vg.USER_RFLAGS | RF), "fault: int3\nafter:", ""),
    "ud2-rf": (vg.enter_user(vg.USER64_CS, "user64", vg.USER_RFLAGS | RF), "fault: ud2\nafter:", ""),
    "int-3": (U64, "fault: .byte 0xcd, 3\nafter:", ""),           # the two-byte form
    "int1": (U64, "fault: .byte 0xf1\nafter:", ""),
    "ud2-after-cc": (U64, "mov eax, 0xcccccccc\nfault: ud2\nafter:", ""),   # not an int3
    "pf-after-cc": (U64, f"mov rax, {UNMAPPED:#x}\nmov rbp, {USTACK:#x}\n"
                    "mov [rbp - 0x34], eax\nfault: mov rbx, [rax]\nafter:", ""),       # 89 45 cc
    "ss-noncanonical": (U64, f"mov rbp, {vg.NONCANONICAL:#x}\nfault: mov rbx, [rbp]\nafter:", ""),
    "into-64": (U64, "fault: .byte 0xce\nafter:", ""),             # no INTO in 64-bit mode
    "divide": (U64, "mov ecx, 0\nfault: div ecx\nafter:", ""),
    # ... and compatibility mode (a 32-bit program under a 64-bit kernel)
    "compat-ud2": (U32, "", "fault: ud2\nafter:"),
    "compat-int80": (U32, "", "fault: int 0x80\nafter:"),
    "compat-int3": (U32, "", "fault: int3\nafter:"),
    "compat-into": (U32, "", "fault: into\nafter:"),
    "compat-divide": (U32, "", "mov ecx, 0\nfault: div ecx\nafter:"),
    "compat-pf": (UNMAP_1G + U32, "", "mov eax, 0x40001000\nfault: mov ebx, [eax]\nafter:"),
}


@functools.cache
def _run(engine: str, case: str) -> tuple[dict, dict]:
    """(the record, the engine's user-exit counters) of one case."""
    code = vg.vendor_guest(*CASES[case])
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    machine, _ = run_machine(cfg, boot_for(code), timeout=60,
                             inspect=lambda m: (m.memory.read(vg.RESULT, vg.RECORD_SIZE), m.engine.stats()))
    assert machine.stop_status.reason is StopReason.HALTED, (engine, case, machine.stop_status)
    raw, stats = machine.inspected
    return vg.record(raw), stats.get("user_exits", {})


def _event(r: dict, vector: int, error: int = 0, *, trap: bool = False, cs: int = vg.USER64_CS,
           ss: int = vg.USER_SS) -> None:
    """An exception or interrupt from CPL3 as the CPU delivers it through a
    64-bit interrupt gate: on the TSS's RSP0 stack, SS null; the frame's RIP
    at the instruction for a fault, after it for a trap; RF set in the
    pushed RFLAGS for a fault only."""
    want = {"entry": vg.ENTRY_IDT, "vector": vector, "error": error,
            "frame_rip": r["after"] if trap else r["fault"], "frame_cs": cs,
            "frame_rflags": vg.USER_RFLAGS | (0 if trap else RF), "frame_rsp": USTACK, "frame_ss": ss,
            "handler_rsp": FROM_USER_RSP, "handler_cs": vg.KERNEL_CS, "handler_ss": 0}
    assert {k: r[k] for k in want} == want


def _sysenter(r: dict) -> None:
    assert r["entry"] == vg.ENTRY_SYSENTER
    assert r["handler_rip"] >> 32 == vg.HIGH_ALIAS >> 32          # all 64 bits of SYSENTER_EIP
    assert r["handler_rsp"] == vg.SE_STACK                         # all 64 bits of SYSENTER_ESP
    assert (r["handler_cs"], r["handler_ss"]) == (vg.KERNEL_CS, vg.KERNEL_SS)
    assert (r["rcx"], r["r11"]) == (vg.RCX_MARK, vg.R11_MARK)     # SYSENTER saves nothing


def _check_intel(case: str, r: dict) -> None:
    """What an Intel 64 CPU does in `case` (SDM vol. 2 and 3)."""
    if case in ("sysenter-64", "sysenter-compat"):
        _sysenter(r)
    elif case == "syscall-64":
        assert r["entry"] == vg.ENTRY_LSTAR and r["handler_cs"] == vg.KERNEL_CS and r["handler_ss"] == vg.KERNEL_SS
        assert r["rcx"] == r["after"] and r["r11"] == vg.USER_RFLAGS and r["handler_rsp"] == USTACK
    elif case == "syscall-compat":
        _event(r, 6, cs=vg.USER32_CS)
        assert (r["rcx"], r["r11"]) == (vg.RCX_MARK, vg.R11_MARK)
    elif case == "sysexit-64":
        _event(r, 6, ss=vg.USER_SS_SYSEXIT64)                     # CS 0x2b: 64-bit user code ran the ud2
    elif case == "sysexit-32":
        _event(r, 6, cs=vg.USER32_CS)
    elif case in ("sysret-noncanonical", "sysexit-noncanonical"):
        # #GP(0) raised at CPL0, before any switch to user mode: no stack switch
        want = {"entry": vg.ENTRY_IDT, "vector": 13, "error": 0, "frame_rip": r["fault"],
                "frame_cs": vg.KERNEL_CS, "frame_ss": vg.KERNEL_SS, "frame_rsp": r["kernel_rsp"],
                "handler_rsp": r["kernel_rsp"] - 8 * 7}
        assert {k: r[k] for k in want} == want
        assert r["frame_rflags"] & RF
    else:
        cs = vg.USER32_CS if case.startswith("compat") else vg.USER64_CS
        name = case.removeprefix("compat-")
        vector, error, trap = {
            "ud2": (6, 0, False), "gp-cli": (13, 0, False), "gp-noncanonical": (13, 0, False),
            "gp-int-dpl0": (13, 0x81 * 8 + 2, False),       # IDT entry 0x81, IDT bit
            "pf-read": (14, 4, False), "pf-write": (14, 6, False), "pf-fetch": (14, 4, False),  # no I/D bit: EFER.NXE and CR4.SMEP are 0

            "pf": (14, 4, False), "int80": (0x80, 0, True), "int3": (3, 0, True), "into": (4, 0, True),
            "divide": (0, 0, False), "int3-rf": (3, 0, True), "ud2-rf": (6, 0, False), "int-3": (3, 0, True), "int1": (1, 0, True), "ud2-after-cc": (6, 0, False),
            "pf-after-cc": (14, 4, False), "ss-noncanonical": (12, 0, False), "into-64": (6, 0, False),
            "sysenter-cs0": (13, 0, False), "sysexit-cpl3": (13, 0, False), "sysret-cpl3": (13, 0, False)}[name]
        if name == "int3-rf":
            # the RF an int3 pushes right after an RF=1 iretq: bt pushes it set (the image is taken
            # before the int3 completes); kvm_pvm's own delivery (engine hw) pushes it clear
            r = {**r, "frame_rflags": r["frame_rflags"] & ~RF}
        if name == "pf-fetch":
            # a fetch fault: the frame's RIP is the target, where the fetch failed
            r = {**r, "fault": UNMAPPED}
        _event(r, vector, error, trap=trap, cs=cs)
        if name.startswith("pf"):
            assert r["cr2"] == (0x40001000 if case == "compat-pf" else UNMAPPED)
        if name.startswith("sys"):
            assert (r["rcx"], r["r11"]) == (vg.RCX_MARK, vg.R11_MARK) or name == "sysenter-cs0"


@pytest.mark.parametrize("case", CASES)
def test_bt_behaves_as_intel(case):
    record, _ = _run("bt", case)
    _check_intel(case, record)


@pytest.mark.kvm
@pytest.mark.parametrize("case", CASES)
def test_hybrid_hands_the_guest_what_bt_does(case):
    require_kvm()
    hybrid, exits = _run("hybrid", case)
    bt, _ = _run("bt", case)
    assert hybrid == bt
    if case not in ("sysret-noncanonical", "sysexit-noncanonical"):     # those never leave CPL0
        assert sum(exits.values()) >= 1, exits  # the user instruction ran under KVM and came back
    _check_intel(case, hybrid)


def _host_vendor() -> bytes:
    _, ebx, ecx, edx = host_cpuid(0)
    return b"".join(v.to_bytes(4, "little") for v in (ebx, edx, ecx))


def _check_amd(case: str, r: dict) -> None:
    """What an AMD64 CPU does where it differs from Intel (APM vol. 3)."""
    if case in ("sysenter-64", "sysenter-cs0"):
        _event(r, 6)                                   # no SYSENTER in long mode
    elif case == "sysenter-compat":
        _event(r, 6, cs=vg.USER32_CS)
    elif case == "syscall-compat":                     # enters at CSTAR, RCX/R11 as in 64-bit mode
        assert r["entry"] == vg.ENTRY_CSTAR and r["handler_cs"] == vg.KERNEL_CS
        assert (r["rcx"], r["r11"]) == (r["after"], vg.USER_RFLAGS)
    elif case == "sysret-noncanonical":                # #GP after the switch: in user mode, kernel RSP
        want = {"entry": vg.ENTRY_IDT, "vector": 13, "error": 0, "frame_rip": vg.NONCANONICAL,
                "frame_cs": vg.USER64_CS, "frame_ss": vg.USER_SS, "frame_rsp": r["kernel_rsp"],
                "handler_rsp": FROM_USER_RSP}
        assert {k: r[k] for k in want} == want


VENDOR_CASES = ("sysenter-64", "sysenter-compat", "sysenter-cs0", "syscall-compat", "sysret-noncanonical")
AMD_LIKE = (b"AuthenticAMD", b"HygonGenuine")
# Measured on kvm_pvm (test_fault_delivery.py pins the first two too): `int n`
# from user mode other than int3/int1 is #UD at the instruction, and a user
# `syscall` enters LSTAR without leaving CPL3, so the handler's hlt is #GP.
PVM_INT_N_IS_UD = {"gp-int-dpl0", "int80", "compat-int80", "compat-int3", "compat-into"}


@pytest.mark.kvm
@pytest.mark.parametrize("case", CASES)
def test_the_host_cpu_agrees_where_vendors_do(case):
    require_kvm()
    hw, _ = _run("hw", case)
    bt, _ = _run("bt", case)
    pvm = hostfit.kernel_mode_emulated()
    if case in VENDOR_CASES and _host_vendor() in AMD_LIKE:
        _check_amd(case, hw)
        assert bt != hw
    elif pvm and case in PVM_INT_N_IS_UD:
        _event(hw, 6, cs=vg.USER32_CS if case.startswith("compat") else vg.USER64_CS)
    elif pvm and case == "syscall-64":
        assert (hw["entry"], hw["vector"], hw["frame_cs"]) == (vg.ENTRY_IDT, 13, vg.USER64_CS)
    elif case == "int3-rf":
        # The RF an int3 pushes right after an RF=1 iretq: bt sets it (the
        # image is taken before the int3 completes); kvm_pvm's delivery clears it.
        assert hw == {**bt, "frame_rflags": hw["frame_rflags"]} and (hw["frame_rflags"] ^ bt["frame_rflags"]) & ~RF == 0
    else:
        assert hw == bt
