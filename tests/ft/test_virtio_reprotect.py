"""Re-protection of a guest with a virtio-blk disk and a virtio-net NIC (the
echo guest of test_virtio_failover): the primary is killed, the backup goes
live, a third process is seeded while the exchange goes on, then the live
member is killed at a random moment and the third goes live, takes the
switch port and carries on.  Every echo still vouches for its write, and the
image holds them all."""

from __future__ import annotations

import random
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.hostfacts import require_from_setup
from tests.net.switch_helpers import SwitchProcess, eth

from .members import GUEST_OPTS, Pair
from .test_virtio_failover import CLIENT_MAC, check_echoes_and_disk, DISK, ETHERTYPE, GUEST_MAC, KILL_WITHIN_S, _exchange, _note_rarp
from .virtio_guest import kernel

require_from_setup(programs=["as"], package="binutils")

SEED_WAIT_S = 60.0
FLOOD_S = 0.15
FLOOD_REPEATS = 3           # of one frame: a guest slower than the flood must not pile them up


@pytest.fixture(scope="module")
def guest() -> str:
    return str(kernel())


def _start_third(pair: Pair, opts: list[str], first_lost: str) -> subprocess.Popen:
    """A new backup seeded by the live member: the live one becomes pair.primary
    (its stderr now primary.err) and the third pair.backup (backup.err)."""
    work = pair.work
    if first_lost == "primary":
        (work / "primary.err").rename(work / "first-primary.err")
        (work / "backup.err").rename(work / "primary.err")    # the live process keeps writing there
        pair.primary = pair.backup
    else:
        (work / "backup.err").rename(work / "first-backup.err")
    cmd = [sys.executable, "-m", "pyvmm", "run", "--ft-channel", f"unix:{work / 'ft.sock'}", *opts,
           "--serial", f"file:{pair.console}", "--ft", "backup", "--ft-seed"]
    third = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=open(work / "backup.err", "wb"))
    pair.backup = third
    pair.live, pair.killed_at = pair.primary, None
    return third


def _seeded(pair: Pair) -> bool:
    """Whether both sides said the seed is done. Raises AssertionError when one ended."""
    for p in (pair.primary, pair.backup):
        if p.poll() is not None:
            raise AssertionError(f"an FT member ended during the seed: {pair.errors()}")
    return (b"re-protected" in (pair.work / "primary.err").read_bytes()
            and b"seeded by the live VM" in (pair.work / "backup.err").read_bytes())


class _Flood:
    """Sends frame `k` (the one being exchanged) again every FLOOD_S, at most
    FLOOD_REPEATS times: the guest takes a repeat as the same write and echo,
    so repeats change nothing but keep frames arriving while the state is
    taken and sent, and some in the NIC's backlog while the guest's one
    receive buffer is taken."""

    def __init__(self, client, k: int, done):
        self.client, self.k, self.done = client, k, done
        lock, send = threading.Lock(), client.send

        def one_at_a_time(frame: bytes) -> None:      # the exchange sends on the same stream
            with lock:
                send(frame)
        client.send = one_at_a_time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        k, sent = self.k, 0
        while not self._stop.wait(FLOOD_S) and not self.done():
            if k != self.k:
                k, sent = self.k, 0
            if sent < FLOOD_REPEATS:        # the guest takes each repeat in turn: a round trip each under FT
                self.client.send(eth(GUEST_MAC, CLIENT_MAC, struct.pack("<I", k), ETHERTYPE))
                sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("first_lost,seed", [("primary", 1), ("backup", 3)])
def test_reprotected_during_disk_and_network_io_then_killed(guest, tmp_path, monkeypatch, first_lost, seed):
    """`first_lost`: the member killed first (the backup: the primary runs on
    alone, then seeds the third)."""
    switch = SwitchProcess(name=f"ftr{seed}")
    monkeypatch.setenv("PYVMM_SWITCH_DIR", str(switch.dir))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(DISK))
    opts = ["--kernel", guest, *GUEST_OPTS, "--transport", "mmio", "--drive", f"file={disk},format=raw",
            "--net", f"switch=ftr{seed},mac={GUEST_MAC.hex(':')}"]
    pair = Pair(guest, tmp_path, opts)
    rng = random.Random(seed)
    echoed: dict[int, tuple[str, int]] = {}
    announced: list[bytes] = []
    k = 0
    try:
        client = switch.client()
        pair.wait_running()
        for k in range(3):
            echoed[k] = _exchange(client, pair, k, announced)
        if first_lost == "primary":
            pair.kill_primary()                   # the backup goes live, unprotected
        else:
            pair.backup.send_signal(signal.SIGKILL)
            pair.backup.wait()                    # the primary runs on alone
        for k in range(3, 5):
            echoed[k] = _exchange(client, pair, k, announced)
        assert bool(announced) == (first_lost == "primary"), "only a backup gone live announces the MAC"
        _start_third(pair, opts, first_lost)
        deadline = time.monotonic() + SEED_WAIT_S
        k = 5
        # frames keep coming while the state is taken and sent
        flood = _Flood(client, k, lambda: b"re-protected" in (tmp_path / "primary.err").read_bytes())
        try:
            while not _seeded(pair):              # the exchange goes on through the seed
                assert time.monotonic() < deadline, f"no re-protection: {pair.errors()}"
                flood.k = k
                echoed[k] = _exchange(client, pair, k, announced)
                k += 1
        finally:
            flood.stop()
        seeded_at = k
        for k in range(k, k + 2):                 # logged to the third, in lockstep
            echoed[k] = _exchange(client, pair, k, announced)
        announced.clear()
        delay = rng.uniform(0.0, KILL_WITHIN_S)   # anywhere in the next exchange, or just after it
        threading.Timer(delay, pair.kill_primary).start()
        for k in range(k + 1, k + 6):
            echoed[k] = _exchange(client, pair, k, announced)
        failover = pair.failover_s()
        client.recv_until(lambda f: _note_rarp(f, announced), timeout=1.0)
        live = (tmp_path / "backup.err").read_text()
        seeding = [line for line in (tmp_path / "primary.err").read_text().splitlines() if "re-protected" in line]
        assert pair.backup.poll() is None, pair.errors()
    finally:
        pair.close()
        switch.stop()
    check_echoes_and_disk(echoed, disk)
    assert announced, "the third member did not announce the MAC (RARP) when it went live"
    assert failover < 1.0, f"failover took {failover:.2f} s"
    print(f"seeded by frame {seeded_at}; killed {delay * 1000:.0f} ms later; failover {failover * 1000:.0f} ms; "
          f"{live.strip().splitlines()[-1]}; {seeding}")
