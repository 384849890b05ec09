"""The migration stream in-process: a running counter guest (bt) migrated
into a second machine over a unix socket, and corrupt streams refused with
one-line errors before the destination changes anything it runs."""

from __future__ import annotations

import io
import random
import socket
import struct
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.machine import StopReason
from pyvmm.migration import stream
from pyvmm.migration.announce import gaps_ms, rarp_frame
from pyvmm.migration.receiver import load_stream
from pyvmm.migration.sender import Migration, Parameters
from pyvmm.migration.uri import MigrationError, parse_uri
from pyvmm.runstate import RunState

from tests.api.counterguest import COUNTER, SOURCE, counts
from tests.rawguest import build_guest, raw_boot


def _machine(output: bytearray):
    cfg = VmConfig(mem_mib=16, engine="bt", no_reboot=True)
    return build_machine(cfg, output.extend, boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))


class Recorder:
    """A destination that keeps the raw stream, answering SYNC and OK."""

    def __init__(self, path: str):
        self.listener = parse_uri(f"unix:{path}").listen()
        self.data = bytearray()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            f = conn.makefile("rb")
            tee = io.BytesIO()

            class Tee:
                @staticmethod
                def read(n: int) -> bytes:
                    b = f.read(n)
                    self.data.extend(b)
                    return b
            stream.read_header(Tee)
            while True:
                kind, _ = stream.read_record(Tee)
                if kind == stream.SYNC:
                    conn.sendall(b"SYNC\n")
                elif kind == stream.END:
                    conn.sendall(b"OK\n")
                    return


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """(recorded stream bytes, the source's counter when it stopped, the source's Migration)."""
    out = bytearray()
    m = _machine(out)
    thread = threading.Thread(target=m.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(counts(out)) < 3:
            assert time.monotonic() < deadline, bytes(out[-80:])
            time.sleep(0.01)
        path = str(tmp_path_factory.mktemp("mig") / "dest.sock")
        rec = Recorder(path)
        job = Migration(parse_uri(f"unix:{path}"), Parameters(downtime_limit_ms=300, max_bandwidth=0))
        job.run(m, m.pause, m.resume)
        assert job.status == "completed", job.error
        assert m.state is RunState.PAUSED and m.postmigrate
        rec.thread.join(10)
        yield bytes(rec.data), m.memory.read_u32(COUNTER), job
    finally:
        m.request_stop(StopReason.USER)
        thread.join(30)
        destroy_machine(m)


def test_round_trip_continues_the_counter(migrated):
    data, counter, job = migrated
    out = bytearray()
    dest = _machine(out)
    try:
        load_stream(dest, io.BytesIO(data))
        assert dest.memory.read_u32(COUNTER) == counter
        thread = threading.Thread(target=dest.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while len(counts(out)) < 3:
            assert time.monotonic() < deadline, bytes(out[-80:])
            time.sleep(0.01)
        dest.request_stop(StopReason.USER)
        thread.join(30)
        got = counts(out)
        # the first line may be one the source printed half of: the rest count on from the source
        assert got[1] in (counter + 1, counter + 2) and got[1:] == list(range(got[1], got[1] + len(got) - 1))
    finally:
        destroy_machine(dest)
    info = job.info()
    assert info["status"] == "completed" and info["ram"]["transferred"] == len(data)
    assert info["dirty-sync-count"] >= 1 and info["downtime"] >= 0


def test_zero_pages_are_markers(migrated):
    data, _, _ = migrated
    assert len(data) < 2 << 20, "16 MiB of mostly zero RAM must not travel as bytes"


def _refused(data: bytes) -> str:
    out = bytearray()
    dest = _machine(out)
    try:
        with pytest.raises(stream.StreamError) as e:
            load_stream(dest, io.BytesIO(data))
        assert "\n" not in str(e.value)
        return str(e.value)
    finally:
        destroy_machine(dest)


def test_truncated_streams_are_refused(migrated):
    data, _, _ = migrated
    for cut in [0, 5, 12, 20, len(data) // 3, len(data) - 10, len(data) - 1]:
        assert "truncated" in _refused(data[:cut]) or "checksum" in _refused(data[:cut])


def test_bit_flips_are_refused(migrated):
    data, _, _ = migrated
    rng = random.Random(20)
    for _ in range(25):
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        _refused(bytes(flipped))


def test_hostile_lengths_allocate_nothing_big(migrated):
    data, _, _ = migrated
    huge = data[:stream.HEADER.size] + stream.RECORD.pack(stream.PAGES, 0xFFFFFFFF, 0)
    assert "over its limit" in _refused(huge)
    assert "bad magic" in _refused(b"QEMU" + data[4:])
    assert "version" in _refused(stream.HEADER.pack(stream.MAGIC, 99) + data[stream.HEADER.size:])
    # a well-formed record with a page run outside RAM
    bad = b"".join(stream.pages_record([(1 << 40, 1, bytes(4096))]))
    config_end = stream.HEADER.size + stream.RECORD.size + struct.unpack_from(">I", data, stream.HEADER.size + 1)[0]
    assert "outside RAM" in _refused(data[:config_end] + bad)
    # state before all pages is fine, but pages after state or a second config are out of order
    assert "out of order" in _refused(data[:config_end] + b"".join(stream.end_record()))


def test_uris_and_announce_frames():
    assert str(parse_uri("tcp:127.0.0.1:4444")) == "tcp:127.0.0.1:4444"
    assert str(parse_uri("unix:/tmp/x")) == "unix:/tmp/x"
    for bad in ["tcp:host", "udp:1:2", "unix:", "exec:cat"]:
        with pytest.raises(MigrationError):
            parse_uri(bad)
    mac = bytes.fromhex("525400123456")
    frame = rarp_frame(mac)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03" and frame[22:28] == mac
    assert gaps_ms() == [50, 150, 250, 350]


def test_dead_destination_leaves_the_source_running(tmp_path):
    out = bytearray()
    m = _machine(out)
    thread = threading.Thread(target=m.run, daemon=True)
    thread.start()
    try:
        path = str(tmp_path / "gone.sock")
        listener = parse_uri(f"unix:{path}").listen()

        def accept_and_die() -> None:
            conn, _ = listener.accept()
            conn.recv(100)
            conn.close()
        threading.Thread(target=accept_and_die, daemon=True).start()
        job = Migration(parse_uri(f"unix:{path}"), Parameters(max_bandwidth=0))
        job.run(m, m.pause, m.resume)
        assert job.status == "failed" and job.error
        assert m.state is RunState.RUNNING and m.memory.dirty is None
        before = m.memory.read_u32(COUNTER)
        time.sleep(0.3)
        assert m.memory.read_u32(COUNTER) > before
    finally:
        m.request_stop(StopReason.USER)
        thread.join(30)
        destroy_machine(m)


def test_a_device_state_this_pyvmm_cannot_read_is_refused_before_any_loads():
    """A STATE record whose acpi_pm envelope is of an unknown version is
    refused in one line before any device or vCPU takes its state; a
    version-1 one (before the GPE0 block) is brought up to date."""
    from pyvmm.migration.state import load_state, state_doc
    src_out, dest_out = bytearray(), bytearray()
    src, dest = _machine(src_out), _machine(dest_out)
    try:
        src.devices["serial0"].write(7, 1, 0x5A)            # the scratch register: a visible difference
        doc = state_doc(src)
        assert dest.devices["serial0"].read(7, 1) != 0x5A
        bad = {**doc, "devices": {**doc["devices"], "acpi_pm": {**doc["devices"]["acpi_pm"], "version": 9}}}
        with pytest.raises(stream.StreamError) as err:
            load_state(dest, bad)
        assert dest.devices["serial0"].read(7, 1) != 0x5A
        assert str(err.value) == ("migration stream: AcpiPm state: version 9 is not supported "
                                  "(this pyvmm restores versions 1 to 2)")
        old_pm = {k: v for k, v in doc["devices"]["acpi_pm"].items() if not k.startswith("gpe")}
        load_state(dest, {**doc, "devices": {**doc["devices"], "acpi_pm": {**old_pm, "version": 1}}})
        assert dest.devices["serial0"].read(7, 1) == 0x5A and dest.devices["acpi_pm"].gpe_en == 0
    finally:
        destroy_machine(src)
        destroy_machine(dest)
