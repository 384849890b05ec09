"""The PIIX3 IDE function (8086:7010) in compatibility mode, and placing
its channels where every PC driver looks: the primary's command block at
0x1F0, control block at 0x3F6, INTRQ on ISA IRQ 14; the secondary's at
0x170 and 0x376, IRQ 15.

In compatibility mode (programming interface 0x80: both channels legacy,
bus mastering advertised) the channel ports are fixed and need no BARs;
the function exists so that PCI drivers (Linux's ata_piix, SeaBIOS's ATA
driver) find a controller to bind. BAR 4 is the bus-master block
(busmaster.py), which carries both channels' DMA commands (the
secondary's registers at +8) once PCI bus mastering is on.
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
SECONDARY_COMMAND, SECONDARY_CONTROL, SECONDARY_IRQ = 0x170, 0x376, 15
# Per channel (0 primary, 1 secondary): command block, control block, IRQ.
CHANNELS = ((PRIMARY_COMMAND, PRIMARY_CONTROL, PRIMARY_IRQ),
            (SECONDARY_COMMAND, SECONDARY_CONTROL, SECONDARY_IRQ))
BUS_MASTER_PORTS = PORTS
IDETIM_PRIMARY, IDETIM_SECONDARY, IDETIM_DECODE = 0x40, 0x42, 0x8000


def piix_ide_function(memory=None, decode: tuple[bool, bool] = (True, False)) -> tuple[PciFunction, IdeBusMaster]:
    """The PCI function (class 0x0101) with its bus-master BAR 4 (DMA into
    GuestMemory `memory`; None: no DMA), and the IDE timing registers with
    the decode of the channels `decode` names (primary, secondary: those
    with disks) already enabled, as firmware leaves it: Linux's ata_piix
    skips a channel whose enable bit (IDETIM bit 15) is clear, and under a
    direct kernel boot no BIOS sets it.  A channel without disks stays
    disabled."""
    function = PciFunction(INTEL, PIIX3_IDE, (CLASS_IDE << 8) | PROG_IF, interrupt_pin=0)
    function.add_register(IDETIM_PRIMARY, 2, IDETIM_DECODE if decode[0] else 0, 0xFFFF)
    function.add_register(IDETIM_SECONDARY, 2, IDETIM_DECODE if decode[1] else 0, 0xFFFF)
    bus_master = IdeBusMaster(memory, lambda: bool(function.config[COMMAND] & CMD_MASTER))
    function.add_bar(4, BUS_MASTER_PORTS, "io", bus_master)
    return function, bus_master


def place_channel(io_bus: Bus, index: int, irq: IrqLine, master=None, slave=None) -> IdeChannel:
    """An IdeChannel (index 0 primary, 1 secondary) with images `master`
    and `slave` (None: that position is empty) as its disks, at the
    channel's legacy ports; `irq` is its line (CHANNELS names the IRQ).
    Raises BusError when those ports are taken."""
    disks = [None if image is None else AtaDisk(image, serial=f"PYVMM-ATA-{2 * index + unit}")
             for unit, image in enumerate((master, slave))]
    channel = IdeChannel(irq, *disks)
    command, control, _ = CHANNELS[index]
    io_bus.insert(command, 8, channel.command, f"ide{index}-command")
    io_bus.insert(control, 1, channel.control, f"ide{index}-control")
    return channel


def place_primary_channel(io_bus: Bus, irq: IrqLine, image) -> IdeChannel:
    """The primary channel with `image` as its master disk."""
    return place_channel(io_bus, 0, irq, image)


__all__ = ["CHANNELS", "PRIMARY_IRQ", "SECONDARY_IRQ", "piix_ide_function", "place_channel",
           "place_primary_channel"]
