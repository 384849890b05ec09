"""Running the FT test guest as an in-process primary and backup."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.ft import log as L
from pyvmm.ft.channel import dispatch
from pyvmm.ft.setup import attach_backup, attach_primary, ft_config
from pyvmm.machine import StopReason

from tests.rawguest import run_until_stop

WALL_NS = 1_700_000_000 * 10**9
SEED = 12345
TIMEOUT_S = 60.0


def guest_config(kernel: str) -> VmConfig:
    return ft_config(VmConfig(kernel=str(kernel), engine="bt", mem_mib=16, debug_exit=(0xF4, 1),
                              cmdline="", kvmclock=False))


@dataclass
class Outcome:
    output: bytes           # the console as the outside saw it
    regs: dict
    ram_sha: str
    pos: tuple[int, int]
    stop: StopReason
    skipped: int = 0        # backup: console bytes the primary had already let out


def _finish(machine, output: bytearray) -> Outcome:
    from pyvmm.ft.record import position
    st = machine.engine.save_state(0)
    regs = {**st.regs, "rip": st.rip, "rflags": st.rflags}
    ram = hashlib.sha256(machine.memory.read(0, machine.config.mem_mib << 20)).hexdigest()
    return Outcome(bytes(output), regs, ram, position(machine.engine), machine.stop_status.reason)


def _placer(buf: bytearray):
    def write(offset: int, data: bytes) -> None:
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset:offset + len(data)] = data
    return write


def _run(machine) -> None:
    run_until_stop(machine, TIMEOUT_S)


def record(kernel: str, inputs: bytes, seed: int) -> tuple[list[tuple[int, bytes]], Outcome]:
    """Runs a primary that gets `inputs` one byte at a time at random host
    moments; returns its log (kind, payload) and how it ended."""
    records: list[tuple[int, bytes]] = []
    out = bytearray()
    machine = build_machine(guest_config(kernel), lambda data: None)
    rec = None

    def send(data: bytes) -> None:        # a backup that acknowledges at once
        kind, payload = L.read_record(_reader(data))
        records.append((kind, payload))
        if kind == L.PROGRESS:
            pos = L.parse_progress(payload)[0]
            rec.commit.acknowledged(pos)
            rec.executed = pos[0]           # and it has run that far (no lag wait)

    rec = attach_primary(machine, WALL_NS, SEED, send, _placer(out))
    rng = random.Random(seed)

    def typist() -> None:
        for b in inputs:
            time.sleep(rng.uniform(0.0, 0.05))
            rec.serial_input("serial0", bytes([b]))

    t = threading.Thread(target=typist, daemon=True)
    t.start()
    try:
        _run(machine)
        rec.finish()
        rec.commit.release_all()
        return records, _finish(machine, out)
    finally:
        destroy_machine(machine)


def replay(kernel: str, records: list[tuple[int, bytes]], seed: int = SEED) -> Outcome:
    """Runs a backup over a whole log; its console as it would go out at failover."""
    out = bytearray()
    machine = build_machine(guest_config(kernel), lambda data: None)
    try:
        rep = attach_backup(machine, WALL_NS, seed, _placer(out))
        for kind, payload in records:
            dispatch(rep, kind, payload)
        _run(machine)
        skipped = rep.commit.released
        rep.commit.go_live()
        outcome = _finish(machine, out)
        outcome.skipped = skipped
        return outcome
    finally:
        destroy_machine(machine)


def _reader(data: bytes):
    view = memoryview(data)
    pos = [0]

    def read(n: int) -> bytes:
        chunk = bytes(view[pos[0]:pos[0] + n])
        pos[0] += len(chunk)
        return chunk
    return read
