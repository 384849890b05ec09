"""`pyvmm run --ft primary|backup --ft-channel URI [--ft-lock PATH] [--ft-seed]`: one FT member.

Start the backup first (it listens on the channel), then the primary with
the same guest options.  The guest's console is COM1: `--serial
file:PATH` (the same path on both sides) gets every byte at its offset in
the console stream, so the file reads the same whichever member wrote it;
with `stdio` each member prints what it lets out.  The primary's keyboard
goes to the guest through the log; the backup's stdin is read only once it
is live.

A member left live without a backup (reprotect.py) dials --ft-channel until
a new backup started there with `--ft backup --ft-seed` answers; it seeds
that backup with its state and is a primary again."""

from __future__ import annotations

import logging
import sys
import time

from ..builder import build_machine, destroy_machine
from ..config import VmConfig, parse_serial
from ..errors import ConfigError, VmmError
from ..machine import StopReason, StopStatus
from . import channel as C
from . import log as L
from .commit import console_file_writer, stream_writer
from . import seeded as S
from .failover import ALONE, PRIMARY, FtLock, default_lock_path
from .record import position
from .reprotect import Reprotector, alone_recorder
from .setup import (attach_backup, attach_primary, backup_go_live, check_same_guest, ft_config,
                    guest_fields, host_values)

logger = logging.getLogger(__name__)

END_ACK_WAIT_S = 5.0


def _writer(cfg: VmConfig, console, truncate: bool):
    """The console stream's writer and its closer. Raises ConfigError."""
    kind, path = parse_serial(cfg.serials[0])
    if kind == "file":
        try:
            return console_file_writer(path, truncate)
        except OSError as e:
            raise ConfigError(f"serial port file {path}: {e.strerror or e}") from None
    if kind == "null":
        return (lambda offset, data: None), (lambda: None)
    return stream_writer(console.write), (lambda: None)


def _say(text: str) -> None:
    print(f"pyvmm: FT: {text}", file=sys.stderr, flush=True)


def run_primary(cfg: VmConfig, console, channel: str, lock_path: str | None = None) -> StopStatus:
    """Runs `cfg` as the FT primary until the guest stops. Raises VmmError."""
    cfg = ft_config(cfg)
    lock = FtLock(lock_path or default_lock_path(cfg, channel))
    if not lock.try_acquire():
        raise ConfigError(f"--ft primary: another member is live (it holds {lock.path})")
    try:
        lock.mark(PRIMARY)
        link = C.PrimaryLink(C.connect(channel))
        try:
            return _primary(cfg, console, link, lock, channel)
        finally:
            link.close()
    finally:
        lock.release()


def _finish(guard: Reprotector, machine) -> None:
    """The guest stopped: END to the backup (if one is left) and every held output out."""
    guard.stop()
    rec, link = guard.recorder, guard.link
    rec.finish()
    if not rec.alone and link is not None and not link.wait_acked(position(machine.engine), END_ACK_WAIT_S):
        _say("the backup did not acknowledge the end of the log")
    for out in rec.outputs:
        out.release_all()


def _primary(cfg: VmConfig, console, link: C.PrimaryLink, lock: FtLock, channel: str) -> StopStatus:
    wall_ns, seed = host_values()
    try:
        link.send(L.header() + L.hello(guest_fields(cfg), wall_ns, seed))
    except OSError as e:
        raise C.ChannelError(f"--ft primary: the backup hung up: {e.strerror or e}") from None
    write, close = _writer(cfg, console, truncate=True)
    try:
        machine = build_machine(cfg, console.write)
    except BaseException:
        close()
        raise
    try:
        rec = attach_primary(machine, wall_ns, seed, link.send, write)
        guard = Reprotector(machine, rec, channel, lock, write, wall_ns, _say, cfg)
        guard.link = link
        rec.on_alone = guard.lost       # fence the backup off, then look for a new one
        link.start(rec)
        machine.engine.ft = guard
        console.start(guard.typed, lambda: machine.request_stop(StopReason.USER, "user quit"), machine.loop)
        try:
            machine.run()
            _finish(guard, machine)
        finally:
            guard.close()
        return machine.stop_status
    finally:
        console.close()
        destroy_machine(machine)
        close()


