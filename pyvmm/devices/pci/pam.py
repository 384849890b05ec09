"""The i440FX's Programmable Attribute Map (PAM) registers.

Host bridge config bytes 0x59-0x5F say, per range of 0xC0000-0xFFFFF,
whether reads and writes go to RAM (shadow RAM) or to the ROM/PCI behind
it: 0x59 bits 5:4 for 0xF0000-0xFFFFF, then two 16 KiB ranges per byte
(bits 1:0 and 5:4) from 0xC0000 up (Intel 82441FX datasheet, 3.2.15).
Bit 0 of a pair enables reads from RAM, bit 1 writes.

SeaBIOS turns them to RAM, copies itself from the top-of-4-GiB alias and
turns them back to read-only.  Writes follow the registers: where the
write bit is clear the guest's write goes to ROM, i.e. nowhere
(GuestMemory.write_ignored: bt and hybrid drop them; hw maps the range
as read-only KVM slots, engines/kvm/shadowslots.py).  Reads always come
from RAM: what the low range holds is boot/firmware.py's business
(preloaded RAM, the same bytes either way).  A machine reset rebuilds the
bridge, so they start at 0 (all ROM) again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .function import PciFunction

if TYPE_CHECKING:
    from ...memory import GuestMemory

PAM_FIRST, PAM_COUNT = 0x59, 7
PAM_WRITABLE = 0x33          # both 2-bit fields of a byte (0x59's low one is reserved)
PAM0_WRITABLE = 0x30


def enable_pam(host: PciFunction, memory: GuestMemory | None = None) -> None:
    """Makes the PAM registers of `host` (the 00:00.0 i440FX) writable;
    with `memory` (a GuestMemory), guest writes to the ranges whose write
    bit is clear are ignored from then on, starting now."""
    host._set_mask(PAM_FIRST, 1, PAM0_WRITABLE)
    host._set_mask(PAM_FIRST + 1, PAM_COUNT - 1, int.from_bytes(bytes([PAM_WRITABLE] * (PAM_COUNT - 1)), "little"))
    if memory is not None:
        _follow_writes(host, memory)


def write_ignored_pages(host: PciFunction) -> frozenset[int]:
    """The page frames of 0xC0000-0xFFFFF that PAM does not let writes reach."""
    return frozenset(page for start, length, _, writes in pam_ram_ranges(host) if not writes
                     for page in range(start >> 12, (start + length) >> 12))


def _follow_writes(host: PciFunction, memory: GuestMemory) -> None:
    """Keeps memory.write_ignored in step with the registers through every
    way they change: a config write, a bridge reset, a snapshot restore.
    The function's own methods are wrapped, since PciFunction has no hook
    for device-specific registers."""
    def sync() -> None:
        memory.set_write_ignored(write_ignored_pages(host))

    config_write, reset, restore = host.config_write, host.reset, host.restore

    def pam_config_write(offset: int, size: int, value: int) -> None:
        config_write(offset, size, value)
        if offset < PAM_FIRST + PAM_COUNT and offset + size > PAM_FIRST:
            sync()

    def pam_reset() -> None:
        reset()
        sync()

    def pam_restore(state: dict) -> None:
        restore(state)
        sync()

    host.config_write, host.reset, host.restore = pam_config_write, pam_reset, pam_restore
    sync()


def pam_ram_ranges(host: PciFunction) -> list[tuple[int, int, bool, bool]]:
    """(start, length, reads from RAM, writes to RAM) for each PAM range, in address order."""
    out = []
    for i in range(PAM_COUNT - 1):
        value = host.config[PAM_FIRST + 1 + i]
        for half in range(2):
            bits = (value >> (4 * half)) & 0x3
            out.append((0xC0000 + (2 * i + half) * 0x4000, 0x4000, bool(bits & 1), bool(bits & 2)))
    bits = (host.config[PAM_FIRST] >> 4) & 0x3
    out.append((0xF0000, 0x10000, bool(bits & 1), bool(bits & 2)))
    return out


__all__ = ["PAM_COUNT", "PAM_FIRST", "enable_pam", "pam_ram_ranges", "write_ignored_pages"]
