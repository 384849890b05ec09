"""The switch's MAC table: (VLAN, MAC) -> port, learned from source
addresses, forgotten after `max_age` seconds without traffic.

It is bounded twice: `capacity` entries in all (the oldest goes first) and
`per_port` entries for any one port (that port's oldest goes first), so a
port flooding random source MACs only churns its own entries and never
pushes the other ports' addresses out."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable

Key = tuple[int, bytes]


class MacEntry:
    __slots__ = ("port", "last_seen", "ipv4")

    def __init__(self, port: Hashable, last_seen: float):
        self.port = port
        self.last_seen = last_seen
        self.ipv4: bytes | None = None      # from the station's ARP, for gratuitous ARP on failover


class MacTable:
    def __init__(self, capacity: int = 4096, max_age: float = 300.0, per_port: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or max_age <= 0:
            raise ValueError("MAC table capacity and max_age must be positive")
        self.capacity = capacity
        self.max_age = max_age
        self.per_port = per_port or capacity
        self.clock = clock
        self._entries: OrderedDict[Key, MacEntry] = OrderedDict()    # oldest first
        self._by_port: dict[Hashable, OrderedDict[Key, None]] = {}
        self.evicted = 0
        self.aged = 0

    def __repr__(self) -> str:
        return f"MacTable({len(self._entries)}/{self.capacity}, max_age={self.max_age})"

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, mac: bytes, vlan: int, port: Hashable) -> None:
        key = (vlan, mac)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.port != port:          # the station moved
                self._by_port[entry.port].pop(key, None)
                entry.port = port
            entry.last_seen = now
            self._entries.move_to_end(key)
            self._port_keys(port)[key] = None
            self._port_keys(port).move_to_end(key)
            return
        keys = self._port_keys(port)
        if len(keys) >= self.per_port:
            self._drop(next(iter(keys)))
            self.evicted += 1
        if len(self._entries) >= self.capacity:
            self._drop(next(iter(self._entries)))
            self.evicted += 1
        self._entries[key] = MacEntry(port, now)
        keys[key] = None

    def lookup(self, mac: bytes, vlan: int) -> Hashable | None:
        entry = self._entries.get((vlan, mac))
        if entry is None or self.clock() - entry.last_seen > self.max_age:
            return None
        return entry.port

    def note_ipv4(self, mac: bytes, vlan: int, ip: bytes) -> None:
        entry = self._entries.get((vlan, mac))
        if entry is not None:
            entry.ipv4 = ip

    def ipv4_of(self, mac: bytes, vlan: int) -> bytes | None:
        entry = self._entries.get((vlan, mac))
        return None if entry is None else entry.ipv4

    def age(self) -> int:
        """Forgets entries older than max_age; returns how many."""
        limit = self.clock() - self.max_age
        n = 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.last_seen >= limit:
                break
            self._drop(key)
            n += 1
        self.aged += n
        return n

    def forget_port(self, port: Hashable) -> int:
        keys = self._by_port.pop(port, {})
        for key in keys:
            self._entries.pop(key, None)
        return len(keys)

    def count(self, port: Hashable) -> int:
        return len(self._by_port.get(port, ()))

    def entries(self) -> list[tuple[bytes, int, Hashable, float]]:
        """(mac, vlan, port, age in seconds), oldest first."""
        now = self.clock()
        return [(mac, vlan, e.port, now - e.last_seen) for (vlan, mac), e in self._entries.items()]

    def _port_keys(self, port: Hashable) -> OrderedDict[Key, None]:
        keys = self._by_port.get(port)
        if keys is None:
            keys = self._by_port[port] = OrderedDict()
        return keys

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        keys = self._by_port.get(entry.port)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_port[entry.port]