def run_backup(cfg: VmConfig, console, channel: str, lock_path: str | None = None,
               seeded: bool = False) -> StopStatus:
    """Replays the primary's log at `channel`; on its loss goes live. `seeded`:
    the log starts from a live member's state (--ft-seed). Raises VmmError."""
    cfg = ft_config(cfg)
    lock = FtLock(lock_path or default_lock_path(cfg, channel))
    sock = C.accept(channel)
    offset, start = 0, None
    try:
        if seeded:
            got = S.receive(sock, cfg, console.write)
            machine, wall_ns, seed, offset, start = got.machine, got.wall_ns, got.seed, got.console, got.pos
            _say(f"seeded by the live VM at instruction {start[0]}")
        else:
            try:
                primary, wall_ns, seed = C.read_hello(sock)
            except OSError as e:
                raise C.ChannelError(f"--ft backup: the primary hung up: {e.strerror or e}") from None
            check_same_guest(guest_fields(cfg), primary)
            machine = build_machine(cfg, console.write)
    except BaseException:
        sock.close()
        raise
    link = None
    guard: list[Reprotector] = []
    refused: list[str] = []
    try:
        write, close = _writer(cfg, console, truncate=False)

        def go_live() -> None:          # the vCPU thread, with the whole log applied
            lost_at = time.monotonic()
            if not lock.acquire() or lock.text() == ALONE:    # alive, or it ran on without us (failover.py)
                refused.append(lock.path)
                machine.request_stop(StopReason.USER, "FT: the primary still holds the lock")
                return
            rep.commit.go_live()
            backup_go_live(machine, rep)
            live = Reprotector(machine, alone_recorder(machine, rep.commit), channel, lock, write, wall_ns, _say,
                              cfg)
            guard.append(live)
            machine.engine.ft = live
            console.start(live.typed, lambda: machine.request_stop(StopReason.USER, "user quit"), machine.loop)
            live.start_dialling()
            now = time.monotonic()      # CLOCK_MONOTONIC: comparable across processes (bench/ft.py)
            _say(f"primary lost; backup live at instruction {rep.pos[0]} "
                 f"({(now - lost_at) * 1000:.0f} ms for the lock; monotonic {now:.6f})")

        rep = attach_backup(machine, wall_ns, seed, write, go_live, console_offset=offset)
        if start is not None:
            rep.pos = start             # its ACKs say how far it ran: from here, not from 0
        link = C.BackupLink(sock, rep, lock.try_acquire)
        link.start()
        try:
            machine.run()
            if guard:
                _finish(guard[0], machine)
        finally:
            for live in guard:
                live.close()
            close()
        if refused:
            raise VmmError(f"--ft backup: the primary is alive or ran on alone ({refused[0]}): not going live")
        return machine.stop_status
    finally:
        if link is not None:
            link.close()
        else:
            sock.close()
        console.close()
        destroy_machine(machine)
        lock.release()


def run_ft(args, cfg: VmConfig) -> int:
    """The CLI's `run --ft`: the member's exit code. Raises VmmError."""
    from ..cli.exitcodes import exit_code
    from ..console import Console
    if not args.ft_channel:
        raise ConfigError("--ft needs --ft-channel tcp:HOST:PORT|unix:PATH")
    seeded = getattr(args, "ft_seed", False)
    if seeded and args.ft != "backup":
        raise ConfigError("--ft-seed is for a new backup (--ft backup): the live VM seeds it")
    if args.ft == "primary":
        status = run_primary(cfg, Console(), args.ft_channel, args.ft_lock)
    else:
        status = run_backup(cfg, Console(), args.ft_channel, args.ft_lock, seeded)
    if cfg.verbose:
        _say(f"guest stopped: {status.reason.value} {status.detail}")
    return exit_code(status)
