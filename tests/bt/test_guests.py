"""Small machine-level guests on the bt engine: real, protected and long
mode code printing to a fake UART, HLT stops, exceptions reaching guest
handlers, self-modifying code."""

from __future__ import annotations

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(__file__))
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")

import harness  # noqa: E402

from pyvmm.boot.entry import long_mode_64, protected_mode_32, real_mode  # noqa: E402
from pyvmm.bus import Bus  # noqa: E402
from pyvmm.config import VmConfig  # noqa: E402
from pyvmm.engines.bt.engine import BtEngine, execute_one  # noqa: E402
from pyvmm.cli.exitcodes import EXIT_HALTED, exit_code  # noqa: E402
from pyvmm.machine import Machine, StopReason  # noqa: E402
from pyvmm.memory import GuestMemory  # noqa: E402
from tests.asm import PollingUart  # noqa: E402



def make_machine(cfg: VmConfig | None = None):
    """A bt machine with 16 MiB and a polling UART at 0x3f8: (machine, engine, uart)."""
    cfg = cfg or VmConfig(engine="bt", mem_mib=16)
    lock = threading.RLock()
    m = Machine(cfg, GuestMemory(16 << 20), Bus("io", lock), Bus("mmio", lock), lock)
    uart = PollingUart()
    m.io_bus.insert(0x3F8, 8, uart, "uart")
    eng = BtEngine(m)
    m.engine = eng
    eng.prepare()
    return m, eng, uart


def run_guest(m, eng, state):
    eng.load_state(0, state)
    eng.run()
    return eng.save_state(0)


PRINT64 = """
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:
"""


def test_long_mode_hello():
    m, eng, uart = make_machine()
    code = harness.assemble(f"""
    lea rsi, [rip + msg]
    {PRINT64}
    mov rbx, 0x1122334455667788
    cli
    hlt
msg: .asciz "hello from long mode\\n"
""")
    m.memory.write(0x100000, code)
    st = run_guest(m, eng, long_mode_64(m.memory, 0x100000))
    assert bytes(uart.out) == b"hello from long mode\n"
    assert m.stop_status.reason == StopReason.HALTED
    assert exit_code(m.stop_status) == EXIT_HALTED
    assert st.regs["rbx"] == 0x1122334455667788


def test_protected_mode_32_loop_and_calls():
    m, eng, uart = make_machine()
    code = harness.assemble("""
    mov esp, 0x90000
    mov ecx, 10
    xor eax, eax
1:  call add_it
    loop 1b
    mov dx, 0x3f8
    add al, '0' - 55 + 'A' - 'A'
    out dx, al
    hlt
add_it:
    add eax, ecx
    ret
""", bits=32)
    m.memory.write(0x100000, code)
    st = run_guest(m, eng, protected_mode_32(m.memory, 0x100000))
    assert st.regs["rax"] & 0xFFFFFF00 == 0
    assert uart.out == bytes([(55 + ord("0") - 55) & 0xFF])
    assert m.stop_status.reason == StopReason.HALTED


def test_real_mode_segments_and_ivt():
    m, eng, uart = make_machine()
    # Handler for int 0x21 prints AL; IVT entry at 0x84.
    code = harness.assemble("""
    .code16
    mov ax, 0x1000
    mov ss, ax
    mov sp, 0x100
    xor ax, ax
    mov ds, ax
    mov word ptr [0x84], offset handler
    mov word ptr [0x86], 0x0000
    mov al, 'R'
    int 0x21
    mov al, 'M'
    int 0x21
    cli
    hlt
handler:
    mov dx, 0x3f8
    out dx, al
    iret
""", bits=16)
    # Assembled for offset 0: load at linear 0 + 0x7c00 with CS=0 would shift
    # labels, so run it at CS:IP = 0x0000:0x0000 placed at 0x0.
    m.memory.write(0x8000, code)
    st = real_mode(0x0800, 0x0000)
    fixed = harness.assemble(".code16\n.org 0\n" + "", bits=16)
    # handler offset is relative to CS=0x800 -> write IVT segment 0x800
    code2 = code.replace(b"\xc7\x06\x86\x00\x00\x00", b"\xc7\x06\x86\x00\x00\x08")
    m.memory.write(0x8000, code2)
    run_guest(m, eng, st)
    assert bytes(uart.out) == b"RM"
    assert m.stop_status.reason == StopReason.HALTED


