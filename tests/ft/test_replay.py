"""Deterministic replay under bt: a backup fed the primary's log ends in the
same state (registers, RAM, position, console) as the primary, though the
primary's inputs came at random host moments; a log with one input moved
is refused or ends elsewhere."""

from __future__ import annotations

import pytest

from pyvmm.ft import log as L
from pyvmm.ft.replay import ReplayDiverged
from pyvmm.machine import StopReason
from tests.hostfacts import require_from_setup

from . import harness
from .guest import kernel

require_from_setup(programs=["as"], package="binutils")


@pytest.fixture(scope="module")
def guest() -> str:
    return str(kernel())


@pytest.fixture(scope="module")
def recorded(guest):
    return harness.record(guest, b"hello, lockstep!q", seed=1)


def test_primary_saw_its_inputs(recorded):
    records, out = recorded
    assert out.stop is StopReason.DEBUG_EXIT
    events = [L.parse_event(p) for k, p in records if k == L.EVENT]
    assert b"".join(e.data for e in events) == b"hello, lockstep!q"
    assert len({e.pos for e in events}) > 3          # the inputs landed at many positions
    assert b"hello, lockstep!q" in out.output.replace(b".", b"")
    assert b"SUM=" in out.output and b"N=00000011" in out.output
    assert out.output.count(b".") >= 2                # timer interrupts came and printed


def test_backup_ends_in_the_same_state(guest, recorded):
    records, primary = recorded
    backup = harness.replay(guest, records)
    assert backup.stop is StopReason.DEBUG_EXIT
    assert backup.pos == primary.pos
    assert backup.regs == primary.regs
    assert backup.ram_sha == primary.ram_sha
    # at failover the backup writes what the primary may not have let out
    assert 0 < backup.skipped < len(primary.output)
    assert backup.output[backup.skipped:] == primary.output[backup.skipped:]


def test_two_primaries_differ(guest, recorded):
    """The checksum depends on when the inputs came (so the test above means something)."""
    _, first = recorded
    _, second = harness.record(guest, b"hello, lockstep!q", seed=2)
    assert second.output.split(b"SUM=")[1] != first.output.split(b"SUM=")[1]


def test_the_random_seed_matters(guest, recorded):
    """RDRAND's stream comes from the primary's seed: another seed ends elsewhere."""
    records, primary = recorded
    other = harness.replay(guest, records, seed=harness.SEED + 1)
    assert other.regs["rsi"] != primary.regs["rsi"]


def test_a_moved_input_is_caught(guest, recorded):
    records, primary = recorded
    moved, done = [], False
    for kind, payload in records:
        if kind == L.EVENT and not done:
            ev = L.parse_event(payload)
            payload = L.event(L.Event((ev.pos[0] - 1, ev.pos[1] - 1), ev.kind, ev.name, ev.data))[L.RECORD.size:]
            done = True
        moved.append((kind, payload))
    with pytest.raises(ReplayDiverged):
        harness.replay(guest, moved)
