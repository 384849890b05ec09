"""The PIIX3 IDE function (8086:7010) in compatibility mode, and placing
its primary channel where every PC driver looks: command block at 0x1F0,
control block at 0x3F6, INTRQ on ISA IRQ 14.

In compatibility mode (programming interface 0x80: both channels legacy,
bus mastering advertised) the channel ports are fixed and need no BARs;
the function exists so that PCI drivers (Linux's ata_piix, SeaBIOS's ATA
driver) find a controller to bind. BAR 4 is the bus-master block
(busmaster.py), which carries the channel's DMA commands once PCI bus
mastering is on.
"""

from __future__ import annotations

from ...bus import Bus
from ...irq import IrqLine
from ..pci.function import CMD_MASTER, COMMAND, PciFunction
from .ata import AtaDisk, IdeChannel
from .busmaster import PORTS, IdeBusMaster

INTEL, PIIX3_IDE = 0x8086, 0x7010
CLASS_IDE = 0x0101
PROG_IF = 0x80                       # compatibility mode on both channels, bus-master capable
PRIMARY_COMMAND, PRIMARY_CONTROL, PRIMARY_IRQ = 0x1F0, 0x3F6, 14
BUS_MASTER_PORTS = PORTS
IDETIM_PRIMARY, IDETIM_SECONDARY, IDETIM_DECODE = 0x40, 0x42, 0x8000


def piix_ide_function(memory=None) -> tuple[PciFunction, IdeBusMaster]:
    """The PCI function (class 0x0101) with its bus-master BAR 4 (DMA into
    GuestMemory `memory`; None: no DMA), and the
    IDE timing registers with the primary channel's decode already enabled,
    as firmware leaves it: Linux's ata_piix skips a channel whose enable
    bit (IDETIM bit 15) is clear, and under a direct kernel boot no BIOS
    sets it.  The secondary channel has no disk here and stays disabled."""
    function = PciFunction(INTEL, PIIX3_IDE, (CLASS_IDE << 8) | PROG_IF, interrupt_pin=0)
    function.add_register(IDETIM_PRIMARY, 2, IDETIM_DECODE, 0xFFFF)
    function.add_register(IDETIM_SECONDARY, 2, 0, 0xFFFF)
    bus_master = IdeBusMaster(memory, lambda: bool(function.config[COMMAND] & CMD_MASTER))
    function.add_bar(4, BUS_MASTER_PORTS, "io", bus_master)
    return function, bus_master


def place_primary_channel(io_bus: Bus, irq: IrqLine, image) -> IdeChannel:
    """An IdeChannel with `image` as its master disk, at the legacy ports.
    Raises BusError when those ports are taken."""
    channel = IdeChannel(irq, AtaDisk(image))
    io_bus.insert(PRIMARY_COMMAND, 8, channel.command, "ide0-command")
    io_bus.insert(PRIMARY_CONTROL, 1, channel.control, "ide0-control")
    return channel


__all__ = ["PRIMARY_IRQ", "piix_ide_function", "place_primary_channel"]
