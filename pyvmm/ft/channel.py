"""The logging channel between primary and backup: one stream socket
(`tcp:HOST:PORT` or `unix:PATH`, the backup listening), log records one
way and ACKs the other, each side's traffic doubling as its heartbeat.

Primary: connect() once the backup listens, send the HELLO, then
PrimaryLink.send() from the vCPU thread (records in order, under a lock),
a heartbeat thread sending PROGRESS every HEARTBEAT_S, and a reader
thread taking ACKs (acknowledged outputs go out; EOF, or ALONE_S of
silence, means the backup is gone).
Backup: accept(), read_hello(), then BackupLink's reader thread feeds the
Replayer and answers each PROGRESS with an ACK; EOF or a bad record means
the primary is gone, and so does SUSPECT_S of silence once the primary's
lock is free.  A primary that is silent but holds its lock (a Python
process starved for seconds, or cut off) is waited for, never replaced."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

from ..errors import VmmError
from ..migration.uri import MigrationError, parse_uri
from . import log as L

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.05
SUSPECT_S = 0.8               # backup: a primary silent this long may be gone (kill -9 gives EOF at once)
ALONE_S = 10.0                # primary: a backup silent this long is dropped (a cut network)
START_TIMEOUT_S = 60.0        # before the first record: the peer is still building its machine
IO_TIMEOUT_S = 5.0            # for the rest of a record once its first byte came


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether a record starts within `timeout` (the record itself is read whole
    afterwards, so a pause never cuts one in two)."""
    return bool(select.select([sock], [], [], timeout)[0])
CONNECT_WAIT_S = 30.0



def _hang_up(closed: threading.Event, sock: socket.socket) -> None:
    """Marks a channel end closed and shuts its socket (the reader thread
    then sees the end of the stream)."""
    closed.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()

class ChannelError(VmmError):
    """The FT logging channel cannot be opened or was refused."""


def _uri(text: str):
    try:
        return parse_uri(text)
    except MigrationError:
        raise ChannelError(f"bad --ft-channel {text!r} (expected tcp:HOST:PORT or unix:PATH)") from None


def connect(text: str, wait_s: float = CONNECT_WAIT_S) -> socket.socket:
    """Primary: a socket to the backup, retried while it starts. Raises ChannelError."""
    uri = _uri(text)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock = uri.connect()
            sock.settimeout(None)
            return sock
        except MigrationError as e:
            if time.monotonic() >= deadline:
                raise ChannelError(f"--ft primary: no backup at {text}: {e}") from None
            time.sleep(0.1)


def accept(text: str, wait_s: float | None = None) -> socket.socket:
    """Backup: listens at `text` and takes one primary. Raises ChannelError."""
    uri = _uri(text)
    try:
        server = uri.listen()
    except MigrationError as e:
        raise ChannelError(str(e)) from None
    try:
        server.settimeout(wait_s)
        sock, _ = server.accept()
    except OSError as e:
        raise ChannelError(f"--ft backup: no primary connected to {text}: {e}") from None
    finally:
        server.close()
    sock.settimeout(None)
    return sock


def read_hello(sock: socket.socket) -> tuple[dict, int, int]:
    """Backup: the primary's guest options, wall clock and random seed. Raises LogError, ChannelError."""
    L.read_header(sock.recv)
    kind, payload = L.read_record(sock.recv)
    if kind == L.SEED:
        raise ChannelError("--ft backup: a live VM connected to seed a new backup (start this one with --ft-seed)")
    if kind != L.HELLO:
        raise L.LogError(f"FT log starts with a {L.NAMES[kind]} record, not hello")
    return L.parse_hello(payload)


class PrimaryLink:
    """The primary's end once HELLO is sent: ordered sends, heartbeats, ACKs."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.recorder = None
        self.acked = (-1, -1)
        self._acked_cond = threading.Condition()

    def send(self, data: bytes) -> None:
        """Raises OSError once the backup is gone."""
        with self._lock:
            self.sock.sendall(data)

    def start(self, recorder) -> None:
        self.recorder = recorder
        threading.Thread(target=self._beat, name="ft-heartbeat", daemon=True).start()
        threading.Thread(target=self._acks, name="ft-acks", daemon=True).start()

    def wait_acked(self, pos: tuple[int, int], timeout: float) -> bool:
        """Waits until the backup acknowledged the log up to `pos`."""
        deadline = time.monotonic() + timeout
        with self._acked_cond:
            while self.acked < pos and not self.recorder.alone:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acked_cond.wait(left)
        return self.acked >= pos

    def close(self) -> None:
        _hang_up(self._closed, self.sock)

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S) and not self.recorder.alone:
            self.recorder.heartbeat()

    def _acks(self) -> None:
        rec = self.recorder
        self.sock.settimeout(IO_TIMEOUT_S)
        wait = START_TIMEOUT_S
        try:
            while True:
                if not _wait_readable(self.sock, wait):
                    raise TimeoutError(f"no word from the backup for {wait:.0f} s")
                wait = ALONE_S
                kind, payload = L.read_record(self.sock.recv)
                if kind != L.ACK:
                    raise L.LogError(f"FT backup sent a {L.NAMES[kind]} record")
                pos, executed = L.parse_ack(payload)
                rec.executed = executed
                rec.acknowledged(pos)
                with self._acked_cond:
                    self.acked = max(self.acked, pos)
                    self._acked_cond.notify_all()
        except (OSError, L.LogError) as e:
            if not self._closed.is_set():
                rec.backup_lost(str(e) or type(e).__name__)
        with self._acked_cond:
            self._acked_cond.notify_all()


def dispatch(replayer, kind: int, payload: bytes) -> tuple[int, int] | None:
    """Hands one log record to the replayer; the position to acknowledge, if any.
    Raises LogError for a record a primary does not send."""
    if kind == L.EVENT:
        replayer.add_event(L.parse_event(payload))
        return None
    if kind == L.PROGRESS:
        pos, released = L.parse_progress(payload)
        replayer.add_progress(pos, released, L.parse_progress_items(payload))
        return pos
    if kind == L.END:
        pos = L.parse_end(payload)
        replayer.add_end(pos)
        return pos
    raise L.LogError(f"FT log has a {L.NAMES[kind]} record after hello")


class BackupLink:
    """The backup's end after HELLO: feeds the replayer, answers with ACKs."""

    def __init__(self, sock: socket.socket, replayer, primary_dead=lambda: True):
        self.sock = sock
        self.replayer = replayer
        self.primary_dead = primary_dead     # takes the FT lock if it is free
        self._closed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._read, name="ft-log", daemon=True).start()

    def close(self) -> None:
        _hang_up(self._closed, self.sock)

    def _read(self) -> None:
        rep = self.replayer
        self.sock.settimeout(IO_TIMEOUT_S)
        why = "end of log"
        wait = START_TIMEOUT_S
        try:
            while True:
                if not _wait_readable(self.sock, wait):
                    if self.primary_dead():          # silent and its lock is free: it is gone
                        raise TimeoutError(f"no word from the primary for {wait:.1f} s and its lock is free")
                    logger.info("FT: the primary is silent but holds its lock: waiting")
                    continue                         # alive (a stall, or cut off): never two live VMs
                wait = SUSPECT_S
                kind, payload = L.read_record(self.sock.recv)
                pos = dispatch(rep, kind, payload)
                if pos is not None:
                    self.sock.sendall(L.ack(pos, rep.pos[0]))
                if kind == L.END:
                    return
        except (OSError, L.LogError) as e:
            why = str(e) or type(e).__name__
        if not self._closed.is_set():
            rep.primary_lost(why)
