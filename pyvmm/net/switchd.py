"""The `pyvmm switch run` process: one selector loop over the client
sockets (one listening Unix socket per port group), the uplinks, the
control socket that `pyvmm switch status` asks, and a once-a-second tick
that ages the MAC table.

A client is a QEMU `-netdev stream` peer: length-prefixed frames both
ways. What it sends that cannot be followed (a garbage length) ends its
connection; a client that disconnects or dies is removed with what was
learned on its port. Writes to a slow client are queued up to
OUT_QUEUE_LIMIT bytes and then dropped (counted), so one stuck client
cannot hold the switch up."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..cachedir import pyvmm_cache
from ..errors import VmmError
from .framing import LENGTH, FramingError, StreamDecoder
from .mactable import MacTable
from .ratelimit import RateLimiter
from .switch import Switch, SwitchPort
from .switch_config import GroupConfig, SwitchConfig, check_name
from .team import LinkMonitor, Team, TeamMember
from .uplink import UplinkGone, open_uplink

log = logging.getLogger(__name__)

OUT_QUEUE_LIMIT = 1 << 20
RECV_SIZE = 1 << 18
TICK = 1.0
RUNDIR_ENV = "PYVMM_SWITCH_DIR"


class SwitchError(VmmError):
    """The switch cannot start, or cannot be reached."""


def run_dir() -> Path:
    """$PYVMM_SWITCH_DIR, else $XDG_RUNTIME_DIR/pyvmm, else /run/pyvmm for
    root, else the cache dir's switch/."""
    override = os.environ.get(RUNDIR_ENV, "")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "pyvmm"
    if os.geteuid() == 0:
        return Path("/run/pyvmm")
    return pyvmm_cache("switch")


def client_socket_path(name: str, group: str = "default", rundir: Path | None = None) -> Path:
    base = rundir or run_dir()
    return base / (f"{name}.sock" if group == "default" else f"{name}.{group}.sock")


def control_socket_path(name: str, rundir: Path | None = None) -> Path:
    return (rundir or run_dir()) / f"{name}.ctl"


