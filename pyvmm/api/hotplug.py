"""Block nodes, network backends and virtio-blk / virtio-net hotplug over
QMP: blockdev-add / blockdev-del open and close disk images as named
nodes, netdev_add / netdev_del name TAP, switch and stream backends,
device_add driver=virtio-blk-pci (drive=) or virtio-net-pci (netdev=)
puts one on PCI bus 0 in the first free slot and tells the guest through
ACPI PCI hotplug (devices/pcihotplug.py: GPE 1, then the DSDT's Notify on
the slot), device_del asks the guest to give it back, and the device goes,
with DEVICE_DELETED, when the guest ejects the slot, as on QEMU.

A guest that has not enabled the hotplug GPE (no ACPI hotplug driver, or a
machine without the hotplug block) cannot be asked: there device_del is a
surprise removal, done at once, and the guest is expected to have let go
of the device (Linux: /sys/bus/pci/devices/…/remove) first."""

from __future__ import annotations

import logging
import os

from .. import hotplugged
from ..storage import open_image
from ..storage.image import ImageError
from .commands import COMMANDS, RUNNING_OR_PAUSED, Command, CommandError, Target, _machine, refuse_while_migrating

log = logging.getLogger(__name__)

FORMATS = ("qcow2", "raw", "vmdk")


def _nodes(t: Target) -> dict:
    nodes = getattr(t, "block_nodes", None)
    if nodes is None:
        nodes = t.block_nodes = {}
    return nodes


def blockdev_add(t: Target, args: dict) -> dict:
    """QEMU's shape: {"driver": "qcow2", "node-name": N, "file": {"driver":
    "file", "filename": PATH}, "read-only": bool} (file may be the path)."""
    driver, name = args["driver"], args.get("node-name")
    if driver not in FORMATS:
        raise CommandError(f"Invalid parameter '{driver}' (pyvmm opens: {', '.join(FORMATS)})")
    if not name:
        raise CommandError("pyvmm needs a node-name for every block node")
    nodes = _nodes(t)
    if name in nodes:
        raise CommandError(f"Duplicate nodes with node-name='{name}'")
    spec = args.get("file")
    if isinstance(spec, dict) and spec.get("driver", "file") == "file" and isinstance(spec.get("filename"), str):
        path = spec["filename"]
    elif isinstance(spec, str):
        path = spec
    else:
        raise CommandError("Parameter 'file' must be {\"driver\": \"file\", \"filename\": PATH} or a path")
    readonly = bool(args.get("read-only", False))
    try:
        image = open_image(path, driver, readonly=readonly)
    except (ImageError, OSError) as e:
        raise CommandError(f"Could not open '{path}': {e}") from None
    # "spec": what a snapshot or a migration records to open it again (hotplugged.py).
    nodes[name] = {"image": image, "readonly": readonly, "device": None,
                   "spec": {"format": driver, "filename": os.path.abspath(path), "read-only": readonly}}
    return {}


def blockdev_del(t: Target, args: dict) -> dict:
    nodes = _nodes(t)
    node = nodes.get(args["node-name"])
    if node is None:
        raise CommandError(f"Failed to find node with node-name='{args['node-name']}'")
    if node["device"] is not None:
        raise CommandError(f"Node '{args['node-name']}' is busy: attached to device '{node['device']}'")
    node["image"].close()
    del nodes[args["node-name"]]
    return {}


def _netdevs(t: Target) -> dict:
    """netdev id -> {"net": NetConfig, "device": the NIC's id or None}."""
    found = getattr(t, "net_backends", None)
    if found is None:
        found = t.net_backends = {}
    return found


def netdev_add(t: Target, args: dict) -> dict:
    """QEMU's {"type": "tap", "id": N, "ifname": IF} and {"type": "stream",
    "id": N, "addr": {"type": "unix", "path": P}}, and pyvmm's {"type":
    "switch", "id": N, "switch": NAME}. The backend opens when a NIC uses it."""
    from ..config import NetConfig
    from ..errors import ConfigError
    kind, ident = args["type"], args["id"]
    if ident in _netdevs(t):
        raise CommandError(f"Duplicate ID '{ident}' for netdev")
    if kind == "tap" and isinstance(args.get("ifname"), str):
        net = NetConfig(tap=args["ifname"], id=ident)
    elif kind == "switch" and isinstance(args.get("switch"), str):
        net = NetConfig(switch=args["switch"], id=ident)
    elif (kind == "stream" and isinstance(args.get("addr"), dict) and args["addr"].get("type") == "unix"
          and isinstance(args["addr"].get("path"), str)):
        net = NetConfig(stream=args["addr"]["path"], id=ident)
    else:
        raise CommandError(f"netdev type '{kind}' needs: tap ifname=IF, switch switch=NAME, "
                           "or stream addr={\"type\": \"unix\", \"path\": P}")
    try:
        net.validate()
    except ConfigError as e:
        raise CommandError(str(e)) from None
    _netdevs(t)[ident] = {"net": net, "device": None}
    return {}


