"""virtio-net (virtio 1.2, section 5.1): one receive queue (0), one
transmit queue (1) and a control queue (2) in front of a NetPort
(net/port.py: a TAP device, a switch port, or a test's fake).

Every buffer starts with the 12-byte struct virtio_net_hdr (VERSION_1
always has num_buffers).

Features: MAC (always: the address lives in the device, so it survives
snapshots and migration), STATUS (link up, and ANNOUNCE), CTRL_VQ with
GUEST_ANNOUNCE (announce() asks the driver to tell the network where the
guest is now, as after a migration; the driver answers with the control
command ANNOUNCE_ACK), CSUM (the guest may leave a TCP/UDP checksum to the
device: NEEDS_CSUM with csum_start/csum_offset) and GUEST_CSUM (received
TCP/UDP packets whose checksum the device verified carry DATA_VALID, so the
guest skips its own pass).  The checksum work (net_offload.py) is one
big-integer reduction on the host, which costs less than the guest kernel's
loop under bt.  MRG_RXBUF (5.1.6.3.1, 5.1.6.4): the driver may post
buffers smaller than a frame; one frame then fills several receive chains
in turn, each but the last to the brim, and the header in the first says
how many (num_buffers).  Without it a frame takes one chain and
num_buffers is 1.  HOST_TSO4/HOST_TSO6 (5.1.6.2): the driver may hand
over TCP super-frames of up to 64 KiB (gso_type TCPV4/TCPV6, gso_size the
payload of each segment); the device cuts them into wire-sized frames
(net_offload.tso_segments) before any backend sees them, so a switch port,
a TAP device or FT's held output all get ordinary frames.  HOST_ECN is not
offered, so a gso_type with the ECN bit is the driver's error.

TX: each chain is a header and a frame in device-readable buffers; the
frame (or its segments) goes to the backend and the chain comes back with
0 bytes written.  A header the device cannot honour (a GSO type not
negotiated, gso_size 0, offsets outside the frame...) drops the frame and
counts it in tx_dropped: a hostile guest loses its own frame, nothing more.
RX: a frame from the backend (on the machine's event loop) fills one
chain of device-writable buffers (several with MRG_RXBUF).  When the guest
has posted too few buffers, or the device is not running, frames are HELD,
up to RX_BACKLOG of them (then newer ones are dropped and counted), and
delivered when the driver next kicks the receive queue.  A frame longer
than its chain (without MRG_RXBUF) or than the whole ring's buffers (with
it) is dropped.

A chain in the wrong direction (writable buffers on TX, readable ones on
RX) or without room for the header is a QueueError: NEEDS_RESET.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import deque
from typing import Callable

from ...device import as_int
from ...memory import GuestMemory
from ...net.port import MAX_FRAME, NetPort
from .device import VirtioDevice
from .net_offload import complete_checksum, l4_checksum_ok, tso_segments
from .queue import QueueError, VirtQueue

log = logging.getLogger(__name__)

DEVICE_ID_NET = 1
RX_QUEUE, TX_QUEUE, CTRL_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
RX_BACKLOG = 256

F_CSUM, F_GUEST_CSUM, F_MAC = 1 << 0, 1 << 1, 1 << 5
F_HOST_TSO4, F_HOST_TSO6 = 1 << 11, 1 << 12
F_MRG_RXBUF = 1 << 15
F_STATUS, F_CTRL_VQ, F_GUEST_ANNOUNCE = 1 << 16, 1 << 17, 1 << 21
S_LINK_UP, S_ANNOUNCE = 1, 2

# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size                       # 12
HDR_F_NEEDS_CSUM, HDR_F_DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
RX_HEADER = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)    # one buffer per frame
RX_HEADER_VALID = NET_HDR.pack(HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 1)

# Control queue (5.1.6.5): class, command, data..., then one writable ack byte.
CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK = 3, 0
CTRL_OK, CTRL_ERR = 0, 1
CONFIG = struct.Struct("<6sHH")                   # mac, status, max_virtqueue_pairs
ETH_MIN = 14


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` as 6 bytes. Raises ValueError."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs separated by ':')")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text!r} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(index: int) -> bytes:
    """The address of the index-th NIC without mac=: QEMU's locally
    administered 52:54:00:12:34:56, counting up."""
    return bytes((0x52, 0x54, 0x00, 0x12, 0x34, (0x56 + index) & 0xFF))


def derived_mac(identity: str) -> bytes:
    """A stable address for a NIC on a shared switch: QEMU's 52:54:00
    prefix and three bytes of SHA-256 of `identity` (what sets this VM and
    NIC apart), so a VM keeps its MAC across runs while different VMs on
    one switch do not all share 52:54:00:12:34:56."""
    digest = hashlib.sha256(identity.encode()).digest()
    return bytes((0x52, 0x54, 0x00)) + digest[:3]


class VirtioNet(VirtioDevice):
    """A NIC with address `mac` (6 bytes) on `port`.  `wake(queue)` is set
    by the board (install.py) to the transport's notify: the device calls
    it when a frame arrives, so the transport runs process() with the
    queue's checks and raises the interrupt the driver asked for."""

    DEVICE_ID = DEVICE_ID_NET
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE)

    def __init__(self, memory: GuestMemory, port: NetPort, mac: bytes):
        super().__init__(memory)
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.port = port
        self.mac = bytes(mac)
        self.features = (F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE | F_CSUM | F_GUEST_CSUM
                         | F_MRG_RXBUF | F_HOST_TSO4 | F_HOST_TSO6)
        self.announcing = False      # S_ANNOUNCE: set by announce(), cleared by the driver's ack
        self.wake: Callable[[int], None] | None = None
        self.backlog: deque[bytes] = deque()
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = 0
        # Fault tolerance (pyvmm/ft/virtio.py): frames from the port go to
        # rx_hook, which delivers them at a logged point with deliver().
        self.rx_hook: Callable[[bytes], None] | None = None
        port.on_receive(self.receive)

    def __repr__(self) -> str:
        return (f"VirtioNet({format_mac(self.mac)}, rx={self.rx_frames}, tx={self.tx_frames}, "
                f"held={len(self.backlog)}, dropped rx={self.rx_dropped} tx={self.tx_dropped})")

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, S_LINK_UP | (S_ANNOUNCE if self.announcing else 0), 1)

    def announce(self) -> bool:
        """Asks the driver to announce the guest (gratuitous ARP and
        neighbour advertisements), as after a migration: sets S_ANNOUNCE
        and signals a config change.  False when the driver did not take
        GUEST_ANNOUNCE (then there is no one to ask)."""
        if not self.acked & F_GUEST_ANNOUNCE:
            return False
        self.announcing = True
        self.config_changed()
        return True

    # --- frames from the backend --------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """A frame for the guest (called on the event loop)."""
        if self.rx_hook is not None:
            self.rx_hook(frame)
            return
        self.deliver(frame)

    def deliver(self, frame: bytes) -> None:
        """Hands `frame` to the guest now, under the machine's lock."""
        if len(self.backlog) >= RX_BACKLOG:
            self.rx_dropped += 1
            return
        self.backlog.append(frame)
        if self.wake is not None:
            self.wake(RX_QUEUE)

    # --- the queues ---------------------------------------------------------------------

    def process(self, index: int, queue: VirtQueue) -> None:
        if index == TX_QUEUE:
            self._transmit(queue)
        elif index == RX_QUEUE:
            self._fill(queue)
        elif index == CTRL_QUEUE:
            self._control(queue)

    def _control(self, queue: VirtQueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                return
            if chain.readable_len < 2 or chain.writable_len < 1:
                raise QueueError(f"virtio-net control chain {chain.head} lacks a header or an ack byte")
            klass, command = chain.read(self.memory, 0, 2)
            ack = CTRL_ERR
            if (klass, command) == (CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK) and self.acked & F_GUEST_ANNOUNCE:
                self.announcing = False
                ack = CTRL_OK
            else:
                log.debug("virtio-net control command %d.%d refused", klass, command)
            chain.write(self.memory, chain.writable_len - 1, bytes([ack]))
            queue.add_used(chain.head, chain.writable_len)

    def _transmit(self, queue: VirtQueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                return
            if chain.writable:
                raise QueueError(f"virtio-net TX chain {chain.head} has device-writable buffers")
            length = chain.readable_len
            if length < NET_HDR_SIZE:
                raise QueueError(f"virtio-net TX chain {chain.head} of {length} bytes has no header")
            if not ETH_MIN <= length - NET_HDR_SIZE <= MAX_FRAME:
                self.tx_dropped += 1     # a runt or a giant: the guest's loss, not a protocol error
            else:
                frames = self._outgoing(chain, length)
                if frames is None:
                    self.tx_dropped += 1
                else:
                    for frame in frames:
                        self.port.send(frame)
                    self.tx_frames += len(frames)
            queue.add_used(chain.head, 0)

    def _outgoing(self, chain, length: int) -> list[bytes] | None:
        """The frames of a TX chain for the wire: the one frame, its
        checksum completed when the driver asked (CSUM), or the segments
        of a TCP super-frame (HOST_TSO4/6); None for a header the device
        cannot honour."""
        flags, gso, hdr_len, gso_size, start, offset, _ = NET_HDR.unpack(chain.read(self.memory, 0,
                                                                                    NET_HDR_SIZE))
        if gso != GSO_NONE:
            if gso == GSO_TCPV4 and self.acked & F_HOST_TSO4:
                v6 = False
            elif gso == GSO_TCPV6 and self.acked & F_HOST_TSO6:
                v6 = True
            else:
                return None              # a type not negotiated (the ECN bit among them: no HOST_ECN)
            frame = chain.read(self.memory, NET_HDR_SIZE, length - NET_HDR_SIZE)
            csum = (start, offset) if flags & HDR_F_NEEDS_CSUM else None
            return tso_segments(frame, v6, gso_size, hdr_len, csum)
        if not (flags & HDR_F_NEEDS_CSUM and self.acked & F_CSUM):
            return [chain.read(self.memory, NET_HDR_SIZE, length - NET_HDR_SIZE)]
        frame = bytearray(chain.read(self.memory, NET_HDR_SIZE, length - NET_HDR_SIZE))
        return [bytes(frame)] if complete_checksum(frame, start, offset) else None

    @staticmethod
    def _rx_chain(queue: VirtQueue):
        """The next receive chain (None: none posted). Raises QueueError for
        one that is not device-writable or has no room for the header."""
        chain = queue.pop()
        if chain is None:
            return None
        if chain.readable:
            raise QueueError(f"virtio-net RX chain {chain.head} has device-readable buffers")
        if chain.writable_len < NET_HDR_SIZE:
            raise QueueError(f"virtio-net RX chain {chain.head} of {chain.writable_len} bytes has no room "
                             "for the header")
        return chain

    def _fill(self, queue: VirtQueue) -> None:
        merge = self.acked & F_MRG_RXBUF
        while self.backlog:
            if merge:
                if not self._fill_merged(queue, self.backlog[0]):
                    return               # held until the driver posts more buffers
                self.backlog.popleft()
                continue
            chain = self._rx_chain(queue)
            if chain is None:
                return                   # held until the driver posts buffers
            room = chain.writable_len
            frame = self.backlog.popleft()
            if len(frame) > room - NET_HDR_SIZE:
                self.rx_dropped += 1
                queue.add_used(chain.head, 0)
                continue
            valid = self.acked & F_GUEST_CSUM and l4_checksum_ok(frame)
            chain.write(self.memory, 0, RX_HEADER_VALID if valid else RX_HEADER)
            chain.write(self.memory, NET_HDR_SIZE, frame)
            self.rx_frames += 1
            queue.add_used(chain.head, NET_HDR_SIZE + len(frame))

    def _fill_merged(self, queue: VirtQueue, frame: bytes) -> bool:
        """Spreads `frame` over as many receive chains as it needs (MRG_RXBUF).
        False: too few posted, none taken (the frame waits).  A frame that
        the whole ring could not hold is dropped.  Raises QueueError."""
        need = NET_HDR_SIZE + len(frame)
        chains, room = [], 0
        while room < need:
            chain = self._rx_chain(queue)
            if chain is None:
                queue.unpop(len(chains))
                if len(chains) < queue.size:
                    return False
                self.rx_dropped += 1     # every buffer of the ring is too little: it would wait forever
                return True
            chains.append(chain)
            room += chain.writable_len
        flags = HDR_F_DATA_VALID if self.acked & F_GUEST_CSUM and l4_checksum_ok(frame) else 0
        data = memoryview(frame)
        first = chains[0]
        first.write(self.memory, 0, NET_HDR.pack(flags, GSO_NONE, 0, 0, 0, 0, len(chains)))
        done = first.write(self.memory, NET_HDR_SIZE, data)
        used = [(first.head, NET_HDR_SIZE + done)]
        for chain in chains[1:]:
            n = chain.write(self.memory, 0, data[done:])
            used.append((chain.head, n))
            done += n
        queue.add_used_many(used)
        self.rx_frames += 1
        return True

    # --- contract -----------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self.backlog.clear()
        self.announcing = False

    def close(self) -> None:
        self.port.close()

    def save_fields(self) -> dict:
        # Held frames are not saved: a network may lose frames, and the
        # MAC is the device's (the restoring side is built with it).
        return {"mac": format_mac(self.mac), "rx_frames": self.rx_frames, "tx_frames": self.tx_frames,
                "rx_dropped": self.rx_dropped, "tx_dropped": self.tx_dropped, "announcing": self.announcing}

    def restore_fields(self, state: dict) -> None:
        mac = parse_mac(state["mac"]) if "mac" in state else self.mac
        counts = [as_int(state.get(k, 0)) for k in ("rx_frames", "tx_frames", "rx_dropped", "tx_dropped")]
        announcing = bool(state.get("announcing", False))
        self.mac = mac
        self.rx_frames, self.tx_frames, self.rx_dropped, self.tx_dropped = counts
        self.announcing = announcing
        self.backlog.clear()


__all__ = ["VirtioNet", "parse_mac", "format_mac", "default_mac", "derived_mac", "DEVICE_ID_NET", "F_MAC", "F_STATUS", "F_CSUM", "F_GUEST_CSUM", "F_CTRL_VQ",
           "F_GUEST_ANNOUNCE", "F_MRG_RXBUF", "F_HOST_TSO4", "F_HOST_TSO6", "NET_HDR", "CTRL_QUEUE",
           "NET_HDR_SIZE", "RX_QUEUE", "TX_QUEUE", "RX_BACKLOG"]
