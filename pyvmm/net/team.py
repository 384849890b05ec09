"""NIC teaming: several uplinks that the switch sees as one trunk port,
with VMware vSwitch's policies:

- "failover": explicit order, the first member whose link is up carries
  everything; the others stand by (frames arriving on them are dropped,
  so a flood heard on two members is not taken twice).
- "port_id": every up member is active; a VM's frames leave by a member
  picked from its switch port (the default in VMware).
- "mac_hash": as port_id, picked from the source MAC.

Links are watched through netlink (RTNLGRP_LINK events, not polling;
see LinkMonitor). When a VM's frames move to another member, the team
announces its MAC there, so the physical switches learn the new path at
once: a gratuitous ARP for the IPv4 address the switch saw in the VM's
own ARP, else a RARP frame (what VMware and QEMU send). With failback on, the
team returns to a preferred member as soon as its link is back.

Beacon probing (optional, per team) finds the failures link state cannot
see: a broken path beyond the first physical switch, a blocked switch
port. Every `interval` each member with link sends a broadcast beacon
(BEACON_TYPE, naming the team and the member); a member is down when for
`misses` intervals no other member heard its beacons or it heard none of
theirs. The judgement comes a tenth of an interval after a round is sent
(time enough for those beacons to arrive), so a member is down as soon as
its `misses`-th beacon has gone unheard, not one round later. When that
would take every member with link down (two members cannot tell which
side broke), the beacons are inconclusive and link state alone decides, as VMware's vSwitch falls back to sending on all.
Beacons are consumed by the team, never passed to the switch."""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import time
import zlib
from typing import Any, Callable

from .framing import push_tag, vlan_of
from .switch import Switch, SwitchPort
from .uplink import UplinkGone, open_uplink

log = logging.getLogger(__name__)

POLICIES = ("failover", "port_id", "mac_hash")
ETH_P_RARP = 0x8035
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000
NLMSG = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTMGRP_LINK = 1
BEACON_TYPE = b"\x88\xb6"          # IEEE local experimental ethertype 2
BEACON_MAGIC = b"pyvmm-beacon"
BEACON_BODY = struct.Struct(">12sIBI")   # magic, team id, member index, sequence
JUDGE_DELAY = 0.1                 # of an interval: when a round's beacons have arrived


def rarp_announce(mac: bytes) -> bytes:
    """A RARP "reverse request" from mac about itself, broadcast."""
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + struct.pack(">H", ETH_P_RARP) + body
    return frame + bytes(60 - len(frame))


def gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    """An ARP request from mac for its own address ip, broadcast."""
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, bytes(6), ip)
    frame = b"\xff" * 6 + mac + b"\x08\x06" + body
    return frame + bytes(60 - len(frame))


