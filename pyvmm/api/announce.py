"""announce-self: every virtio-net NIC whose driver took GUEST_ANNOUNCE is
asked to announce the guest on its network (gratuitous ARP, unsolicited
neighbour advertisements), as QEMU's command of that name does; a NIC
whose driver did not take the feature is left alone.  QEMU's optional
timing arguments (initial, max, rounds, step) are accepted: the guest's
driver does the announcing, so pyvmm asks once."""

from __future__ import annotations

from .commands import COMMANDS, RUNNING_OR_PAUSED, Command, Target, _machine


def announce_self(t: Target, args: dict) -> dict:
    from ..devices.virtio.net import VirtioNet
    m = _machine(t)
    with m.lock:
        for device in list(m.devices.values()):
            inner = getattr(device, "device", None)
            if isinstance(inner, VirtioNet):
                inner.announce()
    return {}


COMMANDS.update({c.name: c for c in [
    Command("announce-self", announce_self, RUNNING_OR_PAUSED,
            {k: (int, False) for k in ("initial", "max", "rounds", "step")}),
]})
