"""Listening sockets on the host for pyvmm's control and data channels
(the QMP endpoint, a migration destination): a Unix path or a TCP host
and port, spelled as QEMU spells them."""

from __future__ import annotations

import os
import socket


def listen_on(kind: str, address: str, port: int = 0, backlog: int = 1) -> socket.socket:
    """A listening socket: kind "unix" binds the path `address` (a stale
    socket file left there is replaced), otherwise TCP on address:port with
    SO_REUSEADDR, so a restart need not wait out TIME_WAIT.  Raises OSError."""
    if kind == "unix":
        if os.path.exists(address) and not os.path.isdir(address):
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address
    else:
        family, _, _, _, target = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if kind != "unix":
        try:
            sock.bind(target)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock
    # The path appears only once the socket listens: bound at a temporary
    # name and renamed into place, so a client that waits for the file
    # (tests, scripts) is never refused between bind() and listen().
    staging = os.path.join(os.path.dirname(address) or ".", f".{os.path.basename(address)}.{os.getpid()}")
    try:
        if os.path.exists(staging):
            os.unlink(staging)
        sock.bind(staging)
        sock.listen(backlog)
        os.rename(staging, address)
    except OSError:
        sock.close()
        try:
            os.unlink(staging)
        except OSError:
            pass
        raise
    return sock