def link_is_up(ifname: str) -> bool:
    """Administratively up with carrier, asked once at start (netlink says the rest)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", ifname.encode(), 0))
        except OSError:
            return False
    flags = struct.unpack_from("H", res, 16)[0]
    return bool(flags & IFF_UP and flags & IFF_RUNNING)


class LinkMonitor:
    """A netlink socket in RTNLGRP_LINK: on_event(ifindex, up, deleted) for every link change."""

    def __init__(self, on_event: Callable[[int, bool, bool], None]):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.on_event = on_event

    def on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:      # ENOBUFS: events were lost; the next ones still count
                log.warning("netlink: %s", e.strerror)
                return
            pos = 0
            while pos + NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, pos)
                if length < NLMSG.size:
                    break
                if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= NLMSG.size + IFINFOMSG.size:
                    _fam, _type, index, flags, _change = IFINFOMSG.unpack_from(data, pos + NLMSG.size)
                    up = bool(flags & IFF_UP and flags & IFF_LOWER_UP) and kind == RTM_NEWLINK
                    self.on_event(index, up, kind == RTM_DELLINK)
                pos += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


class TeamMember:
    def __init__(self, kind: str, ifname: str):
        self.ifname = ifname
        self.dev = open_uplink(kind, ifname)
        self.index = socket.if_nametoindex(ifname)
        self.link_up = link_is_up(ifname)
        self.beacon_ok = True
        self.up = self.link_up          # link_up and beacon_ok
        self.heard_by_others = self.heard_others = 0.0     # monotonic times, for beacon probing
        self.counters = {"rx_frames": 0, "tx_frames": 0, "rx_standby_dropped": 0,
                         "rx_loop_dropped": 0, "announced": 0, "beacons_sent": 0, "beacons_heard": 0}

    def __repr__(self) -> str:
        return f"TeamMember({self.ifname}, {'up' if self.up else 'down'})"


def beacon_frame(team_id: int, index: int, seq: int) -> bytes:
    src = bytes((0x02, 0xBE)) + struct.pack(">HH", team_id & 0xFFFF, index)    # locally administered
    frame = b"\xff" * 6 + src + BEACON_TYPE + BEACON_BODY.pack(BEACON_MAGIC, team_id, index, seq)
    return frame + bytes(60 - len(frame))


class Team:
    def __init__(self, switch: Switch, name: str, members: list[tuple[str, str]],
                 policy: str = "failover", failback: bool = True, beacon: tuple[float, int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"team policy must be one of {', '.join(POLICIES)}")
        self.switch = switch
        self.name = name
        self.policy = policy
        self.failback = failback
        self.members: list[TeamMember] = []
        try:
            for kind, ifname in members:
                self.members.append(TeamMember(kind, ifname))
        except OSError:
            self.close()
            raise
        self.port = switch.add_port(SwitchPort(f"team:{name}", self._send_plain, uplink=True))
        self.port.send_from = self.send_from
        self.failovers = 0
        self.active: TeamMember | None = None
        self._choose_active()
        self.beacon = beacon
        self.clock = clock
        self.team_id = zlib.crc32(name.encode())
        self.beacon_seq = 0
        self.beacon_failures = 0
        now = clock()
        self.next_beacon = now
        self.judge_at = float("inf")
        for m in self.members:
            m.heard_by_others = m.heard_others = now    # a grace period of one window

    def __repr__(self) -> str:
        return f"Team({self.name}, {self.policy}, active={self.active})"

    # -- which member carries what --------------------------------------------
    def _choose_active(self) -> bool:
        """For failover: the first up member, or the current one while it is up
        when failback is off. True when it changed."""
        up = [m for m in self.members if m.up]
        if self.failback or self.active is None or not self.active.up:
            new = up[0] if up else None
        else:
            new = self.active
        changed = new is not self.active
        self.active = new
        return changed

    def _pick(self, src: bytes, ingress: SwitchPort | None) -> TeamMember | None:
        if self.policy == "failover":
            return self.active
        up = [m for m in self.members if m.up]
        if not up:
            return None
        key = zlib.crc32(ingress.name.encode()) if self.policy == "port_id" and ingress else zlib.crc32(src)
        return up[key % len(up)]

    def send_from(self, frame: bytes, ingress: SwitchPort | None) -> bool:
        member = self._pick(frame[6:12], ingress)
        if member is None or not member.dev.send(frame):
            return False
        member.counters["tx_frames"] += 1
        return True

    def _send_plain(self, frame: bytes) -> bool:
        return self.send_from(frame, None)

    def on_member_readable(self, member: TeamMember) -> bool:
        """False when the member's interface is gone (it is then down for good)."""
        try:
            frames = member.dev.read_frames()
        except UplinkGone:
            self.link_event(member.index, False, True)
            return False
        if self.beacon is not None:
            frames = [f for f in frames if not self._take_beacon(member, f)]
        if self.policy == "failover" and member is not self.active:
            member.counters["rx_standby_dropped"] += len(frames)
            return True
        for frame in frames:
            if self.policy != "failover" and self._is_local(frame):
                member.counters["rx_loop_dropped"] += 1
                continue
            member.counters["rx_frames"] += 1
            self.switch.receive(self.port, frame)
        return True

    def _is_local(self, frame: bytes) -> bool:
        """Our own VM's frame, sent out by one active member and flooded back
        in on another by the physical switch (VMware drops these too)."""
        if len(frame) < 14:
            return False
        tag = vlan_of(frame)
        owner = self.switch.macs.lookup(frame[6:12], tag or 0)
        return owner is not None and owner is not self.port and not owner.uplink

    # -- beacon probing -----------------------------------------------------------
    def _take_beacon(self, member: TeamMember, frame: bytes) -> bool:
        """True when frame is a beacon (of this team or another): it is consumed."""
        if frame[12:14] != BEACON_TYPE or len(frame) < 14 + BEACON_BODY.size:
            return False
        magic, team_id, index, _seq = BEACON_BODY.unpack_from(frame, 14)
        if magic != BEACON_MAGIC:
            return False
        if team_id == self.team_id and index < len(self.members) and self.members[index] is not member:
            now = self.clock()
            self.members[index].heard_by_others = now
            member.heard_others = now
            member.counters["beacons_heard"] += 1
        return True

    def beacon_tick(self) -> float:
        """Sends the beacons that are due and judges the members; returns
        when it next wants to run (monotonic seconds)."""
        if self.beacon is None:
            return float("inf")
        interval, misses = self.beacon
        now = self.clock()
        if now >= self.next_beacon:
            self.next_beacon = now + interval
            self.judge_at = now + interval * JUDGE_DELAY
            self.beacon_seq += 1
            for i, m in enumerate(self.members):
                if m.link_up and m.dev.send(beacon_frame(self.team_id, i, self.beacon_seq)):
                    m.counters["beacons_sent"] += 1
        if now >= self.judge_at:
            self.judge_at = float("inf")
            self._judge(now, interval * misses)
        return min(self.next_beacon, self.judge_at)

    def _judge(self, now: float, window: float) -> None:
        linked = [m for m in self.members if m.link_up]
        ok = {m: now - m.heard_by_others <= window and now - m.heard_others <= window for m in linked}
        if linked and not any(ok.values()):
            ok = dict.fromkeys(linked, True)    # inconclusive: link state decides
        for m in linked:
            if ok[m] != m.beacon_ok:
                m.beacon_ok = ok[m]
                if not ok[m]:
                    self.beacon_failures += 1
                log.warning("team %s: %s beacons %s", self.name, m.ifname, "back" if ok[m] else "lost")
                self._set_up(m, m.link_up and m.beacon_ok)

    # -- link state ---------------------------------------------------------------
    def link_event(self, index: int, up: bool, deleted: bool) -> None:
        member = next((m for m in self.members if m.index == index), None)
        if member is None or member.link_up == up:
            return
        member.link_up = up
        if up:      # a fresh start for its beacons: one window of grace
            member.heard_by_others = member.heard_others = self.clock()
            member.beacon_ok = True
        log.warning("team %s: %s link is %s", self.name, member.ifname, "up" if up else "down")
        self._set_up(member, up and member.beacon_ok)

    def _set_up(self, member: TeamMember, up: bool) -> None:
        """Moves traffic as member goes up or down, announcing the VMs' MACs
        on the members that carry them now."""
        if member.up == up:
            return
        before = {key: self._pick(mac, port) for key, mac, port in self._client_macs()}
        member.up = up
        if self._choose_active():
            self.failovers += 1
        for (vlan, mac), mac_, port in self._client_macs():
            now = self._pick(mac, port)
            if now is not None and now is not before.get((vlan, mac)):
                ip = self.switch.macs.ipv4_of(mac, vlan)
                frame = gratuitous_arp(mac, ip) if ip else rarp_announce(mac)
                if now.dev.send(push_tag(frame, vlan) if vlan else frame):
                    now.counters["announced"] += 1

    def _client_macs(self) -> list[tuple[tuple[int, bytes], bytes, SwitchPort]]:
        return [((vlan, mac), mac, port) for mac, vlan, port, _age in self.switch.macs.entries()
                if isinstance(port, SwitchPort) and not port.uplink]

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "policy": self.policy, "failback": self.failback,
                "failovers": self.failovers, "active": self.active.ifname if self.active else None,
                "beacon": None if self.beacon is None else {"interval": self.beacon[0], "misses": self.beacon[1],
                                                            "failures": self.beacon_failures},
                "members": [{"ifname": m.ifname, "up": m.up, "link": m.link_up, "beacon_ok": m.beacon_ok,
                             **m.counters} for m in self.members]}

    def close(self) -> None:
        for m in self.members:
            m.dev.close()
        if hasattr(self, "port"):
            self.switch.remove_port(self.port)
