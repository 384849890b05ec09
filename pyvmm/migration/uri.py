"""Where a migration stream goes: QEMU's `tcp:HOST:PORT` and `unix:PATH`."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..errors import VmmError
from ..hostsocket import listen_on

CONNECT_TIMEOUT_S = 10.0


class MigrationError(VmmError):
    """A migration that cannot start or go on (what is wrong is said)."""


@dataclass(frozen=True)
class MigrationUri:
    kind: str           # "tcp" or "unix"
    address: str        # host or socket path
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.address}" if self.kind == "unix" else f"tcp:{self.address}:{self.port}"

    def connect(self) -> socket.socket:
        """A connected socket. Raises MigrationError."""
        try:
            if self.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(self.address)
            else:
                sock = socket.create_connection((self.address, self.port), CONNECT_TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise MigrationError(f"cannot connect to {self}: {e.strerror or e}") from None
        return sock

    def listen(self) -> socket.socket:
        """A listening socket (a stale unix socket file is replaced). Raises MigrationError."""
        try:
            return listen_on(self.kind, self.address, self.port, backlog=1)
        except OSError as e:
            raise MigrationError(f"cannot listen on {self}: {e.strerror or e}") from None


def parse_uri(text: str) -> MigrationUri:
    """Parses `tcp:HOST:PORT` or `unix:PATH`. Raises MigrationError."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return MigrationUri("unix", rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and int(port) < 65536:
            return MigrationUri("tcp", host, int(port))
    raise MigrationError(f"bad migration URI {text!r} (expected tcp:HOST:PORT or unix:PATH)")
