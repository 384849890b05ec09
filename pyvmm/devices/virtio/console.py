"""virtio-console (virtio 1.2, section 5.3) with MULTIPORT: port 0 is the
console (Linux's hvc0), ports 1.. are named serial ports the guest finds
as /dev/vportNpM with /sys/class/virtio-ports/vportNpM/name.

Queues: port 0 receive/transmit are 0 and 1, the control queues 2
(device -> driver) and 3 (driver -> device), port P >= 1 uses 2 + 2P and
3 + 2P.  Without MULTIPORT only queues 0 and 1 exist for the driver.

Control messages are struct virtio_console_control (id, event, value);
the handshake the Linux driver runs:

    driver: DEVICE_READY          device: DEVICE_ADD for every port
    driver: PORT_READY(id)        device: CONSOLE_PORT(0) for port 0, or
                                  PORT_NAME(id) + the name for a named port,
                                  then PORT_OPEN(id, host connected?)
    driver: PORT_OPEN(id, 0|1)    (the guest opened or closed the port)

Each port has a backend (console_ports.py): bytes the guest transmits go
to backend.write(); bytes from the host arrive through receive(port,
data) on the event loop, wait in a bounded buffer (INPUT_LIMIT; the rest
is dropped and counted) and fill the port's receive buffers when the
guest posts them and has opened the port (PORT_OPEN; Linux sends it for
the console as soon as it makes it hvc0).  `wake(queue)` is the transport's notify, set by the
board as for virtio-net, so that work found off a guest kick (host input,
control replies) still runs through the transport's checks and raises the
interrupt the driver asked for.

A transmit chain with writable buffers or a receive chain with readable
ones is a QueueError: NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Protocol

from ...memory import GuestMemory
from .device import VirtioDevice
from .queue import QueueError, VirtQueue

log = logging.getLogger(__name__)

DEVICE_ID_CONSOLE = 3
QUEUE_SIZE = 128
F_SIZE, F_MULTIPORT = 1 << 0, 1 << 1
CONTROL_RX, CONTROL_TX = 2, 3
CONTROL = struct.Struct("<IHH")            # id, event, value
CONFIG = struct.Struct("<HHII")            # cols, rows, max_nr_ports, emerg_wr
(DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY, CONSOLE_PORT, RESIZE, PORT_OPEN,
 PORT_NAME) = range(8)
INPUT_LIMIT = 1 << 16                      # host bytes held per port while the guest reads none
MAX_PORTS = 31


class PortBackend(Protocol):
    """The host end of one port (console_ports.py)."""

    connected: bool

    def write(self, data: bytes) -> None: ...

    def start(self, on_input: Callable[[bytes], None], on_connect: Callable[[bool], None]) -> None: ...

    def close(self) -> None: ...


def rx_queue(port: int) -> int:
    return 0 if port == 0 else 2 + 2 * port


def port_of_queue(index: int) -> int | None:
    """The port a data queue belongs to (None for the control queues)."""
    if index in (CONTROL_RX, CONTROL_TX):
        return None
    return index // 2 if index < 2 else index // 2 - 1


class VirtioConsole(VirtioDevice):
    """`backends[0]` behind the console port, `backends[P]` behind the port
    named `names[P]` (names[0] is ignored: the console has no name)."""

    DEVICE_ID = DEVICE_ID_CONSOLE

    def __init__(self, memory: GuestMemory, backends: list[PortBackend], names: list[str | None]):
        super().__init__(memory)
        if not 1 <= len(backends) <= MAX_PORTS or len(names) != len(backends):
            raise ValueError(f"a virtio-console has 1 to {MAX_PORTS} ports, each with a backend")
        self.backends = backends
        self.names = names
        self.features = F_MULTIPORT
        self.QUEUE_SIZES = (QUEUE_SIZE,) * (2 * (len(backends) + 1))
        self.wake: Callable[[int], None] | None = None
        self.pending_in = [bytearray() for _ in backends]
        self.control_out: list[bytes] = []     # control messages waiting for a control rx buffer
        self.guest_open = [False] * len(backends)
        self.dropped_in = 0
        self.bytes_out = self.bytes_in = 0

    def __repr__(self) -> str:
        return (f"VirtioConsole({len(self.backends)} ports, out={self.bytes_out}, in={self.bytes_in}, "
                f"dropped={self.dropped_in})")

    @property
    def multiport(self) -> bool:
        return bool(self.acked & F_MULTIPORT)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(0, 0, len(self.backends), 0)

    def start(self) -> None:
        """Starts every backend (the board calls it once wake is set)."""
        for port, backend in enumerate(self.backends):
            backend.start(lambda data, port=port: self.receive(port, data),
                          lambda up, port=port: self.host_connected(port, up))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    # --- from the host (event loop) -----------------------------------------------------

    def receive(self, port: int, data: bytes) -> None:
        """Host bytes for `port`: held, then given to the guest's buffers."""
        room = INPUT_LIMIT - len(self.pending_in[port])
        if len(data) > room:
            self.dropped_in += len(data) - room
            data = data[:max(room, 0)]
        self.pending_in[port] += data
        self._kick(rx_queue(port))

    def host_connected(self, port: int, up: bool) -> None:
        """A client connected to (or left) the port's host end."""
        if self.multiport and port:
            self._control(port, PORT_OPEN, int(up))

    # --- queues ------------------------------------------------------------------------

    def process(self, index: int, queue: VirtQueue) -> None:
        if index == CONTROL_TX:
            self._control_from_driver(queue)
        elif index == CONTROL_RX:
            self._fill_control(queue)
        elif index % 2:
            self._transmit(port_of_queue(index), queue)
        else:
            self._fill_input(port_of_queue(index), queue)

    def _kick(self, index: int) -> None:
        if self.wake is not None:
            self.wake(index)

    def _transmit(self, port: int, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.writable:
                raise QueueError("virtio-console: a transmit chain with device-writable buffers")
            data = chain.read(self.memory, 0, chain.readable_len)
            self.bytes_out += len(data)
            self.backends[port].write(data)
            queue.add_used(chain.head, 0)

    def _fill_input(self, port: int, queue: VirtQueue) -> None:
        if self.multiport and not self.guest_open[port]:
            return      # Linux discards what reaches a port the guest has not opened: hold it
        pending = self.pending_in[port]
        while pending and (chain := queue.pop()) is not None:
            if chain.readable:
                raise QueueError("virtio-console: a receive chain with device-readable buffers")
            written = chain.write(self.memory, 0, memoryview(pending)[:chain.writable_len])
            del pending[:written]
            self.bytes_in += written
            queue.add_used(chain.head, written)

    # --- control queues ----------------------------------------------------------------

    def _control(self, port: int, event: int, value: int, extra: bytes = b"") -> None:
        self.control_out.append(CONTROL.pack(port, event, value) + extra)
        self._kick(CONTROL_RX)

    def _fill_control(self, queue: VirtQueue) -> None:
        while self.control_out and (chain := queue.pop()) is not None:
            if chain.readable:
                raise QueueError("virtio-console: a control receive chain with device-readable buffers")
            message = self.control_out.pop(0)
            queue.add_used(chain.head, chain.write(self.memory, 0, message))

    def _control_from_driver(self, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            raw = chain.read(self.memory, 0, CONTROL.size)
            queue.add_used(chain.head, 0)
            if len(raw) < CONTROL.size:
                log.debug("virtio-console: short control message ignored")
                continue
            port, event, value = CONTROL.unpack(raw)
            if event == DEVICE_READY and value == 1:
                for p in range(len(self.backends)):
                    self._control(p, DEVICE_ADD, 1)
            elif port >= len(self.backends):
                log.debug("virtio-console: control event %d for port %d ignored", event, port)
            elif event == PORT_READY and value == 1:
                if port == 0:
                    self._control(0, CONSOLE_PORT, 1)
                elif self.names[port]:
                    self._control(port, PORT_NAME, 1, self.names[port].encode())
                self._control(port, PORT_OPEN, int(self.backends[port].connected))
            elif event == PORT_OPEN:
                self.guest_open[port] = bool(value)
                if value:   # what the host sent before the guest opened the port
                    self._kick(rx_queue(port))

    # --- contract ------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self.control_out.clear()
        self.guest_open = [False] * len(self.backends)

    def save_fields(self) -> dict:
        return {"pending_in": [bytes(p).hex() for p in self.pending_in],
                "control_out": [m.hex() for m in self.control_out],
                "guest_open": list(self.guest_open)}

    def restore_fields(self, state: dict) -> None:
        pending = [bytearray.fromhex(p) for p in state["pending_in"]]
        if len(pending) != len(self.backends):
            raise ValueError(f"virtio-console state has {len(pending)} ports, not {len(self.backends)}")
        self.pending_in = pending
        self.control_out = [bytes.fromhex(m) for m in state["control_out"]]
        self.guest_open = [bool(v) for v in state["guest_open"]]


__all__ = [
    "CONSOLE_PORT",
    "CONTROL",
    "CONTROL_RX",
    "CONTROL_TX",
    "DEVICE_ADD",
    "DEVICE_ID_CONSOLE",
    "DEVICE_READY",
    "F_MULTIPORT",
    "INPUT_LIMIT",
    "PORT_NAME",
    "PORT_OPEN",
    "PORT_READY",
    "PortBackend",
    "VirtioConsole",
    "rx_queue",
]
