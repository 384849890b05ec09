"""Host ends of virtio-console ports (console.py's PortBackend):

    StdioPort    the terminal pyvmm runs in: guest bytes go to the console
                 output, keyboard bytes come in through feed() (the runner
                 sends them here instead of COM1 when hvc0 is on stdio)
    SocketPort   a Unix stream socket pyvmm listens on; one client at a
                 time (a second is turned away), whose connecting and
                 leaving the guest sees as the port's host side opening
                 and closing
    NullPort     nothing: guest bytes are dropped, none come in

Sockets are non-blocking and read on the machine's event loop.  A client
that does not read gets what its socket buffer holds; the rest of a write
is dropped and counted, as a serial line without flow control would, so
that a stuck client never blocks a vCPU.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable

from ...errors import ConfigError

log = logging.getLogger(__name__)

READ_CHUNK = 4096
PORT_SPEC = "stdio|null|socket=PATH[,name=NAME]"


def parse_port(spec: str) -> tuple[str, str | None, str | None]:
    """`--virtio-console` SPEC as (kind, socket path, port name): without
    name= the console port (hvc0), with one a named port.
    Raises ConfigError."""
    kind, path, name = None, None, None
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq and key in ("stdio", "null") and kind is None:
            kind = key
        elif key == "socket" and eq and value and kind is None:
            kind, path = "socket", value
        elif key == "name" and eq and name is None:
            name = value
        else:
            raise ConfigError(f"--virtio-console {spec!r}: expected {PORT_SPEC}")
    if kind is None:
        raise ConfigError(f"--virtio-console {spec!r}: a backend is required ({PORT_SPEC})")
    if name is not None and (not name or len(name) > 64 or "/" in name
                             or not all(c.isalnum() or c in "._-" for c in name)):
        raise ConfigError(f"--virtio-console {spec!r}: a port name is 1-64 letters, digits, '.', '_', '-'")
    return kind, path, name


def check_ports(specs: list[str]) -> None:
    """At most one console port (no name=) and no name twice. Raises ConfigError."""
    parsed = [parse_port(s) for s in specs]
    if sum(name is None for _, _, name in parsed) > 1:
        raise ConfigError("--virtio-console: only one port without name= (the console, hvc0)")
    names = [name for _, _, name in parsed if name is not None]
    if len(set(names)) != len(names):
        raise ConfigError("--virtio-console: a port name is given twice")


class NullPort:
    connected = False

    def __repr__(self) -> str:
        return "NullPort()"

    def write(self, data: bytes) -> None:
        pass

    def start(self, on_input: Callable[[bytes], None], on_connect: Callable[[bool], None]) -> None:
        pass

    def close(self) -> None:
        pass


class StdioPort:
    """Output to `output(bytes)`; input through feed()."""

    connected = True

    def __init__(self, output: Callable[[bytes], None]):
        self.output = output
        self._on_input: Callable[[bytes], None] | None = None

    def __repr__(self) -> str:
        return "StdioPort()"

    def write(self, data: bytes) -> None:
        self.output(data)

    def start(self, on_input: Callable[[bytes], None], on_connect: Callable[[bool], None]) -> None:
        self._on_input = on_input

    def feed(self, data: bytes) -> None:
        """Keyboard bytes for the guest (called on the event loop)."""
        if self._on_input is not None:
            self._on_input(data)

    def close(self) -> None:
        self._on_input = None


class SocketPort:
    """A Unix socket server at `path` on `loop`. Raises ConfigError when it
    cannot listen there (a path that exists and is not a socket included)."""

    def __init__(self, path: str, loop):
        self.path = path
        self.loop = loop
        self.client: socket.socket | None = None
        self.dropped = 0
        self._on_input: Callable[[bytes], None] | None = None
        self._on_connect: Callable[[bool], None] | None = None
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)           # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError(f"virtio-console socket {path}: {e.strerror}") from None
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.bind(path)
            self.server.listen(1)
        except OSError as e:
            self.server.close()
            raise ConfigError(f"virtio-console socket {path}: {e.strerror}") from None
        self.server.setblocking(False)

    def __repr__(self) -> str:
        return f"SocketPort({self.path!r}, connected={self.connected}, dropped={self.dropped})"

    @property
    def connected(self) -> bool:
        return self.client is not None

    def start(self, on_input: Callable[[bytes], None], on_connect: Callable[[bool], None]) -> None:
        self._on_input, self._on_connect = on_input, on_connect
        self.loop.add_reader(self.server.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        if self.client is not None:
            conn.close()                   # one client at a time
            return
        conn.setblocking(False)
        self.client = conn
        self.loop.add_reader(conn.fileno(), self._readable)
        if self._on_connect is not None:
            self._on_connect(True)

    def _readable(self) -> None:
        try:
            data = self.client.recv(READ_CHUNK) if self.client is not None else b""
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
        elif self._on_input is not None:
            self._on_input(data)

    def _drop_client(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        self.loop.remove_reader(client.fileno())
        client.close()
        if self._on_connect is not None:
            self._on_connect(False)

    def write(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.dropped += len(data)
            return
        try:
            sent = client.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.dropped += len(data)
            self.loop.call_soon_threadsafe(self._drop_client)
            return
        self.dropped += len(data) - sent

    def close(self) -> None:
        if self.client is not None:
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None
        self.loop.remove_reader(self.server.fileno())
        self.server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


__all__ = ["NullPort", "SocketPort", "StdioPort", "check_ports", "parse_port"]
