"""The switch's MAC table: (VLAN, MAC) -> port, learned from source
addresses, forgotten after `max_age` seconds without traffic.

It is bounded twice: `capacity` entries in all (the least recently seen
of the oldest learned goes first) and `per_port` entries for any one port
(likewise among that port's), so a
port flooding random source MACs only churns its own entries and never
pushes the other ports' addresses out.

A station does not move to another port within `move_hold` seconds of
being seen on its current one: learn() refuses (and counts) the move, so
a frame reflected back by a looping guest or a miswired uplink pair
cannot steal a live station's address (MAC flapping), and the switch
drops it instead of flooding it again."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable

Key = tuple[int, bytes]
EVICT_LOOKAHEAD = 8


class MacEntry:
    __slots__ = ("port", "last_seen", "ipv4", "flaps")

    def __init__(self, port: Hashable, last_seen: float):
        self.port = port
        self.last_seen = last_seen
        self.ipv4: bytes | None = None      # from the station's ARP, for gratuitous ARP on failover
        self.flaps = 0                      # moves refused within move_hold


class MacTable:
    def __init__(self, capacity: int = 4096, max_age: float = 300.0, per_port: int | None = None,
                 clock: Callable[[], float] = time.monotonic, move_hold: float = 1.0):
        if capacity < 1 or max_age <= 0:
            raise ValueError("MAC table capacity and max_age must be positive")
        self.capacity = capacity
        self.max_age = max_age
        self.per_port = per_port or capacity
        self.clock = clock
        self.move_hold = move_hold
        self.flaps = 0
        self._entries: OrderedDict[Key, MacEntry] = OrderedDict()    # oldest first
        self._by_port: dict[Hashable, OrderedDict[Key, None]] = {}
        self._get = self._entries.get       # bound once: learn and lookup run for every frame
        self.evicted = 0
        self.aged = 0

    def __repr__(self) -> str:
        return f"MacTable({len(self._entries)}/{self.capacity}, max_age={self.max_age})"

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, mac: bytes, vlan: int, port: Hashable, now: float | None = None) -> bool:
        """Learns mac on port; False (nothing changed) when the station was
        seen on another port less than move_hold seconds ago. `now`: the
        clock's time, when the caller has it already."""
        key = (vlan, mac)
        if now is None:
            now = self.clock()
        entry = self._get(key)
        if entry is not None:
            if entry.port == port:      # the common case: one store, no reordering (see age())
                entry.last_seen = now
                return True
            if now - entry.last_seen < self.move_hold:
                entry.flaps += 1
                self.flaps += 1
                return False
            self._by_port[entry.port].pop(key, None)        # the station moved
            entry.port = port
            entry.last_seen = now
            self._entries.move_to_end(key)
            self._port_keys(port)[key] = None
            return True
        keys = self._port_keys(port)
        if len(keys) >= self.per_port:
            self._drop(self._oldest(keys))
            self.evicted += 1
        if len(self._entries) >= self.capacity:
            self._drop(self._oldest(self._entries))
            self.evicted += 1
        self._entries[key] = MacEntry(port, now)
        keys[key] = None
        return True

    def lookup(self, mac: bytes, vlan: int, now: float | None = None) -> Hashable | None:
        entry = self._get((vlan, mac))
        if entry is None or (self.clock() if now is None else now) - entry.last_seen > self.max_age:
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
        """Forgets entries older than max_age; returns how many. A whole
        scan (once a second, a few thousand entries at most), because
        learn() does not reorder an entry it merely refreshes."""
        limit = self.clock() - self.max_age
        stale = [key for key, entry in self._entries.items() if entry.last_seen < limit]
        for key in stale:
            self._drop(key)
        self.aged += len(stale)
        return len(stale)

    def _oldest(self, keys: "OrderedDict[Key, object]") -> Key:
        """The least recently seen of the first few keys in learning order
        (refreshes do not reorder, so the very first may be busy); the
        busy ones it passes go to the back."""
        candidates = []
        for key in keys:
            candidates.append(key)
            if len(candidates) == EVICT_LOOKAHEAD:
                break
        victim = min(candidates, key=lambda k: self._entries[k].last_seen)
        for key in candidates:
            if key != victim:
                keys.move_to_end(key)
        return victim

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
