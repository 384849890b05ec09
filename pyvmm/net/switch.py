"""The forwarding core of `pyvmm switch`: an L2 learning switch with port
groups (VLANs), per-port rate limits and counters. No I/O here: each port
carries a `send(frame) -> bool` callable, and the daemon (switchd.py)
feeds received frames to Switch.receive().

Rules:
- A source address is learned as (VLAN, MAC) -> ingress port.
- Broadcast, multicast and unknown unicast go to every other port of the
  frame's VLAN; a known unicast goes to its one port, never back out of
  the port it came in on.
- Client ports are access ports of one group (one VLAN); they may not send
  802.1Q-tagged frames. Uplinks are trunks: a frame of VLAN n > 0 leaves
  tagged n and tagged frames arriving map to their VLAN; VLAN 0 is untagged.
- Runt frames (shorter than an Ethernet header), frames with a multicast or
  zero source address, and frames over the rate limit are dropped and counted.
- Loops: nothing that came in on an uplink goes out on an uplink (as in
  VMware's vSwitch, which is no transit switch), and a frame whose source
  was seen on another port within the MAC table's move_hold is a
  reflection (a guest or a miswired uplink looping frames back): it is
  dropped and counted in rx_mac_flap, so a reflector cannot start a
  broadcast storm or steal a live station's address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .framing import ETH_HLEN, VLAN_HLEN, mac_text, pop_tag, push_tag
from .mactable import MacTable
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

ZERO_MAC = bytes(6)
COUNTERS = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "rx_runt", "rx_oversized",
            "rx_bad_source", "rx_rate_limited", "rx_vlan_dropped", "rx_filtered", "rx_mac_flap", "tx_dropped")


@dataclass(eq=False)
class SwitchPort:
    """One attachment: a client (access port of `vlan`) or an uplink (trunk)."""

    name: str
    send: Callable[[bytes], bool]
    vlan: int = 0
    group: str = "default"
    uplink: bool = False
    limiter: RateLimiter | None = None
    # a team picks its member from the frame's ingress port: send_from(frame, ingress)
    send_from: Callable[[bytes, "SwitchPort"], bool] | None = None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def __repr__(self) -> str:
        kind = "uplink" if self.uplink else f"group {self.group} vlan {self.vlan}"
        return f"SwitchPort({self.name}, {kind}, rx={self.counters['rx_frames']}, tx={self.counters['tx_frames']})"

    # eq=False keeps object's identity hash (in C, unlike a __hash__ written here)


class Switch:
    def __init__(self, macs: MacTable | None = None, vlans: set[int] | None = None):
        self.macs = macs if macs is not None else MacTable()   # an empty table is falsy
        self.vlans = set(vlans) if vlans is not None else {0}   # the VLANs of the port groups
        self.ports: list[SwitchPort] = []

    def __repr__(self) -> str:
        return f"Switch(ports={len(self.ports)}, {self.macs!r})"

    def add_port(self, port: SwitchPort) -> SwitchPort:
        if not port.uplink:
            self.vlans.add(port.vlan)
        self.ports.append(port)
        return port

    def remove_port(self, port: SwitchPort) -> None:
        """Idempotent; forgets what was learned on the port."""
        if port in self.ports:
            self.ports.remove(port)
        self.macs.forget_port(port)

    def port(self, name: str) -> SwitchPort | None:
        return next((p for p in self.ports if p.name == name), None)

    # -- forwarding -----------------------------------------------------------
    def receive(self, ingress: SwitchPort, frame: bytes) -> None:
        self.receive_many(ingress, (frame,))

    def receive_many(self, ingress: SwitchPort, frames) -> None:
        """Forwards the frames that arrived together on ingress. One loop
        with everything it touches in locals: this is the switch's hot path."""
        c = ingress.counters
        limiter = ingress.limiter
        from_uplink = ingress.uplink
        macs = self.macs
        learn, lookup = macs.learn, macs.lookup
        now = macs.clock()
        vlans = self.vlans
        rx = rx_bytes = 0
        for frame in frames:
            n = len(frame)
            if n < ETH_HLEN:
                c["rx_runt"] += 1
                continue
            if limiter is not None and not limiter.allow(n):
                c["rx_rate_limited"] += 1
                continue
            src = frame[6:12]
            if src[0] & 1 or src == ZERO_MAC:
                c["rx_bad_source"] += 1
                continue
            tagged = frame[12] == 0x81 and frame[13] == 0 and n >= ETH_HLEN + VLAN_HLEN
            if from_uplink:
                if tagged:
                    vlan = ((frame[14] << 8) | frame[15]) & 0xFFF
                    frame = pop_tag(frame)
                    n -= VLAN_HLEN
                else:
                    vlan = 0
                if vlan not in vlans:
                    c["rx_vlan_dropped"] += 1
                    continue
            elif tagged:                # a guest may not pick its own VLAN
                c["rx_vlan_dropped"] += 1
                continue
            else:
                vlan = ingress.vlan
            if not learn(src, vlan, ingress, now):
                c["rx_mac_flap"] += 1
                continue
            rx += 1
            rx_bytes += n
            if frame[12] == 8 and frame[13] == 6 and not from_uplink and n >= 42 and frame[22:28] == src:
                spa = frame[28:32]
                if spa != b"\0\0\0\0":          # not an ARP probe
                    macs.note_ipv4(src, vlan, spa)
            if not frame[0] & 1:
                egress = lookup(frame[0:6], vlan, now)
                if egress is not None:
                    if egress is ingress or (from_uplink and egress.uplink):
                        c["rx_filtered"] += 1
                    elif egress.uplink or egress.send_from is not None:
                        self._deliver(egress, frame, vlan, ingress)
                    else:                   # to a client: _deliver inlined
                        ec = egress.counters
                        if egress.send(frame):
                            ec["tx_frames"] += 1
                            ec["tx_bytes"] += n
                        else:
                            ec["tx_dropped"] += 1
                    continue
            for port in list(self.ports):   # a send may remove a dead port
                if port is not ingress and (not from_uplink if port.uplink else port.vlan == vlan):
                    self._deliver(port, frame, vlan, ingress)
        c["rx_frames"] += rx
        c["rx_bytes"] += rx_bytes

    def _deliver(self, port: SwitchPort, frame: bytes, vlan: int, ingress: SwitchPort) -> None:
        if port.uplink and vlan:
            frame = push_tag(frame, vlan)
        c = port.counters
        if port.send_from(frame, ingress) if port.send_from else port.send(frame):
            c["tx_frames"] += 1
            c["tx_bytes"] += len(frame)
        else:
            c["tx_dropped"] += 1

    # -- what status shows ----------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "ports": [{
                "name": p.name, "kind": "uplink" if p.uplink else "client",
                "group": None if p.uplink else p.group, "vlan": None if p.uplink else p.vlan,
                "learned": self.macs.count(p), "counters": dict(p.counters),
                "rate_limit": p.limiter.to_dict() if p.limiter else None,
            } for p in self.ports],
            "mac_table": {
                "capacity": self.macs.capacity, "per_port": self.macs.per_port,
                "max_age": self.macs.max_age, "size": len(self.macs),
                "evicted": self.macs.evicted, "aged": self.macs.aged, "flaps": self.macs.flaps,
                "move_hold": self.macs.move_hold,
                "entries": [{"mac": mac_text(mac), "vlan": vlan, "port": port.name, "age": round(age, 1)}
                            for mac, vlan, port, age in self.macs.entries()],
            },
        }
