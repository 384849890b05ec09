"""A small synchronous QMP client for pyvmm's own Python API (pyvmm/vm.py):
connect, negotiate, execute commands one at a time, and keep the events.

A reader thread splits the stream (framing.py) and files each message:
replies go to whoever waits for that id, events to a list callers can
wait on. Scripts that want asyncio use the `qemu.qmp` library instead."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from typing import Any

from ..errors import VmmError
from .framing import JsonSplitter


class QmpError(VmmError):
    """A command answered with an error; `error_class` is QMP's class."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpConnectionError(VmmError):
    """The QMP socket could not be reached or closed under a command."""


class QmpClient:
    """One negotiated connection to a unix socket. Thread-safe."""

    def __init__(self, path: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpConnectionError(f"QMP socket {path}: {e.strerror}") from None
                time.sleep(0.05)
        self.path = path
        self.timeout = timeout
        self.events: list[dict] = []
        self._replies: dict[Any, dict] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self._greeting: dict | None = None
        self._reader = threading.Thread(target=self._read, name="pyvmm-qmp-client", daemon=True)
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._greeting is not None or self._closed, timeout):
                raise QmpConnectionError(f"QMP socket {path}: no greeting")
        self.greeting = self._greeting
        self.execute("qmp_capabilities")

    def __repr__(self) -> str:
        return f"QmpClient({self.path!r}, events={len(self.events)}, closed={self._closed})"

    def _read(self) -> None:
        splitter = JsonSplitter()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                for text in splitter.feed(data):
                    if isinstance(text, Exception):
                        continue
                    message = json.loads(text)
                    with self._cond:
                        if "QMP" in message:
                            self._greeting = message
                        elif "event" in message:
                            self.events.append(message)
                        else:
                            self._replies[message.get("id")] = message
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None) -> Any:
        """The command's "return" value. Raises QmpError for an error reply,
        QmpConnectionError when the socket closes or nothing comes back."""
        ident = next(self._ids)
        message = {"execute": command, "id": ident, **({"arguments": arguments} if arguments else {})}
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\r\n")
        except OSError as e:
            raise QmpConnectionError(f"{command}: QMP socket: {e.strerror}") from None
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies or self._closed, timeout or self.timeout):
                raise QmpConnectionError(f"{command}: no reply")
            reply = self._replies.pop(ident, None)
        if reply is None:
            raise QmpConnectionError(f"{command}: the QMP socket closed")
        if "error" in reply:
            raise QmpError(command, reply["error"]["class"], reply["error"]["desc"])
        return reply["return"]

    def wait_event(self, name: str, timeout: float = 30.0, since: int = 0, match: dict | None = None) -> dict:
        """The first event `name` at index >= since in self.events (whose
        data has match's items, if given). Raises QmpConnectionError on timeout."""
        def find():
            for event in self.events[since:]:
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v for k, v in (match or {}).items()):
                    return event
            return None
        with self._cond:
            found = self._cond.wait_for(lambda: find() or self._closed, timeout)
            event = find()
        if event is None:
            raise QmpConnectionError(f"no {name} event" + (" (socket closed)" if found else f" in {timeout:g} s"))
        return event

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(5)
