"""Crash safety of qcow2 writes: a writer process running pyvmm's own qcow2
code is SIGKILLed at random moments, over and over on the same image. After
every kill `qemu-img check` must call the image clean or leaks-only (exit 0
or 3), and every 512-byte slot must hold what was acknowledged by the last
completed flush, or one of the values written after it."""

from __future__ import annotations

import os
import random
import signal
import struct
import time

from pyvmm.storage import open_image
from pyvmm.storage.create import create_image

from .helpers import qemu_img

SIZE = 1 << 20
CLUSTER = 4096
SLOT = 512
SLOTS = SIZE // SLOT
KILLS = 200
RECORD = struct.Struct("<BIQ")    # op, slot, value seed
OP_WRITE, OP_ZERO, OP_DISCARD, OP_FLUSHED, WRITER_FAILED = 1, 2, 3, 4, 9


def slot_value(slot: int, seed: int) -> bytes:
    return struct.pack("<QQ", slot, seed) * (SLOT // 16)


def writer(path: str, round_no: int, log_fd: int) -> None:
    """Runs in the forked child until it is killed: logs each operation
    before issuing it, and OP_FLUSHED once a flush has returned."""
    rnd = random.Random(round_no)
    with open_image(path) as img:
        i = 0
        while True:
            i += 1
            slot = rnd.randrange(SLOTS)
            seed = (round_no << 32) | i
            kind = rnd.choices([OP_WRITE, OP_ZERO, OP_DISCARD], [85, 8, 7])[0]
            os.write(log_fd, RECORD.pack(kind, slot, seed))
            if kind == OP_WRITE:
                img.write(slot * SLOT, slot_value(slot, seed))
            elif kind == OP_ZERO:
                img.write_zeroes(slot * SLOT, SLOT)
            else:
                img.discard(slot * SLOT // CLUSTER * CLUSTER, CLUSTER)
            if i % 16 == 0:
                img.flush()
                os.write(log_fd, RECORD.pack(OP_FLUSHED, 0, 0))


def read_log(fd: int, data: bytes = b"") -> list[tuple[int, int, int]]:
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    whole = len(data) // RECORD.size * RECORD.size
    return [RECORD.unpack_from(data, k) for k in range(0, whole, RECORD.size)]


def test_sigkilled_writer_leaves_clean_or_leaky_image_and_keeps_flushed_data(tmp_path):
    path = str(tmp_path / "crash.qcow2")
    create_image(path, "qcow2", SIZE, options={"cluster_size": str(CLUSTER)})
    definite = [bytes(SLOT)] * SLOTS          # contents after the last acknowledged flush
    rnd = random.Random(2024)
    ops = flushes = 0
    for round_no in range(KILLS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                          # the writer: never returns into pytest
            os.close(r)
            try:
                writer(path, round_no, w)
            except BaseException:
                os.write(w, RECORD.pack(WRITER_FAILED, 0, 0))   # a bug, not a kill: fail the test
            finally:
                os._exit(1)
        os.close(w)
        # Kill once the writer has logged a random number of operations (so
        # a loaded CI machine still kills mid-stream), after a random pause.
        target = rnd.randrange(1, 40)
        seen = b""
        while len(seen) < target * RECORD.size and (chunk := os.read(r, 1 << 16)):
            seen += chunk
        time.sleep(rnd.choice([0.0, 0.0, 0.0002, 0.001]))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        log = read_log(r, seen)
        os.close(r)
        assert all(rec[0] != WRITER_FAILED for rec in log), f"kill {round_no}: the writer raised"
        ops += sum(rec[0] != OP_FLUSHED for rec in log)
        flushes += sum(rec[0] == OP_FLUSHED for rec in log)
        # Every op before the last flush has landed: replay them for the definite state.
        last_flush = max((k for k, rec in enumerate(log) if rec[0] == OP_FLUSHED), default=-1)
        expected_after_flush = list(definite)
        for kind, slot, seed in log[:last_flush + 1]:
            if kind == OP_WRITE:
                expected_after_flush[slot] = slot_value(slot, seed)
            elif kind == OP_ZERO:
                expected_after_flush[slot] = bytes(SLOT)
            elif kind == OP_DISCARD:
                first = slot * SLOT // CLUSTER * (CLUSTER // SLOT)
                for s in range(first, first + CLUSTER // SLOT):
                    expected_after_flush[s] = bytes(SLOT)
        later: dict[int, set[bytes]] = {}
        for kind, slot, seed in log[last_flush + 1:]:
            if kind == OP_FLUSHED:
                continue
            first = slot * SLOT // CLUSTER * (CLUSTER // SLOT)
            touched = range(first, first + CLUSTER // SLOT) if kind == OP_DISCARD else [slot]
            for s in touched:
                later.setdefault(s, set()).add(slot_value(s, seed) if kind == OP_WRITE else bytes(SLOT))

        check = qemu_img("check", path, check=False)
        assert check.returncode in (0, 3), f"kill {round_no}: qemu-img check rc {check.returncode}: {check.stdout}"
        with open_image(path, readonly=True) as img:
            disk = img.read(0, SIZE)
        for s in range(SLOTS):
            got = disk[s * SLOT:(s + 1) * SLOT]
            allowed = {expected_after_flush[s]} | later.get(s, set())
            assert got in allowed, f"kill {round_no}: slot {s} lost acknowledged data"
            definite[s] = got
    assert ops > 5 * KILLS and flushes > KILLS / 2, (ops, flushes)   # the kills did land mid-stream
    assert qemu_img("check", "-r", "leaks", path, check=False).returncode == 0
