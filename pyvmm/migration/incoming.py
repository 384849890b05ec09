"""`pyvmm run --incoming defer` (QEMU's `-incoming defer`): the machine is
built and its QMP sockets answer while it stays "inmigrate"; QMP
`migrate-incoming` names where to listen, and from there the stream is
received as `--incoming URI` receives it (receiver.py).

`IncomingMigration` is the destination's side for QMP: it is what
query-migrate reports (none, setup, active, completed or failed), it emits
a MIGRATION event for each status, and it refuses a second start.

A failed migration ends the process with the error (QEMU's default), or,
when migrate-incoming said exit-on-error false (QEMU 9.1), leaves the
destination up and "inmigrate", its guest never run, so that management
reads the error from query-migrate and quits it over QMP."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from .receiver import receive_on
from .uri import MigrationError, MigrationUri, parse_uri

if TYPE_CHECKING:
    from ..machine import Machine

WAIT_POLL_S = 0.2       # how soon a stop request (QMP quit) ends the wait for migrate-incoming

ALREADY_STARTED = "The incoming migration has already been started"


class IncomingMigration:
    """One incoming migration: started once (migrate-incoming, or the
    command line's URI), then run by the thread that owns the machine."""

    def __init__(self, emit: Callable[[str, dict], None]):
        self._emit = emit
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.status = "none"
        self.error: str | None = None
        self.uri: MigrationUri | None = None
        self.exit_on_error = True
        self._listener: socket.socket | None = None

    def __repr__(self) -> str:
        return f"IncomingMigration({self.uri or 'not started'}, {self.status})"

    @property
    def started(self) -> bool:
        return self.status != "none"

    @property
    def active(self) -> bool:
        return self.status in ("setup", "active")

    def info(self) -> dict:
        """query-migrate's answer on the destination ({} before a start, as QEMU)."""
        if not self.started:
            return {}
        out: dict = {"status": self.status}
        if self.status == "failed" and self.error:
            out["error-desc"] = self.error
        return out

    def _set(self, status: str) -> None:
        self.status = status
        self._emit("MIGRATION", {"status": status})

    def start(self, uri_text: str, exit_on_error: bool = True) -> None:
        """migrate-incoming (or the command line's `--incoming URI`): listens
        on `uri_text` now, so that a source may connect as soon as this
        returns. Raises MigrationError (a bad URI, a port in use, a second
        start); nothing is changed then."""
        with self._lock:
            if self.started:
                raise MigrationError(ALREADY_STARTED)
            uri = parse_uri(uri_text)
            self._listener = uri.listen()
            self.uri = uri
            self.exit_on_error = exit_on_error
            self._set("setup")
        self._ready.set()

    def run(self, machine: "Machine") -> bool:
        """Waits for start(), then receives into `machine` (not yet run).
        False when the machine was asked to stop first (QMP quit), or when
        the migration failed without exit-on-error and then was quit.
        Raises MigrationError or StreamError (status failed, exit-on-error)."""
        while not self._ready.wait(WAIT_POLL_S):
            if machine.stopping:
                return False
        try:
            loaded = receive_on(machine, self.uri, self._listener, on_connected=lambda: self._set("active"))
        except Exception as e:     # MigrationError, StreamError: the CLI prints them as one line
            self.error = str(e)
            self._set("failed")
            if self.exit_on_error:
                raise
            print(f"pyvmm: incoming migration failed (exit-on-error is false: waiting for quit): {e}",
                  file=sys.stderr, flush=True)
            self._wait_for_stop(machine)    # a half-loaded guest must never run
            return False
        if loaded:
            self._set("completed")
        return loaded

    @staticmethod
    def _wait_for_stop(machine: "Machine") -> None:
        while not machine.stopping:
            time.sleep(WAIT_POLL_S)
