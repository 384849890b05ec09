"""Re-protection, the new backup's side (`pyvmm run --ft backup --ft-seed`):
instead of a HELLO and a guest at power-on, the live member sends a SEED
record and its whole state as a live-migration stream
(migration/receiver.py's load_stream reads it); the backup then replays
the log from the position the state was taken at (reprotect.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ..builder import build_machine, destroy_machine
from ..config import VmConfig
from ..errors import ConfigError, VmmError
from ..migration.receiver import load_stream
from . import channel as C
from . import log as L
from . import virtio as V
from .setup import check_same_guest, guest_fields


@dataclass
class Seed:
    machine: object
    wall_ns: int
    seed: int
    console: int               # console bytes the live member already let out
    pos: tuple[int, int]       # where the log starts


def read_seed(sock: socket.socket) -> dict:
    """The live member's SEED document. Raises ChannelError or LogError."""
    L.read_header(sock.recv)
    kind, payload = L.read_record(sock.recv)
    if kind == L.HELLO:
        raise C.ChannelError("--ft-seed: the member that connected is a primary starting from power-on "
                             "(start this backup without --ft-seed)")
    if kind == L.REFUSE:
        raise C.ChannelError(f"--ft-seed: the live VM refused to seed a backup: "
                             f"{payload.decode(errors='replace')}")
    if kind != L.SEED:
        raise L.LogError(f"FT log starts with a {L.NAMES[kind]} record, not seed")
    return L.parse_seed(payload)


def receive(sock: socket.socket, cfg: VmConfig, write_console) -> Seed:
    """Builds the backup's machine and loads the live member's state into it.
    Raises VmmError (ChannelError, LogError, StreamError, ConfigError)."""
    try:
        doc = read_seed(sock)
    except OSError as e:
        raise C.ChannelError(f"--ft-seed: the live VM hung up: {e.strerror or e}") from None
    check_same_guest(guest_fields(cfg), doc["config"])
    if len(doc["cpus"]) != cfg.cpus:
        raise ConfigError(f"--ft-seed: the live VM has {len(doc['cpus'])} vCPU(s), this one {cfg.cpus}")
    machine = build_machine(cfg, write_console)
    try:
        V.mute_nics(machine)        # the live member's guest gets the network's frames, through the log
        f = sock.makefile("rb", buffering=0)    # unbuffered: the FT log follows the stream on this socket
        try:
            load_stream(machine, f, answer=sock.sendall)
            _load_cpu_extras(machine, doc["cpus"])
        except VmmError as e:
            _say_why(sock, e)
            raise
        except OSError as e:
            raise C.ChannelError(f"--ft-seed: the live VM hung up: {e.strerror or e}") from None
        sock.sendall(b"OK\n")
    except BaseException:
        destroy_machine(machine)
        raise
    from .record import position
    return Seed(machine, doc["wall_ns"], doc["seed"], doc["console"], position(machine.engine))


def _load_cpu_extras(machine, cpus: list[dict]) -> None:
    """What reprotect.cpu_extras() took. Raises LogError."""
    sched = machine.engine.sched
    try:
        for c, extra in zip(machine.engine.cpus, cpus):
            c.icount = int(extra["icount"])
            c.halted = bool(extra["halted"])
            c.pending = bool(extra["pending"])
            c.shadow_int = bool(extra["shadow_int"])
            c.shadow_rip = int(extra["shadow_rip"])
            sched.waiting_sipi[c.index] = bool(extra["waiting_sipi"])
    except (KeyError, TypeError, ValueError):
        raise L.LogError("FT log seed record's vCPU fields are not valid") from None


def _say_why(sock: socket.socket, e: VmmError) -> None:
    """Tells the live member why (migration's "ERR reason" line)."""
    try:
        sock.sendall(b"ERR " + str(e).encode(errors="replace")[:900] + b"\n")
    except OSError:
        pass
