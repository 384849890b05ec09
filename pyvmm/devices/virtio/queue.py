"""Split virtqueues (virtio 1.2, section 2.7): the descriptor table, the
driver's avail ring and the device's used ring, with INDIRECT_DESC and
EVENT_IDX.

Every guest address is checked through GuestMemory before it is touched,
and every index the guest wrote is checked against the queue size, so a
hostile driver can only get a QueueError out of pop(): a chain that loops,
points outside RAM or across its end, claims more than MAX_CHAIN_BYTES,
puts a device-readable buffer after a device-writable one, or nests
indirect tables.  The device model answers a QueueError by marking itself
NEEDS_RESET (transport/pci.py); nothing the guest writes raises anything
else, loops without bound or reaches outside guest RAM.

Data moves with GuestMemory.read and GuestMemory.write, so the dirty log
and the translator's code invalidation see every device write; a disk
write reads the guest's buffers in place instead (Chain.views), which
neither needs to see.  Reads of
the descriptor table and the avail ring, checked to be RAM when the queue
is built, go straight to the RAM mapping found then (struct unpack_from):
the per-request cost that bench/virtio.py (a) measures.
"""

from __future__ import annotations

import struct

from ...errors import GuestMemoryError, VmmError
from ...memory import GuestMemory

DESC = struct.Struct("<QIHH")          # addr, len, flags, next
U16 = struct.Struct("<H")
DESC_SIZE = DESC.size                  # 16
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")       # id, len
MAX_QUEUE_SIZE = 32768
# No request of any device needs more; a larger sum is a hostile chain.
MAX_CHAIN_BYTES = 1 << 30


class QueueError(VmmError):
    """The driver broke the virtqueue protocol; the device needs a reset."""