def netdev_del(t: Target, args: dict) -> dict:
    backend = _netdevs(t).get(args["id"])
    if backend is None:
        raise CommandError(f"Device '{args['id']}' not found")
    if backend["device"] is not None:
        raise CommandError(f"netdev '{args['id']}' is in use by device '{backend['device']}'")
    del _netdevs(t)[args["id"]]
    return {}


def _net_function(t: Target, m, args: dict, ident: str):
    """A virtio-net function on netdev args["netdev"]. Raises CommandError."""
    from ..devices.virtio.install import _net_function as make
    from ..errors import VmmError
    name = args.get("netdev")
    backend = _netdevs(t).get(name) if name else None
    if backend is None:
        raise CommandError(f"Property 'virtio-net-pci.netdev' can't find value '{name}'")
    if backend["device"] is not None:
        raise CommandError(f"netdev '{name}' is already in use by '{backend['device']}'")
    net = backend["net"]
    if args.get("mac") is not None:
        from dataclasses import replace
        net = replace(net, mac=str(args["mac"]))
        try:
            net.validate()
        except VmmError as e:
            raise CommandError(str(e)) from None
    nics = sum(1 for f in m.devices.values() if type(getattr(f, "device", None)).__name__ == "VirtioNet")
    try:
        return make(m, net, nics), name
    except (VmmError, OSError) as e:
        raise CommandError(f"netdev '{name}': {e}") from None


def device_add(t: Target, args: dict) -> dict:
    from ..devices.virtio.install import _block_function
    m = _machine(t)
    refuse_while_migrating(t, "device_add")
    driver, ident, drive = args["driver"], args.get("id"), args.get("drive")
    if driver == "virtio-net-pci":
        return _device_add_net(t, m, args)
    if driver != "virtio-blk-pci":
        raise CommandError(f"'{driver}' is not a valid device model name "
                           "(pyvmm hotplugs: virtio-blk-pci, virtio-net-pci)")
    if not ident or not drive:
        raise CommandError("virtio-blk-pci needs id= and drive=")
    if ident.replace("-", "_") in m.devices:
        raise CommandError(f"Duplicate device ID '{ident}'")
    node = _nodes(t).get(drive)
    if node is None:
        raise CommandError(f"Property 'virtio-blk-pci.drive' can't find value '{drive}'")
    if node["device"] is not None:
        raise CommandError(f"Drive '{drive}' is already in use by '{node['device']}'")
    bridge = m.devices.get("pci_host")
    if bridge is None:
        raise CommandError("this machine has no PCI bus to plug into (give it a --drive or --virtio-rng)")
    with m.lock:
        function = _block_function(m, node["image"], ident, node["readonly"])
        try:
            slot = hotplugged.plug_function(m, function, ident)
        except Exception:
            hotplugged.discard(m, function)
            raise
        hotplugged.note_block(m, ident, slot, drive, node["spec"])
        bind_ejects(t)
        _announce(m, slot)
    node["device"] = ident
    log.info("hotplugged %s (node %s) in PCI slot %d", ident, drive, slot)
    return {}


def _device_add_net(t: Target, m, args: dict) -> dict:
    from dataclasses import replace
    from ..devices.virtio.net import format_mac
    ident = args.get("id")
    if not ident:
        raise CommandError("virtio-net-pci needs id= and netdev=")
    if ident.replace("-", "_") in m.devices:
        raise CommandError(f"Duplicate device ID '{ident}'")
    bridge = m.devices.get("pci_host")
    if bridge is None:
        raise CommandError("this machine has no PCI bus to plug into (give it a --drive or --virtio-rng)")
    with m.lock:
        function, netdev = _net_function(t, m, args, ident)
        try:
            slot = hotplugged.plug_function(m, function, ident)
        except Exception:
            hotplugged.discard(m, function)
            raise
        net = replace(_netdevs(t)[netdev]["net"], mac=format_mac(function.device.mac))
        hotplugged.note_net(m, ident, slot, netdev, net)
        bind_ejects(t)
        _announce(m, slot)
    _netdevs(t)[netdev]["device"] = ident
    log.info("hotplugged %s (netdev %s) in PCI slot %d", ident, netdev, slot)
    return {}


def _hotplugged_nics(m) -> dict:
    """Device id -> netdev id of the virtio-net devices added by device_add."""
    return hotplugged.nics(m)


def _hotplugged(m) -> dict:
    """Device id -> node name of the virtio-blk devices added by device_add."""
    return hotplugged.drives(m)


def _announce(m, slot: int) -> None:
    """Tells the guest that `slot` has a new device (ACPI hotplug), where it can be told."""
    hotplug = m.devices.get("pci_hotplug")
    if hotplug is not None:
        hotplug.plug(slot)


