"""What a destination says about itself, as QEMU's does: query-status
"inmigrate" (and HMP `info status` "paused (inmigrate)") while it waits
for the source, whether started with `--incoming defer` or `--incoming
URI`, and after a failed migration it survived; "running" once the guest
it received runs.  And migrate-incoming's exit-on-error (QEMU 9.1): false
keeps a destination whose stream was refused up, the error in
query-migrate and a MIGRATION "failed" event, until it is quit; true (the
default) ends it with the error in one line.

Destinations are `pyvmm run` processes of the counter guest
(tests/api/counterguest.py), driven by the real qemu.qmp library where the
migrate-incoming tests do, and by pyvmm's own client elsewhere."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pyvmm.api.client import QmpClient
from pyvmm.migration import stream

from tests.api.counterguest import counts
from tests.hostfacts import require_from_setup
from tests.migration.test_incoming_defer import _deferred_destination, _drain_events_and_quit
from tests.migration.test_live import _wait_done, vms  # noqa: F401  (fixture)

WAITING = {"status": "inmigrate", "running": False, "singlestep": False}
WAITING_HMP = "VM status: paused (inmigrate)\r\n"


def _send_oversized_record(path: str) -> bytes:
    """Connects to a destination listening at unix `path` and sends a
    stream whose first record claims 1 GiB; returns its answer line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(stream.header() + stream.RECORD.pack(stream.CONFIG, 1 << 30, 0))
        return s.makefile("rb").readline()


def _qmp(path: str) -> QmpClient:
    """pyvmm's client, with a short wait: a destination that does not
    answer QMP while it waits for the source fails here, not after 30 s."""
    return QmpClient(path, timeout=10.0)


def test_exit_on_error_false_keeps_the_destination_up_until_quit(vms, tmp_path):
    require_from_setup(modules=["qemu.qmp"], package="the .[test] extras")
    from qemu.qmp import ExecuteError, QMPClient

    dst, dsock = _deferred_destination(vms, tmp_path)
    path = str(tmp_path / "junk.sock")
    events: list[dict] = []

    async def session() -> None:
        client = QMPClient("dst")
        await client.connect(dsock)

        async def hmp_status() -> str:
            return await client.execute("human-monitor-command", {"command-line": "info status"})

        assert await client.execute("query-status") == WAITING
        assert await hmp_status() == WAITING_HMP
        with pytest.raises(ExecuteError) as bad:
            await client.execute("migrate-incoming", {"uri": f"unix:{path}", "exit-on-error": "no"})
        assert bad.value.error_class == "GenericError"
        assert str(bad.value) == "Invalid parameter type for 'exit-on-error', expected: boolean"
        assert await client.execute("query-migrate") == {}, "a refused command starts nothing"

        assert await client.execute("migrate-incoming", {"uri": f"unix:{path}", "exit-on-error": False}) == {}
        dst.wait_stderr(b"waiting for an incoming migration")
        answer = await asyncio.get_running_loop().run_in_executor(None, _send_oversized_record, path)
        assert answer.startswith(b"ERR "), answer
        deadline = time.monotonic() + 30
        while (info := await client.execute("query-migrate"))["status"] != "failed":
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.05)
        assert "over its limit" in info["error-desc"] and "\n" not in info["error-desc"], info
        await asyncio.sleep(0.5)                      # were it going to exit, it would have by now
        assert dst.proc.poll() is None, bytes(dst.err)
        assert await client.execute("query-status") == WAITING
        assert await hmp_status() == WAITING_HMP
        with pytest.raises(ExecuteError, match="The incoming migration has already been started"):
            await client.execute("migrate-incoming", {"uri": f"unix:{path}.2"})     # QEMU: once only
        events.extend(await _drain_events_and_quit(client))

    asyncio.run(asyncio.wait_for(session(), 120))
    assert [e["data"]["status"] for e in events if e["event"] == "MIGRATION"] == ["setup", "active", "failed"]
    assert dst.proc.wait(30) == 0
    assert counts(dst.out) == [], "a half-loaded guest must never run"
    assert b"Traceback" not in dst.err