def query_status(name: str, rundir: Path | None = None, timeout: float = 5.0,
                 request: bytes = b"status") -> dict[str, Any]:
    """The running switch's status (or its answer to `request`: b"stop"
    ends it). Raises SwitchError when it is not running."""
    check_name(name)
    path = control_socket_path(name, rundir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(request + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (FileNotFoundError, ConnectionRefusedError):
            raise SwitchError(f"switch {name} is not running (no {path})") from None
        except OSError as e:
            raise SwitchError(f"switch {name}: {e.strerror or e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise SwitchError(f"switch {name}: garbled status reply") from None


class StreamClient:
    """One connected client socket and its switch port."""

    def __init__(self, daemon: "SwitchDaemon", sock: socket.socket, max_frame: int):
        self.daemon = daemon
        self.sock = sock
        self.decoder = StreamDecoder(max_frame)
        self.out = bytearray()
        self.writing = False
        self.closed = False
        self.port: SwitchPort = None  # type: ignore[assignment]   # set by the daemon

    def __repr__(self) -> str:
        return f"StreamClient({self.port.name if self.port else '?'}, queued={len(self.out)})"

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self.closed:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.daemon.drop_client(self, "disconnected")
            return
        before = self.decoder.oversized
        try:
            frames = self.decoder.feed(data)
        except FramingError as e:
            self.port.counters["rx_oversized"] += 1
            self.daemon.drop_client(self, str(e))
            return
        self.port.counters["rx_oversized"] += self.decoder.oversized - before
        if frames:
            self.daemon.switch.receive_many(self.port, frames)

    def send(self, frame: bytes) -> bool:
        out = self.out
        queued = len(out)
        if queued > OUT_QUEUE_LIMIT or self.closed:
            return False
        if not queued and not self.writing:
            self.daemon.dirty.append(self)      # flushed once after the batch, not per frame
        out += LENGTH.pack(len(frame))
        out += frame
        return True

    def flush(self) -> None:
        if self.out and not self.writing and not self.closed:
            self._flush()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.daemon.call_soon(lambda: self.daemon.drop_client(self, "send failed"))
            self.out.clear()
            return
        del self.out[:n]
        want = bool(self.out)
        if want != self.writing:
            self.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.daemon.sel.modify(self.sock, events, self.on_event)


class SwitchDaemon:
    def __init__(self, name: str, config: SwitchConfig, rundir: Path | None = None):
        self.name = check_name(name)
        self.config = config
        self.rundir = rundir or run_dir()
        self.switch = Switch(MacTable(config.capacity, config.max_age, config.per_port,
                                      move_hold=config.move_hold),
                             {g.vlan for g in config.groups.values()})
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}
        self.control: socket.socket | None = None
        self.clients: list[StreamClient] = []
        self.uplinks: dict[SwitchPort, Any] = {}
        self.teams: list[Team] = []
        self.links: LinkMonitor | None = None
        self._ids = itertools.count(1)
        self._soon: list[Callable[[], None]] = []
        self.dirty: list[StreamClient] = []     # clients with output queued in this batch
        self._stopping = False
        self.started = time.time()

    def __repr__(self) -> str:
        return f"SwitchDaemon({self.name}, clients={len(self.clients)}, uplinks={len(self.uplinks)})"

    # -- setting up -----------------------------------------------------------
    def open(self) -> None:
        """Binds the sockets and opens the uplinks. Raises SwitchError."""
        try:
            self.rundir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SwitchError(f"cannot make {self.rundir}: {e.strerror}") from None
        ctl = control_socket_path(self.name, self.rundir)
        try:
            query_status(self.name, self.rundir, timeout=1.0)
        except SwitchError:
            pass
        else:
            raise SwitchError(f"switch {self.name} is already running ({ctl})")
        self.control = self._listen(ctl, self._on_control)
        for group in self.config.groups.values():
            path = client_socket_path(self.name, group.name, self.rundir)
            self.listeners[group.name] = self._listen(path, lambda _m, g=group: self._on_accept(g))
        for up in self.config.uplinks:
            try:
                dev = open_uplink(up.type, up.ifname)
            except OSError as e:
                self.close()
                raise SwitchError(f"uplink {up.type}:{up.ifname}: {e.strerror or e}") from None
            port = self.switch.add_port(SwitchPort(f"{up.type}:{up.ifname}", dev.send, uplink=True))
            self.uplinks[port] = dev
            self.sel.register(dev.fd, selectors.EVENT_READ, lambda _m, p=port: self._on_uplink(p))
        if self.config.teams:
            try:
                self.links = LinkMonitor(self._on_link)
            except OSError as e:
                self.close()
                raise SwitchError(f"netlink: {e.strerror or e}") from None
            self.sel.register(self.links.fd, selectors.EVENT_READ, lambda _m: self.links.on_readable())
        for tc in self.config.teams:
            try:
                team = Team(self.switch, tc.name, [(u.type, u.ifname) for u in tc.uplinks], tc.policy, tc.failback,
                            tc.beacon)
            except OSError as e:
                self.close()
                raise SwitchError(f"team {tc.name}: {e.strerror or e}") from None
            self.teams.append(team)
            for member in team.members:
                self.sel.register(member.dev.fd, selectors.EVENT_READ,
                                  lambda _m, t=team, m=member: self._on_member(t, m))

    def _listen(self, path: Path, handler: Callable[[int], None]) -> socket.socket:
        if len(str(path).encode()) >= 108:
            raise SwitchError(f"socket path too long for a Unix socket: {path}")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SwitchError(f"cannot remove stale {path}: {e.strerror}") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
            s.listen(64)
        except OSError as e:
            s.close()
            raise SwitchError(f"cannot listen on {path}: {e.strerror}") from None
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, handler)
        return s

    # -- events ---------------------------------------------------------------
    def _on_accept(self, group: GroupConfig) -> None:
        try:
            sock, _ = self.listeners[group.name].accept()
        except OSError:
            return
        sock.setblocking(False)
        client = StreamClient(self, sock, self.config.max_frame)
        limiter = RateLimiter.from_config(group.rate_limit)
        client.port = self.switch.add_port(SwitchPort(f"c{next(self._ids)}", client.send, vlan=group.vlan,
                                                      group=group.name, limiter=limiter))
        self.clients.append(client)
        self.sel.register(sock, selectors.EVENT_READ, client.on_event)
        log.info("client %s joined group %s", client.port.name, group.name)

    def drop_client(self, client: StreamClient, why: str) -> None:
        if client.closed:
            return
        client.closed = True
        log.info("client %s left: %s", client.port.name, why)
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self.switch.remove_port(client.port)
        self.clients.remove(client)

    def _on_uplink(self, port: SwitchPort) -> None:
        dev = self.uplinks[port]
        try:
            frames = dev.read_frames()
        except UplinkGone as e:
            log.warning("uplink %s removed: %s", port.name, e.strerror)
            self.sel.unregister(dev.fd)
            dev.close()
            del self.uplinks[port]
            self.switch.remove_port(port)
            return
        limit = self.config.max_frame
        fits = [f for f in frames if len(f) <= limit]
        port.counters["rx_oversized"] += len(frames) - len(fits)
        self.switch.receive_many(port, fits)

    def _on_member(self, team: Team, member: TeamMember) -> None:
        if not team.on_member_readable(member):
            log.warning("team %s: %s removed", team.name, member.ifname)
            self.sel.unregister(member.dev.fd)
            member.dev.close()
            team.members.remove(member)

    def _on_link(self, index: int, up: bool, deleted: bool) -> None:
        for team in self.teams:
            team.link_event(index, up, deleted)

    def _on_control(self, _mask: int) -> None:
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        # a short blocking exchange: status is small and the asker is local
        with conn:
            conn.settimeout(1.0)
            try:
                request = conn.recv(256).strip()
                if request == b"status":
                    conn.sendall(json.dumps(self.status()).encode())
                elif request == b"stop":
                    conn.sendall(json.dumps({"stopping": True, "pid": os.getpid()}).encode())
                    self.stop()
                else:
                    conn.sendall(json.dumps({"error": "unknown request"}).encode())
            except OSError:
                pass

    def status(self) -> dict[str, Any]:
        st = self.switch.status()
        st.update(name=self.name, pid=os.getpid(), uptime=round(time.time() - self.started, 1),
                  sockets={g: str(s.getsockname()) for g, s in self.listeners.items()},
                  groups={g.name: {"vlan": g.vlan} for g in self.config.groups.values()},
                  teams=[t.status() for t in self.teams])
        return st

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    # -- running --------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """Serves until stop() or SIGTERM/SIGINT; closes everything after."""
        old = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
        next_tick = time.monotonic() + TICK
        try:
            while not self._stopping:
                wake = min([next_tick] + [t.beacon_tick() for t in self.teams])
                timeout = 0.0 if self._soon else max(0.0, wake - time.monotonic())
                for key, mask in self.sel.select(min(timeout, 0.5)):
                    try:
                        key.data(mask)
                    except Exception:
                        log.exception("switch %s: handler failed", self.name)
                    dirty, self.dirty = self.dirty, []
                    for client in dirty:
                        client.flush()
                soon, self._soon = self._soon, []
                for cb in soon:
                    cb()
                if time.monotonic() >= next_tick:
                    self.switch.macs.age()
                    next_tick = time.monotonic() + TICK
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        for client in list(self.clients):
            self.drop_client(client, "switch stopping")
        for port, dev in list(self.uplinks.items()):
            dev.close()
            self.switch.remove_port(port)
        self.uplinks.clear()
        for team in self.teams:
            team.close()
        self.teams.clear()
        if self.links is not None:
            self.links.close()
            self.links = None
        socks = list(self.listeners.items()) + ([("control", self.control)] if self.control else [])
        for _, s in socks:
            try:
                path = s.getsockname()
                s.close()
                os.unlink(path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("closing %s: %s", s, e)
        self.listeners.clear()
        self.control = None
        self.sel.close()
