"""Putting the `--drive ...,if=ide` disk on the board: the PIIX IDE
function on PCI bus 0 and its primary channel at 0x1F0/0x3F6, IRQ 14."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...irq import IrqLine
from .piix import PRIMARY_IRQ, piix_ide_function, place_primary_channel

log = logging.getLogger(__name__)


def attach(machine, irq: Callable[[int], IrqLine]) -> None:
    """Adds the IDE controller and disk of machine.config.ide_drives, if
    any. Raises ImageError for an image that cannot be opened."""
    from ...storage import open_image
    from ..pci.host import attach_host_bridge

    drives = getattr(machine.config, "ide_drives", None)
    if not drives:
        return
    drive = drives[0]
    image = open_image(drive.file, drive.format, readonly=drive.readonly)
    if getattr(drive, "cache", "writeback") != "writeback":
        from ...storage.cache import CachedImage
        image = CachedImage(image, drive.cache)
    bridge = machine.devices.get("pci_host")
    if bridge is None:
        bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
        machine.devices["pci_host"] = bridge
    function, bus_master = piix_ide_function(machine.memory)
    slot = bridge.add(function, "piix-ide")
    channel = place_primary_channel(machine.io_bus, irq(PRIMARY_IRQ), image)
    bus_master.attach(0, channel)
    machine.devices["ide_function"] = function
    machine.devices["ide_bus_master"] = bus_master
    machine.devices["ide0"] = channel
    machine.closers.append(image.close)      # qcow2/VMDK metadata reaches the file
    log.info("PCI 00:%02x.0 piix-ide; ATA disk %s (%d sectors) at 0x1f0, IRQ %d",
             slot, drive.file, channel.master.sectors, PRIMARY_IRQ)
