"""An FT test guest with a virtio-blk disk and a virtio-net NIC (virtio-mmio,
32-bit Multiboot, no interrupts: it polls the used rings).

The disk is device 0 at 0xD0000000, the NIC device 1 at 0xD0001000; a
'.' on COM1 says both are set up.  For
every frame it receives (payload: u32 sequence number k) it writes sector
k + 1 full of the dword k and waits for the write to complete, reads that
sector and sector k (the one before, written for frame k - 1) back, and
echoes the frame with the addresses swapped and, after k: 'G' or 'B' (the
sector just written read back whole, or not), then the first dword of
sector k.  The echo leaves only after its write completed, so an echo
the outside saw vouches for a write the guest saw complete."""

from __future__ import annotations

from pathlib import Path

from tests.asm import multiboot_kernel

BLK, NET = 0xD0000000, 0xD0001000
# Rings (8 entries) and buffers, all below the 16 MiB of guest RAM.
BLK_Q, RX_Q, TX_Q = 0x300000, 0x310000, 0x320000
HDR, DATA, STATUS, READBACK = 0x330000, 0x331000, 0x332000, 0x333000
RXBUF, TXBUF = 0x340000, 0x350000
SECTOR_WORDS = 128


def _init(base: int) -> str:
    """Reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK."""
    return f"""
    mov ebx, {base:#x}
    mov dword ptr [ebx + 0x70], 0
    mov dword ptr [ebx + 0x70], 1
    mov dword ptr [ebx + 0x70], 3
    mov dword ptr [ebx + 0x24], 1
    mov dword ptr [ebx + 0x20], 1
    mov dword ptr [ebx + 0x24], 0
    mov dword ptr [ebx + 0x20], 0
    mov dword ptr [ebx + 0x70], 11
"""


def _queue(index: int, at: int) -> str:
    """Queue `index` of 8 entries: descriptors at `at`, avail +0x400, used +0x800."""
    return f"""
    mov dword ptr [ebx + 0x30], {index}
    mov dword ptr [ebx + 0x38], 8
    mov dword ptr [ebx + 0x80], {at:#x}
    mov dword ptr [ebx + 0x84], 0
    mov dword ptr [ebx + 0x90], {at + 0x400:#x}
    mov dword ptr [ebx + 0x94], 0
    mov dword ptr [ebx + 0xa0], {at + 0x800:#x}
    mov dword ptr [ebx + 0xa4], 0
    mov dword ptr [ebx + 0x44], 1
"""


