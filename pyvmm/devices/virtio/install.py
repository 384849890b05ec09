"""Puts the configured virtio devices on PCI bus 0: the board-level wiring
the builder calls for every engine (they all dispatch through the same
I/O and MMIO buses).

    wants_pci(config)          whether the machine gets a PCI bus at all
    attach(machine, irq)       host bridge at 0xCF8, then one virtio-blk per
                               drive (slot order = --drive order), one
                               virtio-net per --net, then virtio-rng; each function's INTA# on the GSI
                               host.intx_gsi(slot) gives, which the DSDT's
                               _PRT (pci/aml.py) tells the guest, and its
                               MSI-X messages to engine.signal_msi
    close(machine)             closes the disk images and network backends

A machine without drives or rng has no PCI bus, so its ACPI tables and
port map stay what they were before PCI existed.  With --transport mmio
there is no PCI bus either: device i is a virtio-mmio page at MMIO_BASE +
4 KiB * i on ISA IRQ MMIO_IRQS[i], which with_mmio_cmdline() (called by the
builder) announces on the Linux command line.
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

# Class codes as QEMU gives its virtio functions (the virtio spec leaves them
# open; tests/devices/test_virtio_linux.py compares with a QEMU guest's view).
CLASS_STORAGE_SCSI = 0x010000      # mass storage, SCSI (what virtio-blk reports)
CLASS_OTHER = 0x00FF00             # unclassified device, other (virtio-rng)
CLASS_ETHERNET = 0x020000          # network controller, Ethernet (virtio-net)
CLASS_COMMUNICATION_OTHER = 0x078000   # simple communication controller, other (virtio-console)


def wants_virtio(config: VmConfig) -> bool:
    return bool(config.drives or config.virtio_rng or getattr(config, "nets", None)
                or getattr(config, "virtio_console", None))


def wants_pci(config: VmConfig) -> bool:
    return wants_virtio(config) and getattr(config, "virtio_transport", "pci") == "pci"


# --transport mmio: device i's register page and ISA IRQ (edge-triggered,
# free on pyvmm's PC: COM1/2 use 4/3, i8042 1/12, RTC 8, the ACPI SCI 9),
# above low RAM (3 GiB at most) and below the PCI BAR window.
MMIO_BASE = 0xD0000000
MMIO_IRQS = (5, 6, 7, 10, 11, 14, 15)


def _virtio_count(config: VmConfig) -> int:
    return (len(config.drives) + len(getattr(config, "nets", [])) + int(config.virtio_rng)
            + int(bool(getattr(config, "virtio_console", None))))


def with_mmio_cmdline(config: VmConfig) -> VmConfig:
    """`config` with virtio_mmio.device=4K@BASE:IRQ for every device added
    to the Linux command line, when the transport is mmio (the order is
    attach()'s). Raises ConfigError for more devices than MMIO_IRQS."""
    if getattr(config, "virtio_transport", "pci") != "mmio" or not wants_virtio(config):
        return config
    import dataclasses
    from .transport.mmio import MMIO_SIZE
    count = _virtio_count(config)
    if count > len(MMIO_IRQS):
        raise ConfigError(f"--transport mmio: {count} virtio devices, at most {len(MMIO_IRQS)}")
    params = " ".join(f"virtio_mmio.device={MMIO_SIZE // 1024}K@{MMIO_BASE + i * MMIO_SIZE:#x}:{MMIO_IRQS[i]}"
                      for i in range(count))
    return dataclasses.replace(config, linux_cmdline_extra=" ".join(filter(None, (config.linux_cmdline_extra,
                                                                                  params))))


def _function(machine, device, class_code: int):
    """`device` behind the transport the config asks for."""
    if getattr(machine.config, "virtio_transport", "pci") == "mmio":
        from .transport.mmio import VirtioMmio
        return VirtioMmio(device)
    return VirtioPci(device, class_code)


def attach(machine, irq: Callable[[int], IrqLine], output: Callable[[bytes], None] | None = None) -> None:
    """Adds the PCI host bridge and the virtio devices of machine.config.
    `irq(gsi)` gives the line for a GSI; `output` is the console a stdio
    virtio-console port writes to. Raises ImageError for a drive
    that cannot be opened and ConfigError for two drives with one id."""
    from ...storage import open_image
    from .rng import VirtioRng

    cfg = machine.config
    if not wants_virtio(cfg):
        return
    bridge = None
    if wants_pci(cfg):
        bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
        machine.devices["pci_host"] = bridge
    names: set[str] = set()
    mmio_pages: list[str] = []

    def plug(function: VirtioPci, name: str) -> None:
        if bridge is None:     # virtio-mmio: the page and IRQ with_mmio_cmdline announced
            from .transport.mmio import MMIO_SIZE
            index = len(mmio_pages)
            mmio_pages.append(name)
            base = MMIO_BASE + index * MMIO_SIZE
            machine.mmio_bus.insert(base, MMIO_SIZE, function, name)
            function.irq = irq(MMIO_IRQS[index])
            machine.devices[name.replace("-", "_")] = function
            log.info("virtio-mmio %s at %#x, IRQ %d", name, base, MMIO_IRQS[index])
            return
        slot = bridge.add(function, name)
        function.irq = irq(intx_gsi(slot))
        # MSI-X messages: the engine is looked up at send time (it comes later).
        function.msi = lambda address, data: (machine.engine.signal_msi(address, data)
                                              if machine.engine is not None else None)
        machine.devices[name.replace("-", "_")] = function
        log.info("PCI 00:%02x.0 %s, INTA# on GSI %d", slot, name, intx_gsi(slot))

    for i, drive in enumerate(cfg.drives):
        name = drive.id or f"virtio-blk{i}"
        if name in names:
            raise ConfigError(f"--drive id={name} is given twice")
        names.add(name)
        image = open_image(drive.file, drive.format, readonly=drive.readonly)
        if getattr(drive, "cache", "writeback") != "writeback":
            from ...storage.cache import CachedImage
            image = CachedImage(image, drive.cache)
        try:
            plug(_block_function(machine, image, name, drive.readonly), name)
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
        plug(_function(machine, VirtioRng(machine.memory), CLASS_OTHER), "virtio-rng")
    if getattr(cfg, "virtio_console", None):
        plug(_console_function(machine, output), "virtio-console")


def _console_function(machine, output: Callable[[bytes], None] | None) -> VirtioPci:
    """The virtio-console of --virtio-console: the port without a name is
    port 0 (hvc0; a NullPort when none is given), the named ones follow.
    A stdio console port takes the keyboard (machine.console_feed, which
    the runner prefers to COM1). Raises ConfigError for a socket it cannot
    listen on."""
    from .console import VirtioConsole
    from .console_ports import NullPort, SocketPort, StdioPort, check_ports, parse_port
    specs = machine.config.virtio_console
    check_ports(specs)
    parsed = [parse_port(s) for s in specs]
    parsed.sort(key=lambda p: p[2] is not None)          # the console first
    if parsed[0][2] is not None:
        parsed.insert(0, ("null", None, None))
    backends: list = []
    try:
        for kind, path, _ in parsed:
            if kind == "socket":
                backends.append(SocketPort(path, machine.loop))
            elif kind == "stdio" and output is not None:
                backends.append(StdioPort(output))
            else:
                backends.append(NullPort())
        device = VirtioConsole(machine.memory, backends, [name for _, _, name in parsed])
        function = _function(machine, device, CLASS_COMMUNICATION_OTHER)
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    device.wake = function.notify
    function.INPUT_FROM_LOOP = True      # host input arrives on the event loop (bus.py)
    if isinstance(backends[0], StdioPort):
        machine.console_feed = backends[0].feed
    device.start()
    return function


def _block_function(machine, image, name: str, readonly: bool) -> VirtioPci:
    """A virtio-blk function whose disk work runs on an I/O thread of its
    own and completes on the machine's event loop (block.py)."""
    from .block import VirtioBlock
    from .iothread import IoThread
    device = VirtioBlock(machine.memory, image, serial=name, readonly=readonly)
    function = _function(machine, device, CLASS_STORAGE_SCSI)
    device.use_io_thread(IoThread(f"pyvmm-io-{name}"), machine.loop.call_soon_threadsafe, machine.lock)
    device.wake = function.notify
    # Completions arrive on the event loop: the bus must hold the machine's
    # lock around this function's registers even with one vCPU (bus.py).
    function.INPUT_FROM_LOOP = True
    machine.drains.append(device.drain)   # a pause waits for requests in flight
    return function


def _net_function(machine, net, index: int) -> VirtioPci:
    """A virtio-net function on the backend `net` names. Raises NetError."""
    from .net import VirtioNet, default_mac, parse_mac
    port = _net_port(machine, net)
    try:
        mac = parse_mac(net.mac) if net.mac else (default_mac(index) if net.tap else _vm_mac(machine, net, index))
        device = VirtioNet(machine.memory, port, mac)
        function = _function(machine, device, CLASS_ETHERNET)
    except BaseException:
        port.close()
        raise
    device.wake = function.notify
    # Frames arrive on the event loop: the bus must hold the machine's lock
    # around this function's registers even with one vCPU (bus.py).
    function.INPUT_FROM_LOOP = True
    return function


def _net_port(machine, net):
    """The NetPort of a --net backend. Raises NetError."""
    if net.tap is not None:
        from ...net.tap import TapPort
        return TapPort(net.tap, machine.loop)
    from ...net.switch_client import StreamPort, connect_switch, connect_unix
    if net.switch is not None:
        return StreamPort(connect_switch(net.switch), machine.loop, f"switch={net.switch}")
    return StreamPort(connect_unix(net.stream), machine.loop, f"stream {net.stream}")


def _vm_mac(machine, net, index: int) -> bytes:
    """A NIC's default address on a shared switch, derived from what makes
    the VM itself (kernel, command line, disks) and the NIC's place, so it
    is the same on every run and differs between VMs that differ."""
    import json
    import os
    from .net import derived_mac
    cfg = machine.config
    identity = {"kernel": os.path.abspath(cfg.kernel) if cfg.kernel else None, "cmdline": cfg.cmdline,
                "drives": [os.path.abspath(d.file) for d in cfg.drives], "mem": cfg.mem_mib,
                "switch": net.switch or net.stream, "nic": index}
    seed = json.dumps(identity, sort_keys=True)
    taken = _macs_on_switch(net.switch) if net.switch else set()
    mac = derived_mac(seed)
    for n in range(1, 64):      # a twin VM already on the switch: the next address of the sequence
        if mac not in taken:
            break
        mac = derived_mac(f"{seed}#{n}")
    return mac


def _macs_on_switch(name: str) -> set[bytes]:
    """The addresses switch `name` has learned (empty when it cannot say)."""
    from ...net.switchd import SwitchError, query_status
    try:
        entries = query_status(name, timeout=2.0)["mac_table"]["entries"]
        return {bytes.fromhex(e["mac"].replace(":", "")) for e in entries}
    except (SwitchError, KeyError, TypeError, ValueError):
        return set()


def close(machine) -> None:
    """Closes every virtio-blk disk image (flushing what it buffered) and
    every virtio-net backend."""
    from .block import VirtioBlock
    from .console import VirtioConsole
    from .net import VirtioNet
    for device in machine.devices.values():
        if isinstance(getattr(device, "device", None), VirtioBlock):
            device.device.stop_io()      # the disk work submitted goes to the image first
            device.device.image.close()
        elif isinstance(getattr(device, "device", None), (VirtioNet, VirtioConsole)):
            device.device.close()
