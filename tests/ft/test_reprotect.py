"""Re-protection: after a failover the live member seeds a third process
(`--ft backup --ft-seed`) with its state and is a primary again; killing it
then makes the third go live, and the console (a file every member writes at
stream offsets) still holds every echoed byte exactly once."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from tests.hostfacts import require_from_setup

from .members import GUEST_OPTS, Pair

require_from_setup(programs=["as"], package="binutils")

SEED_WAIT_S = 60.0


from .test_failover import _check_console, guest  # noqa: F401  (guest: the module's fixture)


def _cmd(guest: str, pair: Pair, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", "run", "--ft-channel", f"unix:{pair.work / 'ft.sock'}",
            "--kernel", guest, *GUEST_OPTS, "--serial", f"file:{pair.console}", *extra]


def _wait_for(path, pattern: bytes, proc, what: str) -> None:
    deadline = time.monotonic() + SEED_WAIT_S
    while pattern not in path.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"{what}: {path.read_text(errors='replace')[-600:]}")
        time.sleep(0.02)


def _reprotect(guest: str, pair: Pair) -> None:
    """A third process seeds from the live backup; the live one becomes pair.primary
    (its stderr now primary.err) and the third pair.backup (backup.err)."""
    work = pair.work
    (work / "primary.err").rename(work / "first-primary.err")
    (work / "backup.err").rename(work / "primary.err")    # the live process keeps writing there
    third = subprocess.Popen(_cmd(guest, pair, "--ft", "backup", "--ft-seed"), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=open(work / "backup.err", "wb"))
    pair.primary, pair.backup = pair.backup, third
    pair.live, pair.sent_to_backup = pair.primary, False
    _wait_for(work / "primary.err", b"re-protected", pair.primary, "the live VM did not seed the new backup")
    _wait_for(work / "backup.err", b"seeded by the live VM", third, "the new backup was not seeded")


@pytest.mark.parametrize("seed", [1, 2])
def test_reprotect_then_kill_again(guest, tmp_path, seed):
    rng = random.Random(seed)
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        for b in b"ab":
            pair.type(bytes([b]))
        pair.type(b"c", rng.uniform(0, 0.03))         # the first primary dies with 'c' on its way
        assert pair.failover_s() < 1.0
        pair.type(b"d")                               # the backup runs live, unprotected
        _reprotect(guest, pair)
        for b in b"ef":
            pair.type(bytes([b]))                     # logged to the third, in lockstep
        pair.type(b"g", rng.uniform(0, 0.03))         # the second primary dies with 'g' on its way
        assert pair.failover_s() < 1.0
        for b in b"hi":
            pair.type(bytes([b]))
        assert pair.finish() == 1                     # the guest's isa-debug-exit 0, from the third
        _check_console(pair, b"abcdefghi")
    finally:
        pair.close()


def test_reprotect_then_clean_end(guest, tmp_path):
    """Re-protected and never killed: the new backup replays to the same end."""
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        pair.type(b"a")
        pair.kill_primary()
        pair.type(b"b")
        plain = subprocess.run(_cmd(guest, pair, "--ft", "backup"), stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60)   # a backup the live VM's seed reaches
        err = plain.stderr.decode(errors="replace").strip()
        assert plain.returncode != 0 and len(err.splitlines()) == 1 and "start this one with --ft-seed" in err, err
        _reprotect(guest, pair)
        pair.type(b"c")
        assert pair.finish() == 1
        assert pair.backup.returncode == 1            # the third replayed to the same end
        assert b"backup live" not in (tmp_path / "backup.err").read_bytes()
        _check_console(pair, b"abc")
    finally:
        pair.close()


def test_primary_that_lost_its_backup_is_reprotected(guest, tmp_path):
    """The backup dies; the primary runs on alone, then seeds a new one, which
    takes over when the primary is killed in turn."""
    import signal
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        pair.type(b"a")
        pair.backup.send_signal(signal.SIGKILL)
        pair.backup.wait()
        pair.type(b"b")                               # the primary runs on, unprotected
        (tmp_path / "backup.err").rename(tmp_path / "first-backup.err")
        pair.backup = subprocess.Popen(_cmd(guest, pair, "--ft", "backup", "--ft-seed"), stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=open(tmp_path / "backup.err", "wb"))
        _wait_for(tmp_path / "primary.err", b"re-protected", pair.primary, "the primary did not seed a backup")
        pair.type(b"c")
        pair.type(b"d", 0.01)
        assert pair.failover_s() < 1.0
        pair.type(b"e")
        assert pair.finish() == 1
        _check_console(pair, b"abcde")
    finally:
        pair.close()


def _one_line_error(cmd: list[str], timeout: float = 60) -> str:
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode != 0, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_seed_refused_under_another_engine(guest, tmp_path):
    pair_like = type("P", (), {"work": tmp_path, "console": tmp_path / "console.txt"})
    cmd = _cmd(guest, pair_like, "--ft", "backup", "--ft-seed")
    err = _one_line_error([*cmd, "--engine", "hw"])
    assert "--ft needs --engine bt" in err


def test_seed_is_only_for_a_backup(guest, tmp_path):
    pair_like = type("P", (), {"work": tmp_path, "console": tmp_path / "console.txt"})
    err = _one_line_error(_cmd(guest, pair_like, "--ft", "primary", "--ft-seed"))
    assert "--ft-seed is for a new backup" in err
    err = _one_line_error(_cmd(guest, pair_like, "--ft-seed"))    # no --ft at all: not run unprotected
    assert "--ft-seed is for a new backup" in err


def test_seed_backup_refuses_a_power_on_primary(guest, tmp_path):
    """A power-on primary sends HELLO, not a seed: the seeded backup says so and ends."""
    pair_like = type("P", (), {"work": tmp_path, "console": tmp_path / "console.txt"})
    backup = subprocess.Popen(_cmd(guest, pair_like, "--ft", "backup", "--ft-seed"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    primary = subprocess.Popen(_cmd(guest, pair_like, "--ft", "primary"), stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, err = backup.communicate(timeout=60)
        err = err.decode(errors="replace").strip()
        assert backup.returncode != 0, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "primary starting from power-on" in err
    finally:
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
                p.wait()
