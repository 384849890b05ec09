"""The destination side (`pyvmm run ... --incoming URI`): the machine is
built but its vCPUs wait while one stream is read and loaded; then it
acknowledges, runs, and announces its MACs.

Anything wrong with the stream raises StreamError/MigrationError, a
one-line error, before the machine has run; the source is told why."""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import TYPE_CHECKING

from ..errors import VmmError
from . import blocks, stream
from .state import check_config, load_state, replug, warm_up
from .uri import MigrationError, MigrationUri, parse_uri

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

REFUSE_LINGER_S = 2.0
ACCEPT_POLL_S = 0.2     # how soon a stop request (QMP quit) ends a wait for the source


def receive(machine: "Machine", uri_text: str, *, quiet: bool = False) -> None:
    """Waits on `uri_text` for one migration stream and loads it into
    `machine`, which has not run. Raises MigrationError or StreamError."""
    uri = parse_uri(uri_text)
    receive_on(machine, uri, uri.listen(), quiet=quiet)


def receive_on(machine: "Machine", uri: MigrationUri, listener: socket.socket, *, quiet: bool = False,
               on_connected=lambda: None) -> bool:
    """receive() on a listener already open on `uri` (closed here): False
    when the machine was asked to stop before a source connected.
    Raises MigrationError or StreamError."""
    warm_up()
    if not quiet:
        print(f"pyvmm: waiting for an incoming migration on {uri}", file=sys.stderr, flush=True)
    try:
        listener.settimeout(ACCEPT_POLL_S)
        while True:
            try:
                conn, _ = listener.accept()
                break
            except socket.timeout:
                if machine.stopping:
                    return False
    except OSError as e:
        raise MigrationError(f"incoming migration: {e.strerror or e}") from None
    finally:
        listener.close()
    conn.settimeout(None)
    on_connected()
    with conn:
        f = conn.makefile("rb", buffering=1 << 20)
        try:
            load_stream(machine, f, answer=lambda line: conn.sendall(line))
        except VmmError as e:
            _refuse(conn, b"ERR " + str(e).encode(errors="replace")[:900] + b"\n")
            raise
        except OSError as e:
            raise MigrationError(f"incoming migration: {e.strerror or e}") from None
        _answer(conn, b"OK\n")
    log.info("incoming migration from %s loaded", uri)
    return True


def _answer(conn, line: bytes) -> None:
    try:
        conn.sendall(line)
    except OSError:
        pass


def _refuse(conn, line: bytes) -> None:
    """Sends the error, then reads what the source still sends for a moment
    so that closing does not reset the connection before it read why."""
    _answer(conn, line)
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(REFUSE_LINGER_S)
        deadline = time.monotonic() + REFUSE_LINGER_S
        while conn.recv(1 << 16) and time.monotonic() < deadline:
            pass
    except OSError:
        pass


def load_stream(machine: "Machine", f, answer=lambda line: None) -> None:
    """Reads a whole stream from file `f` into `machine`; answer(line) replies
    to the source's SYNC records. Raises StreamError."""
    memory = machine.memory
    stream.read_header(f)
    kind, payload = stream.read_record(f)
    if kind != stream.CONFIG:
        raise stream.StreamError(f"migration stream starts with a {stream.NAMES[kind]} record, not config")
    config = stream.parse_json(kind, payload)
    check_config(machine, config)
    replug(machine, config)                  # the source's device_add devices, before their drives and state
    drives = blocks.check_drives(machine, config.get("blocks"))
    have_state = False
    while True:
        kind, payload = stream.read_record(f)
        if kind == stream.PAGES and not have_state:
            for gpa, count, data in stream.parse_pages(payload):
                size = count * stream.PAGE
                if not memory.is_ram(gpa, size):
                    raise stream.StreamError(f"migration stream page run 0x{gpa:x}+0x{size:x} is outside RAM")
                view = memory.view(gpa, size)
                if data is None:
                    view[:] = bytes(size)
                else:
                    view[:] = data
                # Told run by run, while the source still runs, rather than
                # all of RAM during the downtime.
                for fn in memory.write_listeners:
                    fn(gpa, size)
        elif kind == stream.BLOCKS and not have_state and drives:
            blocks.apply(drives, payload)
        elif kind == stream.SYNC and not have_state:
            answer(b"SYNC\n")
        elif kind == stream.STATE and not have_state:
            load_state(machine, stream.parse_json(kind, payload))
            have_state = True
        elif kind == stream.END and have_state:
            break
        else:
            raise stream.StreamError(f"migration stream has a {stream.NAMES[kind]} record out of order")
