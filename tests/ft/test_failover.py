"""FT with two pyvmm processes: the client's console (a file both members
write at stream offsets) holds every echoed byte exactly once, whether the
primary lives to the end or is killed (SIGKILL) at a random moment and the
backup takes over."""

from __future__ import annotations

import random

import pytest

from tests.hostfacts import require_from_setup

from .guest import kernel
from .members import Pair

require_from_setup(programs=["as"], package="binutils")

TEXT = b"abcdefghij"


@pytest.fixture(scope="module")
def guest() -> str:
    return str(kernel())


def _check_console(pair: Pair, typed: bytes) -> None:
    text = pair.text()
    assert b"\0" not in text, "a gap in the console stream"
    assert pair.echoes() == typed + b"q"
    assert text.endswith(b"N=%08X\n" % (len(typed) + 1))


def test_no_failure(guest, tmp_path):
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        for b in TEXT:
            pair.type(bytes([b]))
        assert pair.finish() == 1                 # isa-debug-exit 0
        assert pair.backup.returncode == 1        # the backup replayed to the same end
        _check_console(pair, TEXT)
    finally:
        pair.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_primary_killed(guest, tmp_path, seed):
    rng = random.Random(seed)
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        kill_after = rng.randrange(len(TEXT))
        for i, b in enumerate(TEXT):      # the kill lands while a byte is on its way in
            pair.type(bytes([b]), rng.uniform(0, 0.03) if i == kill_after else None)
            if i == kill_after:
                assert pair.failover_s() < 1.0
        assert pair.finish() == 1
        _check_console(pair, TEXT)
    finally:
        pair.close()


def test_a_stalled_primary_is_not_replaced(guest, tmp_path):
    """A primary that stops answering but lives (SIGSTOP: a stall, or a cut
    network) keeps its lock, so the backup waits instead of going live; when
    the primary comes back, lockstep goes on and the console stays whole."""
    import signal
    import time
    pair = Pair(guest, tmp_path)
    try:
        pair.wait_running()
        pair.type(b"a")
        pair.primary.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2.5)                      # three times the backup's suspicion time
            assert pair.backup.poll() is None
            assert b"backup live" not in (tmp_path / "backup.err").read_bytes()
        finally:
            pair.primary.send_signal(signal.SIGCONT)
        for b in b"bc":
            pair.type(bytes([b]))
        assert pair.finish() == 1
        assert pair.backup.returncode == 1       # it replayed to the same end
        assert b"backup live" not in (tmp_path / "backup.err").read_bytes()
        _check_console(pair, b"abc")
    finally:
        pair.close()
