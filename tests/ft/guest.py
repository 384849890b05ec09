"""A small FT test guest (32-bit Multiboot): PIT interrupts every 20 us of
guest time, RDTSC (and RDRAND in each tick) mixed into a checksum all the time, serial input polled
and echoed.  Every 4th tick prints '.'; each received byte is echoed and
mixed in; 'q' prints "SUM=<checksum> T=<ticks> N=<bytes>" and ends through
isa-debug-exit (port 0xf4, value 0)."""

from __future__ import annotations

from pathlib import Path

from tests.asm import multiboot_kernel


def timer_prologue(divisor: int) -> str:
    """Interrupts off, a stack, vector 0x20 -> `timer`, both 8259s set up
    with only IRQ 0 unmasked, and the PIT's channel 0 at `divisor`."""
    return rf"""
.intel_syntax noprefix
    cli
    mov esp, 0x180000
    lea eax, [timer]
    mov edi, 0x200000 + 0x20 * 8
    mov word ptr [edi], ax
    mov word ptr [edi + 2], cs
    mov word ptr [edi + 4], 0x8E00
    shr eax, 16
    mov word ptr [edi + 6], ax
    lidt [idtr]
    mov al, 0x11; out 0x20, al; mov al, 0x20; out 0x21, al; mov al, 4; out 0x21, al; mov al, 1; out 0x21, al
    mov al, 0x11; out 0xa0, al; mov al, 0x28; out 0xa1, al; mov al, 2; out 0xa1, al; mov al, 1; out 0xa1, al
    mov al, 0xfe; out 0x21, al
    mov al, 0xff; out 0xa1, al
    mov al, 0x34; out 0x43, al; mov al, {divisor & 0xFF}; out 0x40, al; mov al, {divisor >> 8}; out 0x40, al
"""


BODY = timer_prologue(24) + r"""
    xor esi, esi
    xor ebx, ebx
    xor ebp, ebp
    sti
main:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz idle
    mov dx, 0x3f8
    in al, dx
    out dx, al
    movzx eax, al
    imul esi, esi, 31
    add esi, eax
    add esi, ebx
    inc ebp
    cmp al, 'q'
    je done
idle:
    rdtsc
    xor esi, eax
    rol esi, 5
    jmp main
done:
    cli
    mov al, 'S'; call putc
    mov al, 'U'; call putc
    mov al, 'M'; call putc
    mov al, '='; call putc
    mov eax, esi; call puthex
    mov al, ' '; call putc
    mov al, 'T'; call putc
    mov al, '='; call putc
    mov eax, ebx; call puthex
    mov al, ' '; call putc
    mov al, 'N'; call putc
    mov al, '='; call putc
    mov eax, ebp; call puthex
    mov al, 10; call putc
    mov al, 0
    out 0xf4, al
    hlt
putc:
    mov dx, 0x3f8
    out dx, al
    ret
puthex:
    mov ecx, 8
1:  rol eax, 4
    push eax
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 7
2:  call putc
    pop eax
    loop 1b
    ret
timer:
    push eax
    push edx
    inc ebx
    rdtsc
    add esi, eax
    rdrand eax
    xor esi, eax
    test ebx, 3
    jnz 3f
    mov al, '.'
    mov dx, 0x3f8
    out dx, al
3:  mov al, 0x20
    out 0x20, al
    pop edx
    pop eax
    iret
.align 8
idtr:
    .word 256 * 8 - 1
    .long 0x200000
"""


def kernel() -> Path:
    """The guest as a Multiboot ELF (assembled once per call)."""
    return multiboot_kernel(BODY)
