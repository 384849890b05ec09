"""FT with a virtio-blk disk (one raw image both members open) and a
virtio-net NIC on a pyvmm switch: a client sends numbered frames, the
guest writes each number to the disk, reads it back and echoes the frame;
the primary is SIGKILLed at a random moment in an exchange, the backup goes
live, takes the switch port (its RARP announces the MAC), and the echo goes
on.  Afterwards the image holds every write an echo vouched for."""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from tests.hostfacts import require_from_setup
from tests.net.switch_helpers import SwitchProcess, eth

from .members import GUEST_OPTS, Pair
from .virtio_guest import kernel

require_from_setup(programs=["as"], package="binutils")

GUEST_MAC = bytes.fromhex("02a000000001")
CLIENT_MAC = bytes.fromhex("02b000000002")
ETHERTYPE = 0x88B5
RESEND_S = 0.5
EXCHANGE_S = 20.0
DISK = 1 << 20
KILL_WITHIN_S = 1.5


@pytest.fixture(scope="module")
def guest() -> str:
    return str(kernel())


def _echo_of(frame: bytes, k: int) -> tuple[str, int] | None:
    """(verdict, first dword of sector k) of the guest's echo of frame k."""
    if len(frame) < 23 or frame[:6] != CLIENT_MAC or frame[6:12] != GUEST_MAC:
        return None
    if struct.unpack_from(">H", frame, 12)[0] != ETHERTYPE or struct.unpack_from("<I", frame, 14)[0] != k:
        return None
    return chr(frame[18]), struct.unpack_from("<I", frame, 19)[0]


def _exchange(client, pair: Pair, k: int, announced: list[bytes]) -> tuple[str, int]:
    """Sends frame k until its echo comes: again each RESEND_S once the
    primary was killed (it may have taken the frame and died before logging
    it: a lost frame, as a network may lose any).  Before, a resend would
    only queue duplicates behind a slow answer."""
    frame = eth(GUEST_MAC, CLIENT_MAC, struct.pack("<I", k), ETHERTYPE)
    deadline = time.monotonic() + EXCHANGE_S
    sent_after_kill = False
    client.send(frame)

    def wanted(f: bytes) -> bool:
        _note_rarp(f, announced)
        return _echo_of(f, k) is not None
    while time.monotonic() < deadline:
        got = client.recv_until(wanted, timeout=RESEND_S)
        if got is not None:
            return _echo_of(got, k)
        if pair.killed_at is not None:
            client.send(frame)
            sent_after_kill = True
    raise AssertionError(f"no echo of frame {k} (sent again after the kill: {sent_after_kill}): {pair.errors()}")


def _note_rarp(f: bytes, announced: list[bytes]) -> bool:
    """Keeps the live member's RARP announcements; whether one came yet."""
    if f[6:12] == GUEST_MAC and f[12:14] == b"\x80\x35":
        announced.append(f)
    return bool(announced)


def test_primary_killed_during_disk_and_network_io(guest, tmp_path, monkeypatch):
    switch = SwitchProcess(name="ftv")
    monkeypatch.setenv("PYVMM_SWITCH_DIR", str(switch.dir))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(DISK))
    opts = ["--kernel", guest, *GUEST_OPTS, "--transport", "mmio", "--drive", f"file={disk},format=raw",
            "--net", f"switch=ftv,mac={GUEST_MAC.hex(':')}"]
    pair = Pair(guest, tmp_path, opts)
    rng = random.Random()
    kill_at = rng.randrange(2, 6)
    frames = kill_at + 6
    echoed: dict[int, tuple[str, int]] = {}
    took_ms = []
    announced: list[bytes] = []
    try:
        client = switch.client()
        pair.wait_running()
        for k in range(frames):
            if k == kill_at:     # anywhere in this exchange (about 1 s under FT) or just after it
                delay = rng.uniform(0.0, KILL_WITHIN_S)
                threading.Timer(delay, pair.kill_primary).start()
            start = time.monotonic()
            echoed[k] = _exchange(client, pair, k, announced)
            took_ms.append(round((time.monotonic() - start) * 1000))
        failover = pair.failover_s()
        client.recv_until(lambda f: _note_rarp(f, announced), timeout=1.0)
        live = (tmp_path / "backup.err").read_text()
        assert pair.backup.poll() is None, pair.errors()
    finally:
        pair.close()
        switch.stop()
    check_echoes_and_disk(echoed, disk)
    assert announced, "the backup did not announce the MAC (RARP) when it went live"
    assert failover < 1.0, f"failover took {failover:.2f} s"
    print(f"killed {delay * 1000:.0f} ms into frame {kill_at}; failover {failover * 1000:.0f} ms; exchanges (ms) {took_ms}; {live}")


def check_echoes_and_disk(echoed: dict, disk) -> None:
    """Every echo read back what its frame wrote after the previous one,
    and the image holds each acknowledged write."""
    for k, (verdict, before) in echoed.items():
        assert verdict == "G", f"frame {k}: the guest read back something else than it wrote"
        assert before == (k - 1 if k else 0), f"frame {k}: sector {k} holds {before}, not {k - 1}"
    image = disk.read_bytes()
    for k in echoed:      # every echo vouches for its completed write
        assert image[(k + 1) * 512:(k + 2) * 512] == struct.pack("<I", k) * 128, f"sector {k + 1} lost"
