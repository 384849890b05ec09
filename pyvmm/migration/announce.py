"""After a move the destination announces each NIC's MAC so switches learn
its new port (QEMU's announce-self): a RARP request frame per NIC, five
rounds, the gap growing from 50 ms by 100 ms a round (at most 550 ms)."""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

ROUNDS = 5
INITIAL_MS, STEP_MS, MAX_MS = 50, 100, 550
ETH_P_RARP = 0x8035
RARP_REQUEST_REVERSE = 3
BROADCAST = b"\xff" * 6
ETH_MIN_FRAME = 60


def rarp_frame(mac: bytes) -> bytes:
    """An Ethernet RARP "request reverse" for `mac` (RFC 903), broadcast and padded."""
    arp = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, RARP_REQUEST_REVERSE, mac, bytes(4), mac, bytes(4))
    frame = BROADCAST + mac + struct.pack(">H", ETH_P_RARP) + arp
    return frame.ljust(ETH_MIN_FRAME, b"\0")


def nics(machine: "Machine") -> list:
    """The machine's virtio-net devices (with .mac and .port)."""
    from ..devices.virtio.net import VirtioNet
    found = []
    for dev in machine.devices.values():
        inner = getattr(dev, "device", dev)
        if isinstance(inner, VirtioNet):
            found.append(inner)
    return found


def gaps_ms() -> list[int]:
    """The waits before each round after the first."""
    return [min(INITIAL_MS + STEP_MS * i, MAX_MS) for i in range(ROUNDS - 1)]


def announce(machine: "Machine", sleep=time.sleep) -> int:
    """Sends the rounds (blocking); returns the frames sent."""
    sent = 0
    devices = nics(machine)
    for i in range(ROUNDS):
        if i:
            sleep(gaps_ms()[i - 1] / 1000)
        if machine.stopping:
            break
        for nic in devices:
            try:
                nic.port.send(rarp_frame(nic.mac))
                sent += 1
            except Exception as e:         # a backend gone away must not stop the guest
                log.warning("announce on %s failed: %s", nic, e)
    return sent


def announce_in_background(machine: "Machine") -> None:
    if nics(machine):
        threading.Thread(target=announce, args=(machine,), name="pyvmm-announce", daemon=True).start()