class Chain:
    """One available descriptor chain: the head index to return in the used
    ring, the device-readable buffers, then the device-writable ones, each
    (guest address, length), all inside guest RAM, and the byte count of
    each kind.  A plain slotted class: one is made per request."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[tuple[int, int]] | None = None,
                 writable: list[tuple[int, int]] | None = None):
        self.head = head
        self.readable = readable if readable is not None else []
        self.writable = writable if writable is not None else []
        self.readable_len = sum(n for _, n in readable) if readable else 0   # pop() passes none
        self.writable_len = sum(n for _, n in writable) if writable else 0

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Chain) and (self.head, self.readable, self.writable)
                == (other.head, other.readable, other.writable))

    def read(self, memory: GuestMemory, offset: int, length: int) -> bytes:
        """`length` bytes of the readable buffers from `offset` on (fewer
        when they end first)."""
        readable = self.readable
        if readable and offset < readable[0][1] and offset + length <= readable[0][1]:
            return memory.read(readable[0][0] + offset, length)      # the common case: inside the first
        out = []
        for addr, n in readable:
            if offset >= n:
                offset -= n
                continue
            if not out and offset + length <= n:      # wholly inside this buffer: no join
                return memory.read(addr + offset, length)
            take = min(n - offset, length)
            out.append(memory.read(addr + offset, take))
            length -= take
            offset = 0
            if not length:
                break
        return b"".join(out)

    def views(self, memory: GuestMemory, offset: int) -> list[memoryview]:
        """Read-only views of guest RAM over the readable buffers from
        `offset` on, in order, without copying (a disk write goes straight
        from them).  Each view covers exactly its part of one buffer that
        pop() checked to be RAM.  The guest may not touch the buffers until
        the chain is used, so the caller may hold them until then, no longer."""
        out = []
        for addr, n in self.readable:
            if offset >= n:
                offset -= n
                continue
            mm, at = memory.locate(addr + offset, n - offset)
            out.append(memoryview(mm)[at:at + n - offset].toreadonly())
            offset = 0
        return out

    def write(self, memory: GuestMemory, offset: int, data: bytes | memoryview) -> int:
        """Writes `data` into the writable buffers from `offset` on; returns
        how many bytes fitted."""
        writable = self.writable
        if writable and offset < writable[0][1] and offset + len(data) <= writable[0][1]:
            memory.write(writable[0][0] + offset, data)              # the common case: inside the first
            return len(data)
        data = memoryview(data)
        done = 0
        for addr, n in self.writable:
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(data) - done)
            memory.write(addr + offset, data[done:done + take])
            done += take
            offset = 0
            if done == len(data):
                break
        return done


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring (with the
    EVENT_IDX words) for a queue of `size` entries."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class VirtQueue:
    """The device's side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int,
                 event_idx: bool = False, indirect: bool = False):
        """Raises QueueError for a size that is not a power of two up to
        32768, a misaligned ring or a ring that is not wholly RAM."""
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        for what, addr, align, length in zip(("descriptor table", "avail ring", "used ring"),
                                             (desc, avail, used), (16, 2, 4), ring_sizes(size)):
            if addr % align or not memory.is_ram(addr, length):
                raise QueueError(f"{what} at {addr:#x}+{length:#x} is misaligned or not RAM")
        self.memory = memory
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0        # next avail ring entry to take
        # RAM mappings of the table and the avail ring (checked just above).
        self._desc_mm, self._desc_off = memory.locate(desc, DESC_SIZE * size)
        self._avail_mm, self._avail_off = memory.locate(avail, ring_sizes(size)[1])
        # The first RAM region's bounds: most buffers lie there, so _walk
        # checks them inline before asking is_ram (regions never shrink).
        low = memory.regions[0]
        self._low_ram = (low.gpa, low.gpa + low.size)
        self.used_idx = memory.read_u16(used + 2)
        self.signalled_used = self.used_idx   # used idx at the last should_notify()

    def __repr__(self) -> str:
        return f"VirtQueue(size={self.size}, last_avail={self.last_avail}, used={self.used_idx})"

    # --- driver -> device ---------------------------------------------------------------

    def pending(self) -> int:
        """Chains the driver made available that pop() has not taken.
        Raises QueueError when the avail index ran more than a ring ahead."""
        n = (U16.unpack_from(self._avail_mm, self._avail_off + 2)[0] - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"avail idx is {n} entries ahead of a {self.size}-entry ring")
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises QueueError."""
        if not self.pending():
            return None
        head = U16.unpack_from(self._avail_mm, self._avail_off + 4 + 2 * (self.last_avail & (self.size - 1)))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:   # avail_event: "tell me when you pass this one"
            self.memory.write_u16(self.used + 4 + 8 * self.size, self.last_avail)
        chain = Chain(head)
        try:
            self._walk(chain, self.desc, self.size, head, nested=False)
        except GuestMemoryError as e:
            raise QueueError(f"descriptor chain {head}: {e}") from None
        return chain

    def unpop(self, count: int) -> None:
        """Gives back the last `count` chains pop() returned, unused: the
        next pop() walks them again (a device that found too few buffers
        for what it has to deliver waits for more).  avail_event stays
        where pop() left it, so the driver still kicks for new buffers."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def _walk(self, chain: Chain, table: int, count: int, index: int, nested: bool) -> None:
        seen = 0
        total = chain.readable_len + chain.writable_len
        memory, desc_mm, desc_off = self.memory, self._desc_mm, self._desc_off
        low_start, low_end = self._low_ram
        while True:
            if index >= count:
                raise QueueError(f"descriptor index {index} outside a table of {count}")
            seen += 1
            if seen > count:
                raise QueueError(f"descriptor chain {chain.head} loops")
            if not nested:                 # the queue's own table, mapped at build time
                addr, length, flags, nxt = DESC.unpack_from(desc_mm, desc_off + DESC_SIZE * index)
            else:
                addr, length, flags, nxt = DESC.unpack(memory.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & DESC_F_INDIRECT:
                if nested or not self.indirect:
                    raise QueueError("indirect descriptor " + ("inside an indirect table" if nested
                                                               else "without INDIRECT_DESC"))
                if flags & DESC_F_NEXT or not length or length % DESC_SIZE:
                    raise QueueError(f"indirect table of {length} bytes (or with NEXT)")
                if length // DESC_SIZE > MAX_QUEUE_SIZE or not self.memory.is_ram(addr, length):
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is not RAM")
                self._walk(chain, addr, length // DESC_SIZE, 0, nested=True)
                return
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"descriptor chain {chain.head} claims more than {MAX_CHAIN_BYTES} bytes")
            if length and not (low_start <= addr and addr + length <= low_end) and not memory.is_ram(addr, length):
                raise QueueError(f"buffer at {addr:#x}+{length:#x} is not RAM")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
                chain.writable_len += length
            elif chain.writable:
                raise QueueError(f"descriptor chain {chain.head}: a readable buffer after a writable one")
            else:
                chain.readable.append((addr, length))
                chain.readable_len += length
            if not flags & DESC_F_NEXT:
                return
            index = nxt

    # --- device -> driver -----------------------------------------------------------------

    def add_used(self, head: int, written: int) -> None:
        """Returns chain `head` with `written` bytes written into it."""
        memory = self.memory
        memory.write(self.used + 4 + 8 * (self.used_idx & (self.size - 1)), USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        memory.write(self.used + 2, U16.pack(self.used_idx))   # after the element: the driver reads idx first

    def add_used_many(self, used: list[tuple[int, int]]) -> None:
        """Returns several (head, written) chains that the driver must see
        at once (one merged receive frame): every element first, then the
        used idx, once."""
        for i, (head, written) in enumerate(used):
            self.memory.write(self.used + 4 + 8 * ((self.used_idx + i) % self.size), USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + len(used)) & 0xFFFF
        self.memory.write_u16(self.used + 2, self.used_idx)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was used since the
        last call (used_event with EVENT_IDX, else the NO_INTERRUPT flag)."""
        new, old = self.used_idx, self.signalled_used
        self.signalled_used = new
        if self.event_idx:     # used_event sits right after the avail ring (mapped at build time)
            used_event = U16.unpack_from(self._avail_mm, self._avail_off + 4 + 2 * self.size)[0]
            # vring_need_event: did the used idx pass used_event since old?
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return new != old and not U16.unpack_from(self._avail_mm, self._avail_off)[0] & AVAIL_F_NO_INTERRUPT

    # --- snapshots -----------------------------------------------------------------------

    def save(self) -> dict:
        return {"size": self.size, "desc": self.desc, "avail": self.avail, "used": self.used,
                "event_idx": self.event_idx, "indirect": self.indirect,
                "last_avail": self.last_avail, "used_idx": self.used_idx,
                "signalled_used": self.signalled_used}


__all__ = ["VirtQueue", "Chain", "QueueError", "ring_sizes", "DESC", "DESC_F_NEXT", "DESC_F_WRITE",
           "DESC_F_INDIRECT", "MAX_QUEUE_SIZE"]
