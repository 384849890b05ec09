"""A 64-bit raw guest that takes one device interrupt through the IOAPIC,
for the irqfd tests (test_virtio_mmio_eventfds, test_virtio_intx_irqfd).

The kernel masks both PICs, turns the local APIC on, routes IOAPIC pin
`pin` to VECTOR on APIC 0 and runs the test's `main` with interrupts on
and EBX counting interrupts; then it lets SETTLE_LOOPS pass with
interrupts on (time for a wrong extra one), stores EBX at `count` and
stops at the CHECKPOINT port.  The handler runs the test's `handler` for
VECTOR (after `inc ebx`, RAX pushed and free; label 5 is its EOI), EOIs
and returns; any other vector is stored at `count` and stops the guest.
run_with_cue runs it while a host thread tells it when the host saw what
the test waits for."""

from __future__ import annotations

import threading
import time

from ..modeguests import IDT_STUBS, idt_setup
from ..rawguest import build_guest, run_until_stop

CHECKPOINT = 0xE0
IDT = 0x180000
VECTOR = 0x41
SETTLE_LOOPS = 300000          # interrupts-on time at the end for a wrong extra interrupt
EDGE, LEVEL = 0, 0x8000        # IOAPIC redirection: trigger mode


def ioapic_guest(pin: int, trigger: int, main: str, handler: str, count: int) -> bytes:
    """The guest above; RDI holds the IOAPIC's base in `main`."""
    src = ".intel_syntax noprefix\n    cli\n" + idt_setup(IDT) + f"""
    mov al, 0xff; out 0x21, al; out 0xa1, al     # the PICs masked: only the IOAPIC speaks
    mov esi, 0xfee00000
    mov dword ptr [rsi + 0xf0], 0x1ff            # local APIC on
    mov edi, 0xfec00000
    mov dword ptr [rdi], {0x10 + 2 * pin}
    mov dword ptr [rdi + 0x10], {trigger | VECTOR}   # active high, unmasked
    mov dword ptr [rdi], {0x11 + 2 * pin}
    mov dword ptr [rdi + 0x10], 0                # to APIC 0
    xor ebx, ebx
    sti
""" + main + f"""
    mov ecx, {SETTLE_LOOPS}
8:  dec ecx
    jnz 8b
    cli
    mov dword ptr [{count}], ebx
    out {CHECKPOINT}, al
9:  hlt
    jmp 9b
common:
    push rax
    mov rax, [rsp + 8]
    cmp eax, {VECTOR}
    jne 6f
    inc ebx
""" + handler + f"""
5:  mov eax, 0xfee000b0
    mov dword ptr [rax], 0                       # EOI
    pop rax
    add rsp, 16
    iretq
6:  mov dword ptr [{count}], eax                 # an unexpected vector: report it
    out {CHECKPOINT}, al
    cli
    hlt
""" + IDT_STUBS
    return build_guest(src, "long")


def run_with_cue(m, ready, cue: int, wait_s: float, run_s: float, lands_s: float = 0.0) -> None:
    """Runs `m` until it stops (at most run_s) while a host thread polls
    ready() for up to wait_s, lets lands_s pass and writes 1 to the guest's
    u32 at `cue`, which the guest waits on."""
    def give_cue() -> None:
        deadline = time.monotonic() + wait_s
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(lands_s)
        m.memory.write_u32(cue, 1)
    helper = threading.Thread(target=give_cue, daemon=True)
    helper.start()
    run_until_stop(m, run_s)
    helper.join(5)
