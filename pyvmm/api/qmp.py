"""The QEMU Machine Protocol over the --qmp sockets: a thin adapter from
JSON messages to commands.py.

Per the QMP spec: the server greets each client with {"QMP": {"version",
"capabilities"}}; until the client sends qmp_capabilities every other
command gets CommandNotFound; then {"execute", "arguments", "id"} gets
{"return"} or {"error": {"class", "desc"}} with the id echoed, and events
{"event", "data", "timestamp": {"seconds", "microseconds"}} go to every
negotiated client. Every message the server sends ends with CRLF.

Threads: listening and client sockets are read on the machine's event loop
(re-attached to each rebuilt machine after a reset); commands run in order
on one worker thread, because `stop` blocks until the vCPUs park and must
not run under the machine's lock that loop callbacks hold. Writes go
straight to the (non-blocking) socket from whichever thread has something
to say, under the client's own lock; what the socket does not take waits in
a buffer that a loop timer flushes, and a client that lets it grow past
MAX_PENDING_OUTPUT is dropped."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..runstate import RunState
from .catalog import execute
from .commands import COMMAND_NOT_FOUND, GENERIC_ERROR, CommandError, Target, query_version
from .endpoint import Endpoint
from .framing import JsonSplitter
from .hotplug import bind_ejects

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

MAX_PENDING_OUTPUT = 16 << 20
FLUSH_RETRY_S = 0.02
CLOSE_FLUSH_S = 1.0       # how long close() waits for a slow client to take the last bytes
START_WAIT_S = 10.0      # longest wait for run() to start before commands see "prelaunch"
MAX_QUEUED_PER_CLIENT = 64  # commands read but not yet run; past it the client is not read


def _timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class QmpClient:
    """One connection: its framing state, whether it has negotiated, and
    output the socket has not taken yet."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.splitter = JsonSplitter()
        self.negotiated = False
        self.closed = False
        self.queued = 0            # messages waiting for the worker
        self.reading = True
        self._out = bytearray()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"QmpClient({self.peer}, negotiated={self.negotiated}, closed={self.closed})"

    def send(self, message: dict) -> bool:
        """Queues and tries to send one message; False when the client
        must be dropped (gone, or not reading)."""
        data = json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"
        with self._lock:
            if self.closed:
                return True
            self._out += data
            return self._flush_locked()

    def flush(self) -> bool:
        with self._lock:
            return self.closed or self._flush_locked()

    def count_queued(self, delta: int) -> None:
        with self._lock:
            self.queued += delta

    @property
    def pending(self) -> int:
        return len(self._out)

    def _flush_locked(self) -> bool:
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return False
            del self._out[:sent]
        return len(self._out) <= MAX_PENDING_OUTPUT

    def close(self, linger: float = 0.0) -> None:
        with self._lock:
            if self.closed:
                return
            if linger and self._out:
                try:
                    self.sock.settimeout(linger)
                    self.sock.sendall(self._out)
                except OSError:
                    pass
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class QmpServer:
    """Every --qmp endpoint of one `pyvmm run`, alive across reboots.
    Raises ConfigError from the constructor when a socket cannot listen."""

    def __init__(self, endpoints: list[Endpoint], name: str | None = None):
        self.endpoints = endpoints
        self.target = Target(name=name, emit=self.emit)
        self._listeners: dict[int, tuple[socket.socket, Endpoint]] = {}
        # Set once a client has connected to that listener (whoever accepted it).
        self._connected: dict[int, threading.Event] = {}
        try:
            for ep in endpoints:
                sock = ep.listen()
                sock.setblocking(False)
                self._listeners[sock.fileno()] = (sock, ep)
                self._connected[sock.fileno()] = threading.Event()
        except Exception:
            self.close()
            raise
        self.clients: dict[int, QmpClient] = {}
        self._mutex = threading.Lock()     # guards `clients`
        self._loop = None
        self._work: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop, name="pyvmm-qmp", daemon=True)
        self._worker.start()
        self._flush_timer = None
        self._closing = False

    def __repr__(self) -> str:
        return f"QmpServer({', '.join(map(str, self.endpoints))}, clients={len(self.clients)})"

    # -- the machine (runner.py) ---------------------------------------------------
    def attach(self, machine: "Machine") -> None:
        """Serves commands on `machine` and reads the sockets on its loop."""
        with self.target.lock:
            self.target.machine = machine
            bind_ejects(self.target)       # a restored machine's pending device_del ends here
        self._loop = machine.loop
        self._flush_timer = None        # one set on the last machine's loop died with it
        for fd in self._listeners:
            self._loop.add_reader(fd, lambda fd=fd: self._accept(fd))
        with self._mutex:
            clients = list(self.clients.values())
        for client in clients:
            if client.reading:
                self._loop.add_reader(client.fd, lambda c=client: self._read(c))

    def detach(self) -> None:
        """The machine is going (stopped, about to be destroyed)."""
        with self.target.lock:
            self.target.machine = None
        self._loop = None

    def wait_for_client(self) -> None:
        """Blocks until a client has connected to each endpoint that waits
        (QEMU's wait=on), so a management tool sees the guest from its start.
        The machine's event loop does the accepting (attach() comes first)."""
        for fd, (_sock, ep) in list(self._listeners.items()):
            if not ep.wait:
                continue
            print(f"pyvmm: waiting for a QMP connection on {ep}", file=sys.stderr, flush=True)
            while not self._connected[fd].wait(0.5) and not self._closing:
                pass

    # -- events --------------------------------------------------------------------
    def emit(self, event: str, data: dict | None = None) -> None:
        """Sends an event to every negotiated client. Any thread."""
        message: dict[str, Any] = {"event": event}
        if data:
            message["data"] = data
        message["timestamp"] = _timestamp()
        log.debug("event %s %s", event, data or "")
        with self._mutex:
            clients = [c for c in self.clients.values() if c.negotiated]
        for client in clients:
            self._send(client, message)

    def emit_in_order(self, event: str, data: dict | None = None) -> None:
        """emit() after the replies to commands already read (the runner's
        RESET and SHUTDOWN follow the reply to the system_reset or quit
        that caused them, as in QEMU)."""
        self._work.put((None, (event, data)))

    # -- sockets (on the event loop) -------------------------------------------------
    def _accept(self, fd: int) -> None:
        sock = self._listeners[fd][0]
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("qmp: accept failed: %s", e)
            return
        self._add_client(conn, peer)
        self._connected[fd].set()

    def _add_client(self, conn: socket.socket, peer) -> None:
        conn.setblocking(False)
        client = QmpClient(conn, str(peer) if peer else "unix")
        with self._mutex:
            self.clients[client.fd] = client
        greeting = {"QMP": {"version": query_version(self.target, {}), "capabilities": []}}
        self._send(client, greeting)
        if self._loop is not None:
            self._loop.add_reader(client.fd, lambda: self._read(client))

    def _read(self, client: QmpClient) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        for item in client.splitter.feed(data):
            client.count_queued(+1)
            self._work.put((client, item))
        if client.queued >= MAX_QUEUED_PER_CLIENT and self._loop is not None:
            client.reading = False      # a flood: read again once the worker catches up
            self._loop.remove_reader(client.fd)

    def _drop(self, client: QmpClient) -> None:
        with self._mutex:
            self.clients.pop(client.fd, None)
        if self._loop is not None:
            self._loop.remove_reader(client.fd)
        client.close()
        log.debug("qmp: %r gone", client)

    def _send(self, client: QmpClient, message: dict) -> None:
        if not client.send(message):
            log.info("qmp: dropping %r (gone or not reading)", client)
            self._drop(client)
        elif client.pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        loop = self._loop
        if loop is not None and self._flush_timer is None:
            self._flush_timer = loop.call_later(FLUSH_RETRY_S, self._flush_all)

    def _flush_all(self) -> None:
        self._flush_timer = None
        with self._mutex:
            clients = list(self.clients.values())
        for client in clients:
            if not client.flush():
                self._drop(client)
            elif client.pending:
                self._schedule_flush()

    # -- commands (on the worker thread) ------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            client, message = item
            if client is None:
                self.emit(*message)
                continue
            self._await_start()
            try:
                reply = self._handle(client, message)
            except Exception as e:     # a bug must not end the control plane
                log.exception("qmp: command failed")
                reply = _error(GENERIC_ERROR, f"internal error: {e}")
            if reply is not None and not client.closed:
                self._send(client, reply)
            client.count_queued(-1)
            loop = self._loop
            if not client.reading and client.queued < MAX_QUEUED_PER_CLIENT // 2 and not client.closed:
                client.reading = True       # attach() re-adds it when the loop is between machines
                if loop is not None:
                    try:
                        loop.add_reader(client.fd, lambda c=client: self._read(c))
                    except (OSError, ValueError):
                        pass                # that machine's loop just closed

    def _await_start(self) -> None:
        """Holds commands that arrive between attach() and the machine's
        run() (a wait=on client is accepted then), or while a reset
        rebuilds the machine: pyvmm has no -S, so, as in QEMU without it,
        clients see the guest running."""
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline and not self._closing:
            m = self.target.machine
            if m is not None and (m.state is not RunState.CONFIGURED or m.stopping):
                return      # (None: between a reset and the rebuilt machine)
            if getattr(self.target, "incoming", None) is not None:
                return      # an --incoming destination answers while it waits ("inmigrate")
            time.sleep(0.001)

    def _handle(self, client: QmpClient, item) -> dict | None:
        """One framed input (a JSON text, or a framing error) -> the reply."""
        if isinstance(item, Exception):
            return _error(GENERIC_ERROR, str(item))
        try:
            message = json.loads(item)
        except (ValueError, RecursionError) as e:
            return _error(GENERIC_ERROR, f"JSON parse error, {e}")
        if not isinstance(message, dict):
            return _error(GENERIC_ERROR, "QMP input must be a JSON object")
        ident = message.get("id")
        reply = self._dispatch(client, message)
        if ident is not None and "id" in message:
            reply["id"] = ident
        return reply

    def _dispatch(self, client: QmpClient, message: dict) -> dict:
        for key in message:
            if key not in ("execute", "arguments", "id"):
                return _error(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        name = message.get("execute")
        if name is None:
            return _error(GENERIC_ERROR, "QMP input lacks member 'execute'")
        if not isinstance(name, str):
            return _error(GENERIC_ERROR, "QMP input member 'execute' must be a string")
        args = message.get("arguments", {})
        if not isinstance(args, dict):
            return _error(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            return self._negotiate(client, args)
        if not client.negotiated:
            return _error(COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'")
        try:
            return {"return": execute(self.target, name, args)}
        except CommandError as e:
            return _error(e.error_class, str(e))

    def _negotiate(self, client: QmpClient, args: dict) -> dict:
        if client.negotiated:
            return _error(COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored")
        enable = args.get("enable", [])
        if set(args) - {"enable"}:
            return _error(GENERIC_ERROR, f"Parameter '{sorted(set(args) - {'enable'})[0]}' is unexpected")
        if not isinstance(enable, list):
            return _error(GENERIC_ERROR, "Invalid parameter type for 'enable', expected: array")
        if enable:
            return _error(GENERIC_ERROR, f"Capability '{enable[0]}' not available")
        client.negotiated = True
        return {"return": {}}

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """Sends what is pending, closes every socket and removes the unix
        socket files. Idempotent."""
        self._closing = True
        if getattr(self, "_work", None) is not None:
            self._work.put(None)
            self._worker.join(2.0)
        for client in list(getattr(self, "clients", {}).values()):
            client.close(linger=CLOSE_FLUSH_S)
        for node in getattr(self.target, "block_nodes", {}).values():   # blockdev-add's images
            node["image"].close()
        for sock, ep in self._listeners.values():
            sock.close()
            if ep.kind == "unix":
                try:
                    os.unlink(ep.address)
                except OSError:
                    pass
        self._listeners = {}
        if hasattr(self, "clients"):
            self.clients = {}


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}


__all__ = ["QmpServer", "QmpClient"]
