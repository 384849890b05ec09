"""The devices plugged into a machine at run time (api/hotplug.py's
device_add), kept as plain records that snapshots (their META) and
migrations (their CONFIG record) carry: a machine built from the command
line alone plugs the same devices into the same PCI slots before it takes
the saved state, so the device sets match, and a device_del the guest had
not completed (saved in pci_hotplug's state) still completes there.

A record: {"id", "driver", "slot"} and, for virtio-blk-pci, "node-name",
"format", "filename" and "read-only" of its disk image; for
virtio-net-pci, "netdev" and "net" (the backend's NetConfig fields, the
NIC's MAC among them).  The records live on the machine
(machine.hotplug_records, by device id); the backends' names are what
api/hotplug.py's blockdev-add and netdev_add gave them, and the control
plane that takes a machine names them again (api/hotplug.py bind_ejects)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

from .errors import VmmError

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

DRIVERS = ("virtio-blk-pci", "virtio-net-pci")


class ReplugError(VmmError):
    """A recorded device cannot be plugged into this machine (what is wrong is said)."""


def _records(machine: "Machine") -> dict[str, dict]:
    found = getattr(machine, "hotplug_records", None)
    if found is None:
        found = machine.hotplug_records = {}
    return found


def records(machine: "Machine") -> list[dict]:
    """What a snapshot or a migration carries: one record per device plugged at run time."""
    return [dict(r) for r in _records(machine).values()]


def key(ident: str) -> str:
    """The device's name in machine.devices."""
    return ident.replace("-", "_")


def note_block(machine: "Machine", ident: str, slot: int, node: str, image_spec: dict) -> None:
    _records(machine)[ident] = {"id": ident, "driver": "virtio-blk-pci", "slot": slot, "node-name": node,
                                **image_spec}
    drives(machine)[ident] = node


def note_net(machine: "Machine", ident: str, slot: int, netdev: str, net) -> None:
    _records(machine)[ident] = {"id": ident, "driver": "virtio-net-pci", "slot": slot, "netdev": netdev,
                                "net": asdict(net)}
    nics(machine)[ident] = netdev


def forget(machine: "Machine", ident: str) -> None:
    _records(machine).pop(ident, None)
    drives(machine).pop(ident, None)
    nics(machine).pop(ident, None)


def drives(machine: "Machine") -> dict:
    """Device id -> node name of the virtio-blk devices plugged at run time."""
    found = getattr(machine, "hotplugged_drives", None)
    if found is None:
        found = machine.hotplugged_drives = {}
    return found


def nics(machine: "Machine") -> dict:
    """Device id -> netdev id of the virtio-net devices plugged at run time."""
    found = getattr(machine, "hotplugged_nics", None)
    if found is None:
        found = machine.hotplugged_nics = {}
    return found


def missing(machine: "Machine", saved: object) -> list[dict]:
    """The saved records whose device this machine lacks (checked for shape).
    Raises ReplugError for records that are not ours."""
    if saved is None:
        return []
    if not isinstance(saved, list):
        raise ReplugError("the hotplugged devices' records are malformed")
    out = []
    for r in saved:
        if (not isinstance(r, dict) or r.get("driver") not in DRIVERS or not isinstance(r.get("id"), str)
                or type(r.get("slot")) is not int or not 1 <= r["slot"] < 32):
            raise ReplugError(f"a hotplugged device's record is malformed: {str(r)[:200]}")
        if key(r["id"]) not in machine.devices:
            out.append(r)
    return out


def plug_function(machine: "Machine", function, ident: str, slot: int | None = None) -> int:
    """Puts a built virtio function into `slot` (None: the first free one)
    of bus 0, wires its interrupts (under hw: through eventfds, as the
    built machine's functions) and names it; returns the slot. The
    caller holds machine.lock. Raises ConfigError when the slot is taken."""
    from .builder import _irq
    from .devices.pci.host import intx_gsi
    from .devices.virtio.kvm_eventfds import attach_function
    bridge = machine.devices["pci_host"]
    slot = bridge.add(function, ident, slot)
    function.irq = _irq(machine, intx_gsi(slot))
    function.msi = lambda address, data: machine.engine.signal_msi(address, data) if machine.engine else None
    attach_function(machine, function)
    machine.devices[key(ident)] = function
    return slot


def replug(machine: "Machine", wanted: list[dict]) -> list[str]:
    """Plugs each record's device into its slot (records from missing()).
    Returns the ids plugged. Raises ReplugError, with none of them left
    plugged, when a backend cannot be opened or a slot is taken."""
    from .config import NetConfig
    from .devices.virtio.install import _block_function, _net_function
    from .storage import open_image
    done: list[str] = []
    if wanted and machine.devices.get("pci_host") is None:
        raise ReplugError(f"this machine has no PCI bus for the hotplugged {wanted[0]['id']}")
    try:
        with machine.lock:
            for r in wanted:
                ident, slot = r["id"], r["slot"]
                try:
                    if r["driver"] == "virtio-blk-pci":
                        readonly = bool(r.get("read-only"))
                        image = open_image(str(r["filename"]), r.get("format"), readonly=readonly)
                        function = _block_function(machine, image, ident, readonly)
                    else:
                        net = NetConfig(**r["net"])
                        net.validate()
                        function = _net_function(machine, net, 0)
                    try:
                        plug_function(machine, function, ident, slot)
                    except BaseException:
                        discard(machine, function)
                        raise
                except (VmmError, OSError, KeyError, TypeError) as e:
                    raise ReplugError(f"hotplugged device {ident} (slot {slot}): {e}") from None
                if r["driver"] == "virtio-blk-pci":
                    note_block(machine, ident, slot, str(r.get("node-name")),
                               {k: r.get(k) for k in ("format", "filename", "read-only")})
                else:
                    note_net(machine, ident, slot, str(r.get("netdev")), net)
                done.append(ident)
                log.info("plugged %s back into PCI slot %d for the saved state", ident, slot)
    except ReplugError:
        for ident in reversed(done):
            unplug(machine, ident)
        raise
    return done


def unplug(machine: "Machine", ident: str) -> int | None:
    """Takes a device plugged at run time out of its slot and off the buses
    and closes its backend; returns the slot it had (None: not plugged).
    The caller holds machine.lock or the machine is not running."""
    bridge = machine.devices.get("pci_host")
    slot = next((s for s, n in bridge.names.items() if n == ident), None) if bridge is not None else None
    if slot is None:
        return None
    function = bridge.functions[slot]
    from .devices.virtio.kvm_eventfds import detach_function
    detach_function(machine, function)        # its ioeventfds and irqfds off the VM, first
    function.config_write(4, 2, 0)            # decoding off: remap() takes its BARs off the buses
    bridge.remap(slot)
    del bridge.functions[slot], bridge.names[slot]
    discard(machine, function)
    machine.devices.pop(key(ident), None)
    forget(machine, ident)
    return slot


def discard(machine: "Machine", function) -> None:
    """Stops the backend of a virtio function that is off the bus: a NIC's
    port (its reader leaves the loop), a disk's I/O thread after the
    requests in flight (and a pause no longer waits for them)."""
    device = function.device
    if hasattr(device, "stop_io"):
        device.drain()
        device.stop_io()
        if device.drain in machine.drains:
            machine.drains.remove(device.drain)
    else:
        device.close()


__all__ = ["ReplugError", "discard", "drives", "forget", "missing", "nics", "note_block", "note_net", "plug_function", "records", "replug",
           "unplug"]
