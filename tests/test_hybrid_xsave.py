"""The AVX state under hybrid: the kernel (bt) enables XCR0 = x87|SSE|AVX
with XSETBV and loads YMM registers with XRSTOR; user code (KVM, run by the
host CPU) must find them, and what user code leaves in them must come back
to the kernel (hybrid/switch.py: KVM_SET_XCRS, KVM_GET/SET_XSAVE).

The user half XSAVEs natively what the kernel loaded, then XRSTORs a second
pattern and makes a system call; the kernel XSAVEs what it finds."""

from __future__ import annotations

import struct

import pytest

from pyvmm.cli.exitcodes import exit_code
from pyvmm.config import VmConfig
from pyvmm.engines.bt import cpumodel
from pyvmm.engines.kvm.state import get_xcr0

from .modeguests import DATA, SYSCALL_SETUP, USTACK, boot_for, enter_user
from .rawguest import build_guest, require_kvm, run_machine

KERNEL_LOADS, USER_SAW, KERNEL_SAW, USER_LOADS, USER_CPUID = (DATA + 0x1000 * i for i in range(1, 6))

SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + f"""    mov rax, cr4
    or eax, 0x40600
    mov cr4, rax
    xor ecx, ecx
    mov eax, 7
    xor edx, edx
    xsetbv
    xrstor [{KERNEL_LOADS:#x}]
""" + enter_user() + f"""sys_entry:
    mov eax, 7
    xor edx, edx
    xsave [{KERNEL_SAW:#x}]
    cli
    hlt
user:
    mov eax, 7
    xor edx, edx
    xsave [{USER_SAW:#x}]
    xrstor [{USER_LOADS:#x}]
    mov eax, 1
    cpuid
    mov [{USER_CPUID:#x}], ecx
    mov eax, 0xd
    xor ecx, ecx
    cpuid
    mov [{USER_CPUID + 4:#x}], ebx
    syscall
"""


def _area(seed: int) -> tuple[bytes, list[int], list[int]]:
    """A standard-form XSAVE area with every component in use."""
    xmm = [(seed * 0x1000193 + i) << 64 | (i + 1) for i in range(16)]
    ymmh = [(seed << 96) | (0xFEED0000 + i) << 32 | i for i in range(16)]
    area = bytearray(832)
    struct.pack_into("<HHB", area, 0, 0x37F, 0, 0)
    struct.pack_into("<II", area, 24, 0x1F80, 0xFFFF)
    for i in range(16):
        area[160 + 16 * i:176 + 16 * i] = xmm[i].to_bytes(16, "little")
        area[576 + 16 * i:592 + 16 * i] = ymmh[i].to_bytes(16, "little")
    struct.pack_into("<Q", area, 512, 7)
    return bytes(area), xmm, ymmh


def _registers(area: bytes) -> tuple[int, list[int], list[int]]:
    bv = struct.unpack_from("<Q", area, 512)[0]
    xmm = [int.from_bytes(area[160 + 16 * i:176 + 16 * i], "little") for i in range(16)]
    ymmh = [int.from_bytes(area[576 + 16 * i:592 + 16 * i], "little") for i in range(16)]
    return bv, xmm, ymmh


@pytest.mark.kvm
def test_ymm_state_and_xcr0_cross_between_kernel_and_user(monkeypatch):
    require_kvm()
    # The AVX state component is offered with the AVX instructions; XSAVE
    # moves it whether or not the translator has those yet.
    implemented = cpumodel.implemented()
    monkeypatch.setattr(cpumodel, "implemented", lambda: implemented | {"avx"})
    kernel_area, kxmm, kymmh = _area(1)
    user_area, uxmm, uymmh = _area(2)
    code = build_guest(SOURCE.format(ustack=USTACK), "long")
    boot = boot_for(code)

    def boot_with_areas(memory):
        result = boot(memory)
        memory.write(KERNEL_LOADS, kernel_area)
        memory.write(USER_LOADS, user_area)
        return result

    cfg = VmConfig(mem_mib=64, engine="hybrid", irqchip=False, no_reboot=True)
    machine, _ = run_machine(cfg, boot_with_areas, timeout=120,
                             inspect=lambda m: (m.memory.read(USER_SAW, 832), m.memory.read(KERNEL_SAW, 832),
                                                get_xcr0(m.engine.switches[0].vcpu),
                                                m.memory.read(USER_CPUID, 8)))
    assert exit_code(machine.stop_status) == 4, f"the guest did not finish: {machine.stop_status}"
    user_saw, kernel_saw, kvm_xcr0, user_cpuid = machine.inspected
    # KVM's XCR0 is the kernel's (kvm_pvm runs user code with the host's
    # XCR0 whatever KVM holds, so the state below alone would not show it).
    assert kvm_xcr0 == 7
    # User CPUID (faulted back to bt) follows the kernel's CR4 and XCR0 too.
    leaf1_ecx, xsave_size = struct.unpack("<II", user_cpuid)
    assert leaf1_ecx >> 27 & 1 and leaf1_ecx >> 28 & 1       # OSXSAVE, AVX
    assert xsave_size == 832                                  # 0xD.0:EBX for XCR0 = 7
    bv, xmm, ymmh = _registers(user_saw)
    assert bv & 6 == 6, hex(bv)                       # SSE and AVX in use on the host CPU (x87 initial)
    assert (xmm, ymmh) == (kxmm, kymmh)
    bv, xmm, ymmh = _registers(kernel_saw)
    assert bv == 6, hex(bv)
    assert (xmm, ymmh) == (uxmm, uymmh)               # and the kernel gets back what user code left