def _idt64(mem, base, vectors: dict[int, int]) -> None:
    for vec, handler in vectors.items():
        lo = (handler & 0xFFFF) | (0x10 << 16) | (0x8E << 40) | ((handler >> 16) & 0xFFFF) << 48
        hi = handler >> 32
        mem.write_u64(base + vec * 16, lo)
        mem.write_u64(base + vec * 16 + 8, hi)


def test_long_mode_exceptions_reach_guest_handlers():
    m, eng, uart = make_machine()
    code = harness.assemble("""
    mov rsp, 0x80000
    ud2
    mov al, 'A'
    out 0x80, al
    xor ecx, ecx
    mov eax, 1
    div ecx
    mov byte ptr [0x7ffffff0], 1
    cli
    hlt
ud_handler:
    mov al, 'U'
    mov dx, 0x3f8
    out dx, al
    add qword ptr [rsp], 2
    iretq
de_handler:
    mov al, 'D'
    mov dx, 0x3f8
    out dx, al
    add qword ptr [rsp], 2
    iretq
pf_handler:
    mov al, 'P'
    mov dx, 0x3f8
    out dx, al
    mov rax, cr2
    cli
    hlt
""")
    base = 0x100000
    m.memory.write(base, code)
    st = long_mode_64(m.memory, base)
    ud = base + code.index(b"\xb0U")
    de = base + code.index(b"\xb0D")
    pf = base + code.index(b"\xb0P")
    _idt64(m.memory, 0x2000, {6: ud, 0: de, 14: pf})
    st.idt.base, st.idt.limit = 0x2000, 16 * 32 - 1
    # Leave 0x7ffffff0 unmapped: only the first GiB stays mapped.
    m.memory.write_u64(0xA000 + 8, 0)
    out = run_guest(m, eng, st)
    assert bytes(uart.out) == b"UDP"
    assert out.cr2 == 0x7FFFFFF0
    assert out.regs["rax"] == 0x7FFFFFF0


def test_self_modifying_code():
    m, eng, uart = make_machine()
    code = harness.assemble("""
    mov ecx, 3
1:  mov al, 'a'
patch = . - 1
    mov dx, 0x3f8
    out dx, al
    inc byte ptr [rip + patch_ref]
    dec ecx
    jnz 1b
    cli
    hlt
""".replace("patch_ref", "patch"))
    m.memory.write(0x100000, code)
    run_guest(m, eng, long_mode_64(m.memory, 0x100000))
    assert bytes(uart.out) == b"abc"


def test_smc_within_one_block():
    """A store into the next instruction of the same block takes effect."""
    m, eng, uart = make_machine()
    code = harness.assemble("""
    mov byte ptr [rip + target + 1], 'Z'
target:
    mov al, 'Y'
    mov dx, 0x3f8
    out dx, al
    cli
    hlt
""")
    m.memory.write(0x100000, code)
    run_guest(m, eng, long_mode_64(m.memory, 0x100000))
    assert bytes(uart.out) == b"Z"


def test_vmm_write_invalidates_translation():
    m, eng, uart = make_machine()
    code = harness.assemble("mov al, 'x'\n mov dx, 0x3f8\n out dx, al\n cli\n hlt\n")
    m.memory.write(0x100000, code)
    run_guest(m, eng, long_mode_64(m.memory, 0x100000))
    m.memory.write(0x100001, b"y")
    m.stop_status = None
    run_guest(m, eng, long_mode_64(m.memory, 0x100000))
    assert bytes(uart.out) == b"xy"
    assert eng.stats()["invalidations"] >= 1


def test_execute_one():
    mem = GuestMemory(16 << 20)
    mem.write(0x100000, harness.assemble("lock cmpxchg16b [rdi]\n"))
    st = long_mode_64(mem, 0x100000)
    st.regs.update(rdi=0x200000, rax=1, rdx=2, rbx=0xAAAA, rcx=0xBBBB)
    mem.write_u64(0x200000, 1)
    mem.write_u64(0x200008, 2)
    out = execute_one(st, mem, Bus("io"), Bus("mmio"))
    assert mem.read_u64(0x200000) == 0xAAAA and mem.read_u64(0x200008) == 0xBBBB
    assert out.rflags & 0x40
    assert out.rip == 0x100000 + 5
