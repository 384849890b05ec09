"""Where a control socket listens: `--qmp` specs in QEMU's chardev spelling,
`unix:PATH,server[,wait=off]` and `tcp:HOST:PORT,server[,wait=off]`."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..errors import ConfigError
from ..hostsocket import listen_on


@dataclass(frozen=True)
class Endpoint:
    kind: str            # "unix" or "tcp"
    address: str         # the socket path, or the host
    port: int = 0
    wait: bool = True    # QEMU's default: start the guest once a client has connected

    def __str__(self) -> str:
        return f"unix:{self.address}" if self.kind == "unix" else f"tcp:{self.address}:{self.port}"

    def listen(self) -> socket.socket:
        """A listening socket (a stale unix socket file is replaced).
        Raises ConfigError (one line) when the host refuses."""
        try:
            return listen_on(self.kind, self.address, self.port, backlog=8)
        except OSError as e:
            raise ConfigError(f"--qmp {self}: {e.strerror or e}") from None


def parse_endpoint(text: str) -> Endpoint:
    """Parses one --qmp value. Raises ConfigError."""
    head, *opts = text.split(",")
    kind, _, rest = head.partition(":")
    bad = ConfigError(f"bad --qmp {text!r} (expected unix:PATH,server[,wait=off] or tcp:HOST:PORT,server)")
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        options[key] = value if eq else "on"
    if set(options) - {"server", "wait"} or any(v not in ("on", "off") for v in options.values()):
        raise bad
    wait = options.get("wait", "on") == "on"
    if kind == "unix" and rest:
        endpoint = Endpoint("unix", rest, 0, wait)
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not (host and port.isdigit() and int(port) < 65536):
            raise bad
        endpoint = Endpoint("tcp", host, int(port), wait)
    else:
        raise bad
    if options.get("server") != "on":
        raise ConfigError(f"--qmp {text!r}: only server sockets are supported (add ,server)")
    return endpoint
