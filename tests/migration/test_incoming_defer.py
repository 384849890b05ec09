"""`pyvmm run --incoming defer` and QMP migrate-incoming, between two
`pyvmm run` processes running the counter guest (tests/api/counterguest.py):
the destination answers QMP as "inmigrate" without running anything until
migrate-incoming names a URI (or QEMU's channels), then receives the guest,
which counts on from where the source stopped. Also QEMU's refusals: no
--incoming, a second start, a bad URI; quit while it waits; and a corrupt
stream (exit 1, one line, MIGRATION failed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from pyvmm.api.client import QmpClient, QmpError

from tests.api.counterguest import counts
from tests.api.qmpvm import REPO, free_tcp_port
from tests.migration.test_live import _refuses_an_oversized_record, _wait_done, kernel, vms  # noqa: F401  (fixture)


def _wait_status(qmp: QmpClient, status: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := qmp.execute("query-status")["status"]) != status:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)


async def _drain_events_and_quit(client) -> list[dict]:
    """The events a qemu.qmp client holds, then quit, the destination
    closing the connection as it exits."""
    events = []
    while not client.events.empty():
        events.append(await client.events.get())
    await client.execute("quit")
    try:
        await client.disconnect()
    except EOFError:
        pass
    return events


def _deferred_destination(vms, tmp_path) -> tuple[object, str]:
    """A `--incoming defer` destination waiting for migrate-incoming, and its QMP socket."""
    dsock = str(tmp_path / "dst.qmp")
    dst = vms(False, "--incoming", "defer", "--qmp", f"unix:{dsock},server,wait=off")
    dst.wait_stderr(b"waiting for migrate-incoming")
    return dst, dsock


def _source(vms, tmp_path) -> tuple[object, QmpClient]:
    qsock = str(tmp_path / "src.qmp")
    src = vms(False, "--qmp", f"unix:{qsock},server,wait=off")
    src.wait_counts(3)
    return src, QmpClient(qsock)


def _migrate_and_check(src, sq: QmpClient, dst, uri: str) -> None:
    """Migrates src to dst over `uri`; the two outputs together count 1, 2, 3..."""
    sq.execute("migrate", {"uri": uri})
    info = _wait_done(sq)
    assert info["status"] == "completed", info
    dst.wait_counts(3)
    joined = counts(bytes(src.out) + bytes(dst.out))
    assert joined == list(range(1, len(joined) + 1)), joined
    assert len(joined) > counts(src.out)[-1] + 2
    sq.execute("quit")
    assert src.proc.wait(30) == 0


def test_defer_waits_inmigrate_until_migrate_incoming(vms, tmp_path):
    src, sq = _source(vms, tmp_path)
    with pytest.raises(QmpError, match="'-incoming' was not specified on the command line"):
        sq.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/never.sock"})
    dst, dsock = _deferred_destination(vms, tmp_path)
    dq = QmpClient(dsock)
    t = time.monotonic()
    assert dq.execute("query-status") == {"status": "inmigrate", "running": False, "singlestep": False}
    assert time.monotonic() - t < 5, "a waiting destination answers at once (not held as before a run)"
    assert dq.execute("query-migrate") == {}
    # bad arguments: one-line errors, and nothing started
    with pytest.raises(QmpError, match=r"^migrate-incoming: .*bad migration URI 'exec:cat'") as bad:
        dq.execute("migrate-incoming", {"uri": "exec:cat"})
    assert "\n" not in str(bad.value)
    with pytest.raises(QmpError, match="exactly one of 'uri' and 'channels'"):
        dq.execute("migrate-incoming", {})
    with pytest.raises(QmpError, match="channel-type 'main'"):
        dq.execute("migrate-incoming", {"channels": [{"channel-type": "other"}]})
    assert dq.execute("query-migrate") == {} and dq.execute("query-status")["status"] == "inmigrate"
    assert b"waiting for an incoming migration" not in dst.err
    assert counts(dst.out) == [], "nothing may run before the guest arrives"

    uri = f"unix:{tmp_path}/mig.sock"
    assert dq.execute("migrate-incoming", {"uri": uri}) == {}
    assert dq.execute("query-migrate") == {"status": "setup"}
    dst.wait_stderr(b"waiting for an incoming migration on " + uri.encode())
    with pytest.raises(QmpError, match="The incoming migration has already been started"):
        dq.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/other.sock"})
    assert dq.execute("query-status")["status"] == "inmigrate"

    _migrate_and_check(src, sq, dst, uri)
    _wait_status(dq, "running")
    assert dq.execute("query-migrate") == {"status": "completed"}
    statuses = [e["data"]["status"] for e in dq.events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"], statuses
    with pytest.raises(QmpError, match="already been started"):
        dq.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/again.sock"})
    dq.execute("quit")
    assert dst.proc.wait(30) == 0
    dq.close()
    sq.close()


def test_defer_with_qemu_qmp_client_and_channels(vms, tmp_path):
    """The real qemu.qmp library drives the destination, with the
    `channels` spelling of the address (QEMU 8.2 and later)."""
    pytest.importorskip("qemu.qmp", reason="qemu.qmp comes with pyvmm's test extras (pip install -e .[test])")
    from qemu.qmp import ExecuteError, QMPClient

    src, sq = _source(vms, tmp_path)
    dst, dsock = _deferred_destination(vms, tmp_path)
    port = free_tcp_port()
    events: list[dict] = []

    async def session() -> None:
        client = QMPClient("dst")
        await client.connect(dsock)
        assert (await client.execute("query-status"))["status"] == "inmigrate"
        channels = [{"channel-type": "main",
                     "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": str(port)}}]
        with pytest.raises(ExecuteError, match="exactly one of"):
            await client.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}", "channels": channels})
        assert (await client.execute("migrate-incoming", {"channels": channels})) == {}
        await asyncio.get_running_loop().run_in_executor(None, _migrate_and_check, src, sq, dst,
                                                         f"tcp:127.0.0.1:{port}")
        while (await client.execute("query-status"))["status"] != "running":
            await asyncio.sleep(0.05)
        events.extend(await _drain_events_and_quit(client))

    asyncio.run(asyncio.wait_for(session(), 300))
    assert [e["data"]["status"] for e in events if e["event"] == "MIGRATION"] == ["setup", "active", "completed"]
    assert dst.proc.wait(30) == 0
    sq.close()


def test_incoming_uri_refuses_migrate_incoming(vms, tmp_path):
    src, sq = _source(vms, tmp_path)
    dsock = str(tmp_path / "dst.qmp")
    uri = f"unix:{tmp_path}/mig.sock"
    dst = vms(False, "--incoming", uri, "--qmp", f"unix:{dsock},server,wait=off")
    dst.wait_stderr(b"waiting for an incoming migration")
    _migrate_and_check(src, sq, dst, uri)
    dq = QmpClient(dsock)
    with pytest.raises(QmpError, match="The incoming migration has already been started"):
        dq.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/again.sock"})
    assert dq.execute("query-migrate") == {"status": "completed"}
    dq.close()
    sq.close()


def test_quit_while_waiting_and_defer_without_qmp(vms, tmp_path):
    dst, dsock = _deferred_destination(vms, tmp_path)
    dq = QmpClient(dsock)
    dq.execute("quit")
    assert dst.proc.wait(30) == 0
    assert counts(dst.out) == [] and b"Traceback" not in dst.err
    dq.close()
    run = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel(False)), "--engine", "bt",
                          "--mem", "32M", "--incoming", "defer"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr
    assert "--incoming defer needs a --qmp socket" in run.stderr


@pytest.mark.parametrize("exit_on_error", [{}, {"exit-on-error": True}], ids=["default", "exit-on-error"])
def test_defer_refuses_a_corrupt_stream_in_one_line(vms, tmp_path, exit_on_error):
    dst, dsock = _deferred_destination(vms, tmp_path)
    dq = QmpClient(dsock)
    path = str(tmp_path / "junk.sock")
    dq.execute("migrate-incoming", {"uri": f"unix:{path}", **exit_on_error})
    _refuses_an_oversized_record(dst, path)
    err = bytes(dst.err).strip().splitlines()
    assert err[-1].startswith(b"pyvmm: error: ") and b"over its limit" in err[-1], err
    assert b"Traceback" not in dst.err and counts(dst.out) == []
    statuses = [e["data"]["status"] for e in dq.events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "failed"], statuses
    dq.close()
