"""The PIIX3 IDE function (8086:7010) in compatibility mode, and placing
its primary channel where every PC driver looks: command block at 0x1F0,
control block at 0x3F6, INTRQ on ISA IRQ 14.

In compatibility mode (programming interface 0x80: both channels legacy,
bus mastering advertised) the channel ports are fixed and need no BARs;
the function exists so that PCI drivers (Linux's ata_piix, SeaBIOS's ATA
driver) find a controller to bind. BAR 4, the bus-master block, is there
with its 16 ports, but the disk offers no DMA mode in IDENTIFY, so
drivers use PIO and its registers only need to read back sane values.
"""

from __future__ import annotations

from ...bus import Bus
from ...device import as_hex, restore_state, saved
from ...irq import IrqLine
from ..pci.function import PciFunction
from .ata import AtaDisk, IdeChannel

INTEL, PIIX3_IDE = 0x8086, 0x7010
CLASS_IDE = 0x0101
PROG_IF = 0x80                       # compatibility mode on both channels, bus-master capable
PRIMARY_COMMAND, PRIMARY_CONTROL, PRIMARY_IRQ = 0x1F0, 0x3F6, 14
BUS_MASTER_PORTS = 16
IDETIM_PRIMARY, IDETIM_SECONDARY, IDETIM_DECODE = 0x40, 0x42, 0x8000


class BusMasterStub:
    """The bus-master register block (command, status, PRD pointer per
    channel) as plain storage: no transfer is ever started, since the disk
    offers no DMA mode; status bits 5-6 (drive DMA capable) read back as the
    BIOS or driver set them."""

    STATE_VERSION = 1

    def __init__(self) -> None:
        self.regs = bytearray(BUS_MASTER_PORTS)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")
        for i, byte in enumerate(data):
            reg = offset + i
            if reg >= BUS_MASTER_PORTS:
                break
            kind = reg % 8
            if kind == 0:            # command: start/stop and direction
                self.regs[reg] = byte & 0x09
            elif kind == 2:          # status: interrupt and error are write-1-to-clear, bits 5-6 plain
                cur = self.regs[reg] & ~(byte & 0x06)
                self.regs[reg] = (cur & ~0x60) | (byte & 0x60)
            elif kind >= 4:          # PRD table address, dword aligned
                self.regs[reg] = byte & 0xFC if kind == 4 else byte

    def reset(self) -> None:
        self.regs[:] = bytes(BUS_MASTER_PORTS)

    def save(self) -> dict:
        return saved(self, {"regs": self.regs.hex()})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            regs = as_hex(s["regs"])
            if len(regs) != BUS_MASTER_PORTS:
                raise ValueError(f"{len(regs)} bus-master registers")
            self.regs[:] = regs
        restore_state(self, state, load)


def piix_ide_function() -> tuple[PciFunction, BusMasterStub]:
    """The PCI function (class 0x0101) with its bus-master BAR 4, and the
    IDE timing registers with the primary channel's decode already enabled,
    as firmware leaves it: Linux's ata_piix skips a channel whose enable
    bit (IDETIM bit 15) is clear, and under a direct kernel boot no BIOS
    sets it.  The secondary channel has no disk here and stays disabled."""
    function = PciFunction(INTEL, PIIX3_IDE, (CLASS_IDE << 8) | PROG_IF, interrupt_pin=0)
    function.add_register(IDETIM_PRIMARY, 2, IDETIM_DECODE, 0xFFFF)
    function.add_register(IDETIM_SECONDARY, 2, 0, 0xFFFF)
    stub = BusMasterStub()
    function.add_bar(4, BUS_MASTER_PORTS, "io", stub)
    return function, stub


def place_primary_channel(io_bus: Bus, irq: IrqLine, image) -> IdeChannel:
    """An IdeChannel with `image` as its master disk, at the legacy ports.
    Raises BusError when those ports are taken."""
    channel = IdeChannel(irq, AtaDisk(image))
    io_bus.insert(PRIMARY_COMMAND, 8, channel.command, "ide0-command")
    io_bus.insert(PRIMARY_CONTROL, 1, channel.control, "ide0-control")
    return channel


__all__ = ["PRIMARY_IRQ", "BusMasterStub", "piix_ide_function", "place_primary_channel"]
