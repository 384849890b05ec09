"""Putting the `--drive ...,if=ide` disks on the board: the PIIX IDE
function on PCI bus 0, its primary channel at 0x1F0/0x3F6 (IRQ 14) and its
secondary at 0x170/0x376 (IRQ 15), each drive at the position its index
names (bus * 2 + unit).  A channel without disks is left off the bus."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...irq import IrqLine
from .piix import CHANNELS, piix_ide_function, place_channel

log = logging.getLogger(__name__)


def attach(machine, irq: Callable[[int], IrqLine]) -> None:
    """Adds the IDE controller and disks of machine.config.ide_drives, if
    any. Raises ImageError for an image that cannot be opened, ConfigError
    for two drives on one position."""
    from ...config import ide_positions
    from ...storage import open_image
    from ..pci.host import attach_host_bridge
    from ..virtio.iothread import IoThread

    drives = getattr(machine.config, "ide_drives", None)
    if not drives:
        return
    images: list = [None] * 4
    for drive, index in zip(drives, ide_positions(drives)):
        image = open_image(drive.file, drive.format, readonly=drive.readonly)
        if getattr(drive, "cache", "writeback") != "writeback":
            from ...storage.cache import CachedImage
            image = CachedImage(image, drive.cache)
        machine.closers.append(image.close)      # qcow2/VMDK metadata reaches the file
        images[index] = image
    decode = (images[0] is not None or images[1] is not None, images[2] is not None or images[3] is not None)
    bridge = machine.devices.get("pci_host")
    if bridge is None:
        bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
        machine.devices["pci_host"] = bridge
    function, bus_master = piix_ide_function(machine.memory, decode)
    slot = bridge.add(function, "piix-ide")
    machine.devices["ide_function"] = function
    machine.devices["ide_bus_master"] = bus_master
    for index, (command, _, line) in enumerate(CHANNELS):
        if not decode[index]:
            continue
        channel = place_channel(machine.io_bus, index, irq(line), images[2 * index], images[2 * index + 1])
        bus_master.attach(index, channel)
        machine.devices[f"ide{index}"] = channel
        log.info("PCI 00:%02x.0 piix-ide; channel %d at %#x, IRQ %d: %s", slot, index, command, line,
                 ", ".join(f"{unit} {disk.sectors} sectors" for unit, disk in zip(("master", "slave"), channel.disks)
                           if disk is not None))
    if not machine.config.deterministic:
        # The disk work of DMA off the vCPU thread; a deterministic run (FT)
        # keeps each transfer inside the access that starts it.
        bus_master.use_io_thread(IoThread("pyvmm-io-ide"), machine.loop.call_soon_threadsafe, machine.lock)
        machine.drains.append(bus_master.drain)   # a pause waits for a transfer in flight
    # Before the images close: the disk work submitted reaches them first.
    machine.closers.insert(0, bus_master.stop_io)