def test_incoming_uri_answers_inmigrate_and_exits_on_error(vms, tmp_path):
    """`--incoming URI` with a QMP socket answers while it waits; a refused
    stream ends it (exit 1, one line), QEMU's command-line behaviour."""
    dsock, path = str(tmp_path / "dst.qmp"), str(tmp_path / "mig.sock")
    dst = vms(False, "--incoming", f"unix:{path}", "--qmp", f"unix:{dsock},server,wait=off")
    dst.wait_stderr(b"waiting for an incoming migration")
    dq = _qmp(dsock)
    assert dq.execute("query-status") == WAITING
    assert dq.execute("human-monitor-command", {"command-line": "info status"}) == WAITING_HMP
    assert dq.execute("query-migrate") == {"status": "setup"}
    assert _send_oversized_record(path).startswith(b"ERR ")
    assert dst.proc.wait(30) == 1
    err = bytes(dst.err).strip().splitlines()
    assert err[-1].startswith(b"pyvmm: error: ") and b"over its limit" in err[-1], err
    assert b"Traceback" not in dst.err and counts(dst.out) == []
    dq.close()


def test_a_finished_incoming_migration_says_running(vms, tmp_path):
    """The source's guest, received by a `--incoming URI` destination,
    runs there: query-status and `info status` say running."""
    ssock, dsock = str(tmp_path / "src.qmp"), str(tmp_path / "dst.qmp")
    src = vms(False, "--qmp", f"unix:{ssock},server,wait=off")
    src.wait_counts(3)
    uri = f"unix:{tmp_path}/mig.sock"
    dst = vms(False, "--incoming", uri, "--qmp", f"unix:{dsock},server,wait=off")
    dst.wait_stderr(b"waiting for an incoming migration")
    sq, dq = QmpClient(ssock), _qmp(dsock)
    assert dq.execute("human-monitor-command", {"command-line": "info status"}) == WAITING_HMP
    sq.execute("migrate", {"uri": uri})
    assert _wait_done(sq)["status"] == "completed"
    assert sq.execute("human-monitor-command", {"command-line": "info status"}) == \
        "VM status: paused (postmigrate)\r\n"
    dst.wait_counts(3)
    assert dq.execute("query-status") == {"status": "running", "running": True, "singlestep": False}
    assert dq.execute("human-monitor-command", {"command-line": "info status"}) == "VM status: running\r\n"
    assert dq.execute("query-migrate") == {"status": "completed"}
    # "setup" came before this client connected (QEMU's -incoming URI sets up at start too)
    assert [e["data"]["status"] for e in dq.events if e["event"] == "MIGRATION"] == ["active", "completed"]
    for q in (sq, dq):
        q.execute("quit")
        q.close()
    assert src.proc.wait(30) == 0 and dst.proc.wait(30) == 0


def test_a_qmp_destination_names_the_backends_the_stream_plugged_back(vms, tmp_path):
    """A disk hotplugged on the source comes back on a `--incoming URI`
    destination whose QMP answered while it waited: the received hd1 is
    known there by its node name, so device_del and blockdev-del work."""
    from pyvmm.storage.create import create_image
    extra = str(tmp_path / "extra.qcow2")
    create_image(extra, "qcow2", 1 << 20)
    ssock, dsock = str(tmp_path / "src.qmp"), str(tmp_path / "dst.qmp")
    src = vms(False, "--virtio-rng", "--qmp", f"unix:{ssock},server,wait=off")     # a PCI bus to plug into
    src.wait_counts(3)
    sq = QmpClient(ssock)
    sq.execute("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": extra})
    sq.execute("device_add", {"driver": "virtio-blk-pci", "drive": "n1", "id": "hd1"})
    uri = f"unix:{tmp_path}/mig.sock"
    dst = vms(False, "--virtio-rng", "--incoming", uri, "--qmp", f"unix:{dsock},server,wait=off")
    dst.wait_stderr(b"waiting for an incoming migration")
    dq = _qmp(dsock)
    sq.execute("migrate", {"uri": uri})
    assert _wait_done(sq)["status"] == "completed"
    dst.wait_counts(3)
    assert [b["device"] for b in dq.execute("query-block")] == ["hd1"]
    assert dq.execute("device_del", {"id": "hd1"}) == {}         # the counter guest has no ACPI: at once
    deadline = time.monotonic() + 10
    while not any(e["event"] == "DEVICE_DELETED" for e in dq.events):
        assert time.monotonic() < deadline, dq.events
        dq.execute("query-status")
    assert dq.execute("blockdev-del", {"node-name": "n1"}) == {}
    for q in (sq, dq):
        q.execute("quit")
        q.close()
    assert src.proc.wait(30) == 0 and dst.proc.wait(30) == 0