def _guest_ejects(m) -> bool:
    """Whether the guest handles ACPI PCI hotplug: it enabled the hotplug GPE."""
    from ..devices.pcihotplug import HOTPLUG_GPE
    pm = m.devices.get("acpi_pm")
    return m.devices.get("pci_hotplug") is not None and pm is not None and pm.gpe_handled(HOTPLUG_GPE)


def device_del(t: Target, args: dict) -> dict:
    m = _machine(t)
    refuse_while_migrating(t, "device_del")
    ident = args["id"]
    if ident not in _hotplugged(m) and ident not in _hotplugged_nics(m):
        raise CommandError(f"Device '{ident}' not found" if ident.replace("-", "_") not in m.devices
                           else f"Device '{ident}' was not hotplugged: pyvmm removes only what device_add added")
    bridge = m.devices["pci_host"]
    with m.lock:
        slot = next(s for s, n in bridge.names.items() if n == ident)
        if _guest_ejects(m):
            bind_ejects(t)
            m.devices["pci_hotplug"].request_unplug(slot)
            log.info("asked the guest to eject %s from PCI slot %d", ident, slot)
            return {}
        _remove(t, m, ident, slot)
    return {}


def bind_ejects(t: Target) -> None:
    """Has the guest's ejects on t's machine remove the device and emit
    DEVICE_DELETED through `t`. Called wherever a control plane takes a
    machine (QmpServer.attach, device_add, device_del): a removal asked
    for before a snapshot or a migration travels in pci_hotplug's state,
    and the process that restored it finishes it."""
    m = t.machine
    hotplug = m.devices.get("pci_hotplug") if m is not None else None
    if hotplug is not None:
        hotplug.on_eject = lambda slot: _guest_ejected(t, m, slot)
    if m is not None:
        _adopt(t, m)


def _adopt(t: Target, m) -> None:
    """Names the backends of devices a restore or an incoming migration
    plugged back (hotplugged.replug) as block nodes and netdevs of `t`, as
    blockdev-add and netdev_add had on the source, so that device_del,
    blockdev-del and netdev_del work on them."""
    from ..config import NetConfig
    for r in hotplugged.records(m):
        function = m.devices.get(hotplugged.key(r["id"]))
        if function is None:
            continue
        if r["driver"] == "virtio-blk-pci" and r["node-name"] not in _nodes(t):
            _nodes(t)[r["node-name"]] = {"image": function.device.image, "readonly": bool(r.get("read-only")),
                                         "device": r["id"], "spec": {k: r.get(k) for k in
                                                                     ("format", "filename", "read-only")}}
        elif r["driver"] == "virtio-net-pci" and r["netdev"] not in _netdevs(t):
            _netdevs(t)[r["netdev"]] = {"net": NetConfig(**r["net"]), "device": r["id"]}


def _guest_ejected(t: Target, m, slot: int) -> None:
    """The guest ejected `slot` after device_del asked (a vCPU's port write,
    which may hold m.lock already)."""
    with m.lock:
        ident = m.devices["pci_host"].names.get(slot)
        if ident is None or (ident not in _hotplugged(m) and ident not in _hotplugged_nics(m)):
            log.warning("guest ejected PCI slot %d (%s), which device_add did not fill: kept", slot, ident)
            return
        _remove(t, m, ident, slot)


def _remove(t: Target, m, ident: str, slot: int) -> None:
    """Takes `ident` out of `slot` and off the buses, frees its backend and
    emits DEVICE_DELETED. Called with m.lock held."""
    drive = _hotplugged(m).get(ident)
    netdev = _hotplugged_nics(m).get(ident)
    if m.devices["pci_host"].names.get(slot) != ident:
        return                                       # already gone (a machine rebuilt meanwhile)
    hotplugged.unplug(m, ident)
    if netdev is not None and netdev in _netdevs(t):
        _netdevs(t)[netdev]["device"] = None
    if drive is not None and drive in _nodes(t):
        _nodes(t)[drive]["device"] = None
    log.info("removed %s from PCI slot %d", ident, slot)
    t.emit("DEVICE_DELETED", {"device": ident, "path": f"/machine/peripheral/{ident}"})


COMMANDS.update({c.name: c for c in [
    Command("blockdev-add", blockdev_add, args={"driver": (str, True), "node-name": (str, False),
                                                "file": (object, True), "read-only": (bool, False),
                                                "discard": (str, False), "cache": (dict, False)}),
    Command("blockdev-del", blockdev_del, args={"node-name": (str, True)}),
    Command("device_add", device_add, RUNNING_OR_PAUSED,
            {"driver": (str, True), "id": (str, False), "drive": (str, False), "bus": (str, False),
             "netdev": (str, False), "mac": (str, False)}),
    Command("netdev_add", netdev_add, args={"type": (str, True), "id": (str, True), "ifname": (str, False),
                                            "switch": (str, False), "addr": (dict, False)}),
    Command("netdev_del", netdev_del, args={"id": (str, True)}),
    Command("device_del", device_del, RUNNING_OR_PAUSED, {"id": (str, True)}),
]})
