"""Re-protection in one process: a live machine seeds a new backup over a
socket pair midway through its run, and the backup, replaying from there,
ends in the same state (registers, RAM, position) as the live one."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.ft import seeded
from pyvmm.ft.channel import BackupLink
from pyvmm.ft.commit import LIVE, OutputCommit
from pyvmm.ft.failover import FtLock
from pyvmm.ft.record import position
from pyvmm.ft.reprotect import Reprotector, alone_recorder
from pyvmm.ft.setup import CONSOLE_UART, attach_backup, pin_host_inputs
from pyvmm.machine import StopReason
from tests.hostfacts import require_from_setup
from tests.rawguest import run_until_stop

from . import harness
from .guest import kernel

require_from_setup(programs=["as"], package="binutils")

BEFORE, AFTER = b"seed", b" lockstep!q"


@pytest.fixture(scope="module")
def guest() -> str:
    return str(kernel())


def _live(guest: str, tmp_path, out: bytearray) -> Reprotector:
    """A machine running live and unprotected (as a backup after failover)."""
    machine = build_machine(harness.guest_config(guest), lambda data: None)
    pin_host_inputs(machine, harness.WALL_NS, harness.SEED)
    commit = OutputCommit(harness._placer(out), LIVE)
    machine.devices[CONSOLE_UART].output = commit.output
    lock = FtLock(str(tmp_path / "ft.lock"))
    assert lock.try_acquire()
    guard = Reprotector(machine, alone_recorder(machine, commit), f"unix:{tmp_path / 'unused.sock'}", lock,
                        harness._placer(out), harness.WALL_NS)
    machine.engine.ft = guard
    return guard


def test_seeded_backup_ends_in_the_same_state(guest, tmp_path):
    live_out, backup_out = bytearray(), bytearray()
    guard = _live(guest, tmp_path, live_out)
    live = guard.machine
    here, there = socket.socketpair()
    result: dict = {}

    def seeded_backup() -> None:
        try:
            got = seeded.receive(there, harness.guest_config(guest), lambda data: None)
            result["seed"] = got
            rep = attach_backup(got.machine, got.wall_ns, got.seed, harness._placer(backup_out),
                                console_offset=got.console)
            rep.pos = got.pos
            link = BackupLink(there, rep)
            link.start()
            try:
                run_until_stop(got.machine, harness.TIMEOUT_S)
                result["outcome"] = harness._finish(got.machine, backup_out)
                result["applied"] = rep.applied
            finally:
                link.close()
                destroy_machine(got.machine)
        except BaseException as e:      # reported by the main thread
            result["error"] = e

    rng = random.Random(7)

    def typist() -> None:
        for b in BEFORE:
            time.sleep(rng.uniform(0.0, 0.03))
            guard.typed(bytes([b]))
        threading.Thread(target=seeded_backup, daemon=True).start()
        guard._offer = here                       # as if the dialler had reached a new backup
        live.engine.sched._wake.set()
        while guard.seeded == 0 and live.stop_status is None:
            time.sleep(0.01)
        for b in AFTER:
            time.sleep(rng.uniform(0.0, 0.03))
            guard.typed(bytes([b]))

    t = threading.Thread(target=typist, daemon=True)
    t.start()
    try:
        run_until_stop(live, harness.TIMEOUT_S)
        rec = guard.recorder
        rec.finish()
        assert guard.link is not None, "the live machine never seeded the backup"
        assert guard.link.wait_acked(position(live.engine), 10)
        rec.commit.release_all()
        primary = harness._finish(live, live_out)
    finally:
        t.join(10)
        guard.close()
        destroy_machine(live)
    deadline = time.monotonic() + 30
    while "outcome" not in result and "error" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "error" not in result, result.get("error")
    backup = result["outcome"]
    assert primary.stop is StopReason.DEBUG_EXIT
    assert 0 < result["seed"].pos[0] < primary.pos[0]       # seeded midway
    assert result["applied"] >= len(AFTER) - 1               # inputs replayed from the log, not the state
    assert backup.stop is StopReason.DEBUG_EXIT
    assert backup.pos == primary.pos
    assert backup.regs == primary.regs
    assert backup.ram_sha == primary.ram_sha
    assert live_out.replace(b".", b"").startswith(BEFORE + AFTER)


def test_a_guest_without_deterministic_time_is_not_reseeded(guest, tmp_path):
    """A backup could not replay it: the live member answers a new backup
    with REFUSE (one line, why) and runs on unprotected."""
    import dataclasses
    cfg = dataclasses.replace(harness.guest_config(guest), deterministic=False)
    machine = build_machine(cfg, lambda data: None)
    here, there = socket.socketpair()
    said: list[str] = []
    try:
        commit = OutputCommit(lambda offset, data: None, LIVE)
        machine.devices[CONSOLE_UART].output = commit.output
        lock = FtLock(str(tmp_path / "ft.lock"))
        assert lock.try_acquire()
        guard = Reprotector(machine, alone_recorder(machine, commit), f"unix:{tmp_path / 'unused.sock'}", lock,
                            commit.write, harness.WALL_NS, said.append)
        guard._offer = here
        guard.round_top()                       # as the scheduler would, before a round
        there.settimeout(5)
        with pytest.raises(seeded.C.ChannelError, match="deterministic time"):
            seeded.read_seed(there)
        assert guard.link is None and guard.recorder.alone
        assert said and "refused" in said[0]
        assert lock.text() != b"primary\n"      # never marked as protected
    finally:
        there.close()
        destroy_machine(machine)
