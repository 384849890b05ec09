"""A VM's NIC on a `pyvmm switch` (or on any QEMU `-netdev stream` server):
frames cross a Unix stream socket with QEMU's framing (framing.py), read
on the machine's event loop, never on a vCPU thread.

    connect_switch(name)   the socket of switch NAME; when no switch of
                           that name answers, `pyvmm switch run NAME` is
                           started as a detached process of its own (it
                           outlives the VM, as a host-owned vSwitch does)
    StreamPort(sock, loop) the NetPort on a connected socket

Sending never blocks the vCPU: what the socket does not take at once is
queued (up to OUT_LIMIT bytes, then whole frames are dropped and counted)
and written out from the event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .framing import LENGTH, FramingError, StreamDecoder
from .port import MAX_FRAME, FrameHandler, NetError

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 18
OUT_LIMIT = 1 << 20
RETRY_DELAY = 0.001         # seconds between tries to write out a queued tail
START_TIMEOUT = 15.0        # seconds a freshly started switch has to listen


def connect_unix(path: str | Path) -> socket.socket:
    """A connected stream socket. Raises NetError (one line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise NetError(f"cannot connect to {path}: {e.strerror or e}") from None
    return s


def _try_connect(path: Path) -> socket.socket | None:
    try:
        return connect_unix(path)
    except NetError:
        return None


def connect_switch(name: str, start: bool = True) -> socket.socket:
    """A socket on switch `name`'s default port group, starting the switch
    when none answers. Raises NetError when it cannot be reached."""
    from ..errors import ConfigError
    from .switch_config import check_name
    from .switchd import client_socket_path, run_dir
    try:
        check_name(name)
    except ConfigError as e:
        raise NetError(f"switch={name}: {e}") from None
    rundir = run_dir()
    path = client_socket_path(name, rundir=rundir)
    sock = _try_connect(path)
    if sock is not None or not start:
        if sock is None:
            raise NetError(f"switch={name}: not running (no {path})")
        return sock
    try:
        rundir.mkdir(parents=True, exist_ok=True)
        lock = os.open(rundir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise NetError(f"switch={name}: cannot use {rundir}: {e.strerror}") from None
    try:
        # VMs starting together must not start two switches of one name
        # (the second would take over the first one's socket path).
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is None:
            sock = _start_switch(name, rundir, path)
    finally:
        os.close(lock)
    return sock


def _start_switch(name: str, rundir: Path, path: Path) -> socket.socket:
    logfile = rundir / f"{name}.log"
    with open(logfile, "ab") as log_out:
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "switch", "run", name],
                                stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out,
                                start_new_session=True, close_fds=True)
    log.info("started switch %s (pid %d, log %s)", name, proc.pid, logfile)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] if logfile.exists() else []
    raise NetError(f"switch={name}: `pyvmm switch run {name}` did not start"
                   + (f": {tail[0]}" if tail else ""))


class StreamPort:
    """A NetPort on a connected stream socket `sock`, read on `loop` once
    on_receive() is called.  `label` names it in logs and errors."""

    def __init__(self, sock: socket.socket, loop=None, label: str = "stream"):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, OUT_LIMIT)
        except OSError:
            pass
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.label = label
        self.decoder = StreamDecoder(MAX_FRAME)
        self.out = bytearray()
        # send() runs on a vCPU thread, the retry on the event loop: the queue
        # is theirs in turn (sock.send exports `out` while the GIL is let go,
        # and a bytearray with an export cannot grow: BufferError).
        self._out_lock = threading.Lock()
        self._retry = None
        self._callback: FrameHandler | None = None
        self.rx_frames = self.tx_frames = 0
        self.tx_dropped = 0
        self.connected = True

    def __repr__(self) -> str:
        return (f"StreamPort({self.label}, rx={self.rx_frames}, tx={self.tx_frames}, "
                f"tx_dropped={self.tx_dropped}, queued={len(self.out)}, "
                f"{'connected' if self.connected else 'closed'})")

    def send(self, frame: bytes) -> None:
        """Queues one frame and writes what the socket takes now. Any thread."""
        with self._out_lock:
            if not self.connected or len(self.out) > OUT_LIMIT:
                self.tx_dropped += 1
                return
            self.out += LENGTH.pack(len(frame))
            self.out += frame
            self.tx_frames += 1
            self._flush()

    def _flush(self) -> None:
        """Writes what the socket takes of the queue; under _out_lock."""
        if not self.out or not self.connected:
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._lost(f"send failed: {e.strerror or e}")
            return
        del self.out[:n]
        if self.out and self._retry is None and self.loop is not None:
            self._retry = self.loop.call_later(RETRY_DELAY, self._on_retry)

    def _on_retry(self) -> None:
        with self._out_lock:
            self._retry = None
            self._flush()

    def on_receive(self, callback: FrameHandler) -> None:
        """Starts reading frames on the loop, each passed to callback."""
        if self.loop is None:
            raise NetError(f"{self.label}: no event loop to read on")
        self._callback = callback
        self.loop.add_reader(self.fd, self.read_pending)

    def read_pending(self) -> int:
        """Reads what is waiting and hands over its whole frames; returns how many."""
        if not self.connected:
            return 0
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return 0
        except OSError as e:
            data = b""
            log.debug("%s: recv failed: %s", self.label, e)
        if not data:
            self._lost("the switch closed the connection")
            return 0
        try:
            frames = self.decoder.feed(data)
        except FramingError as e:
            self._lost(str(e))
            return 0
        self.rx_frames += len(frames)
        if self._callback is not None:
            for frame in frames:
                self._callback(frame)
        return len(frames)

    def _lost(self, why: str) -> None:
        # The NIC stays; its frames are dropped from now on (as with a cable pulled).
        log.warning("%s: %s; the NIC is disconnected", self.label, why)
        self.connected = False
        self.out.clear()
        if self.loop is not None:
            self.loop.remove_reader(self.fd)

    def close(self) -> None:
        """Stops reading and closes the socket. Idempotent."""
        if self.fd < 0:
            return
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        if self._retry is not None:
            self._retry.cancel()
        self.sock.close()
        self.fd = -1
        self.connected = False


__all__ = ["StreamPort", "connect_switch", "connect_unix"]
