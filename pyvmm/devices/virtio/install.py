"""Puts the configured virtio devices on PCI bus 0: the board-level wiring
the builder calls for every engine (they all dispatch through the same
I/O and MMIO buses).

    wants_pci(config)          whether the machine gets a PCI bus at all
    attach(machine, irq)       host bridge at 0xCF8, then one virtio-blk per
                               drive (slot order = --drive order), one
                               virtio-net per --net, then virtio-rng; each function's INTA# on the GSI
                               host.intx_gsi(slot) gives, which the DSDT's
                               _PRT (pci/aml.py) tells the guest
    close(machine)             closes the disk images and network backends

A machine without drives or rng has no PCI bus, so its ACPI tables and
port map stay what they were before PCI existed.
"""

from __future__ import annotations

import logging
from typing import Callable

from ...config import VmConfig
from ...errors import ConfigError
from ...irq import IrqLine
from ..pci.host import attach_host_bridge, intx_gsi
from .transport.pci import VirtioPci

log = logging.getLogger(__name__)

CLASS_STORAGE_OTHER = 0x018000     # mass storage, other (what virtio-blk reports)
CLASS_OTHER = 0xFF0000             # unassigned class (virtio-rng)
CLASS_ETHERNET = 0x020000          # network controller, Ethernet (virtio-net)


def wants_pci(config: VmConfig) -> bool:
    return bool(config.drives or config.virtio_rng or getattr(config, "nets", None))


def attach(machine, irq: Callable[[int], IrqLine]) -> None:
    """Adds the PCI host bridge and the virtio devices of machine.config.
    `irq(gsi)` gives the line for a GSI. Raises ImageError for a drive
    that cannot be opened and ConfigError for two drives with one id."""
    from ...storage import open_image
    from .block import VirtioBlock
    from .rng import VirtioRng

    cfg = machine.config
    if not wants_pci(cfg):
        return
    bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
    machine.devices["pci_host"] = bridge
    names: set[str] = set()

    def plug(function: VirtioPci, name: str) -> None:
        slot = bridge.add(function, name)
        function.irq = irq(intx_gsi(slot))
        machine.devices[name.replace("-", "_")] = function
        log.info("PCI 00:%02x.0 %s, INTA# on GSI %d", slot, name, intx_gsi(slot))

    for i, drive in enumerate(cfg.drives):
        name = drive.id or f"virtio-blk{i}"
        if name in names:
            raise ConfigError(f"--drive id={name} is given twice")
        names.add(name)
        image = open_image(drive.file, drive.format, readonly=drive.readonly)
        try:
            plug(VirtioPci(VirtioBlock(machine.memory, image, serial=name, readonly=drive.readonly),
                           CLASS_STORAGE_OTHER), name)
        except BaseException:
            image.close()
            raise
    for i, net in enumerate(getattr(cfg, "nets", [])):
        name = net.id or f"virtio-net{i}"
        if name in names:
            raise ConfigError(f"--net id={name} is given twice")
        names.add(name)
        plug(_net_function(machine, net, i), name)
    if cfg.virtio_rng:
        plug(VirtioPci(VirtioRng(machine.memory), CLASS_OTHER), "virtio-rng")


def _net_function(machine, net, index: int) -> VirtioPci:
    """A virtio-net function on the backend `net` names. Raises NetError."""
    from ...net.tap import TapPort
    from .net import VirtioNet, default_mac, parse_mac
    port = TapPort(net.tap, machine.loop)
    try:
        device = VirtioNet(machine.memory, port, parse_mac(net.mac) if net.mac else default_mac(index))
        function = VirtioPci(device, CLASS_ETHERNET)
    except BaseException:
        port.close()
        raise
    device.wake = function.notify
    # Frames arrive on the event loop: the bus must hold the machine's lock
    # around this function's registers even with one vCPU (bus.py).
    function.INPUT_FROM_LOOP = True
    return function


def close(machine) -> None:
    """Closes every virtio-blk disk image (flushing what it buffered) and
    every virtio-net backend."""
    from .block import VirtioBlock
    from .net import VirtioNet
    for device in machine.devices.values():
        if isinstance(device, VirtioPci) and isinstance(device.device, VirtioBlock):
            device.device.image.close()
        elif isinstance(device, VirtioPci) and isinstance(device.device, VirtioNet):
            device.device.close()