def _desc(q: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> str:
    d = q + 16 * i
    return f"""
    mov dword ptr [{d:#x}], {addr:#x}
    mov dword ptr [{d + 4:#x}], 0
    mov dword ptr [{d + 8:#x}], {length}
    mov word ptr [{d + 12:#x}], {flags}
    mov word ptr [{d + 14:#x}], {nxt}
"""


def _offer_first(q: int, device: int, index: int) -> str:
    """Make descriptor 0 of queue `q` available and notify queue `index`
    of `device`; the new avail index stays in ax for the wait on used."""
    return f"""
    mov ax, word ptr [{q + 0x402:#x}]
    movzx ecx, ax
    and ecx, 7
    mov word ptr [{q + 0x404:#x} + ecx * 2], 0
    inc ax
    mov word ptr [{q + 0x402:#x}], ax
    mov dword ptr [{device + 0x50:#x}], {index}
"""


NEXT, WRITE = 1, 2

BODY = rf"""
.intel_syntax noprefix
    cli
    mov esp, 0x180000
{_init(BLK)}{_queue(0, BLK_Q)}
    mov dword ptr [ebx + 0x70], 15
{_init(NET)}{_queue(0, RX_Q)}{_queue(1, TX_Q)}
    mov dword ptr [ebx + 0x70], 15
{_desc(BLK_Q, 0, HDR, 16, NEXT, 1)}{_desc(BLK_Q, 1, DATA, 512, NEXT, 2)}{_desc(BLK_Q, 2, STATUS, 1, WRITE)}
{_desc(BLK_Q, 3, HDR, 16, NEXT, 4)}{_desc(BLK_Q, 4, READBACK, 512, NEXT | WRITE, 5)}{_desc(BLK_Q, 5, STATUS, 1, WRITE)}
{_desc(RX_Q, 0, RXBUF, 2048, WRITE)}
    xor esi, esi                      # blk requests made
    xor ebp, ebp                      # frames received
    call post_rx
    mov dx, 0x3f8                     # '.' on COM1: ready for frames
    mov al, '.'
    out dx, al
loop:
    cmp word ptr [{RX_Q + 0x802:#x}], bp
    je loop
    inc ebp
    mov eax, dword ptr [{RXBUF + 12 + 14:#x}]     # k
    mov dword ptr [0x360000], eax
    # write sector k + 1 full of k
    mov edi, {DATA:#x}
    mov ecx, {SECTOR_WORDS}
    rep stosd
    mov eax, dword ptr [0x360000]
    inc eax
    mov dword ptr [{HDR:#x}], 1       # OUT
    mov dword ptr [{HDR + 8:#x}], eax
    mov dword ptr [{HDR + 12:#x}], 0
    mov eax, 0
    call blk
    # read it back: every dword k?
    mov eax, dword ptr [0x360000]
    inc eax
    call blk_read
    mov byte ptr [0x360008], 'G'
    mov edi, {READBACK:#x}
    mov ecx, {SECTOR_WORDS}
    mov eax, dword ptr [0x360000]
    repe scasd
    je 1f
    mov byte ptr [0x360008], 'B'
1:  cmp byte ptr [{STATUS:#x}], 0
    je 2f
    mov byte ptr [0x360008], 'S'
2:  # sector k: what frame k - 1 wrote
    mov eax, dword ptr [0x360000]
    call blk_read
    # the echo: addresses swapped, k, verdict, sector k's first dword
    mov edi, {TXBUF:#x}
    xor eax, eax
    mov ecx, 3
    rep stosd
    mov esi, {RXBUF + 12 + 6:#x}
    mov ecx, 6
    rep movsb
    mov esi, {RXBUF + 12:#x}
    mov ecx, 6
    rep movsb
    mov esi, {RXBUF + 12 + 12:#x}
    mov ecx, 6
    rep movsb
    mov al, byte ptr [0x360008]
    mov byte ptr [{TXBUF + 12 + 18:#x}], al
    mov eax, dword ptr [{READBACK:#x}]
    mov dword ptr [{TXBUF + 12 + 19:#x}], eax
{_desc(TX_Q, 0, TXBUF, 12 + 60, 0)}{_offer_first(TX_Q, NET, 1)}3:  cmp word ptr [{TX_Q + 0x802:#x}], ax
    jne 3b
    call post_rx
    jmp loop

# blk_read: sector eax into READBACK
blk_read:
    mov dword ptr [{HDR:#x}], 0       # IN
    mov dword ptr [{HDR + 8:#x}], eax
    mov dword ptr [{HDR + 12:#x}], 0
    mov eax, 3
# blk: the chain at descriptor eax, then wait for its completion
blk:
    mov byte ptr [{STATUS:#x}], 0xff
    mov cx, word ptr [{BLK_Q + 0x402:#x}]
    movzx edx, cx
    and edx, 7
    mov word ptr [{BLK_Q + 0x404:#x} + edx * 2], ax
    inc cx
    mov word ptr [{BLK_Q + 0x402:#x}], cx
    mov dword ptr [{BLK + 0x50:#x}], 0
4:  cmp word ptr [{BLK_Q + 0x802:#x}], cx
    jne 4b
    inc dword ptr [0x360004]
    ret

post_rx:{_offer_first(RX_Q, NET, 0)}    ret
"""


def kernel() -> Path:
    return multiboot_kernel(BODY)
