"""QMP's wire rules with a hand-written client: what a misbehaving client
sends (garbage, huge or partial JSON, a disconnect mid-command) gets an
error reply or a closed connection, and the VM runs on. Also the pieces
without a VM: framing, --qmp parsing, the config field."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from pyvmm.api.endpoint import Endpoint, parse_endpoint
from pyvmm.api.framing import MAX_MESSAGE, JsonSplitter
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError
from tests.api.qmpvm import QmpVm, raw_connect


class LineClient:
    """Raw bytes out, CRLF-terminated JSON messages in."""

    def __init__(self, path: str):
        self.sock = raw_connect(path)
        self.file = self.sock.makefile("rb")

    def recv(self) -> dict:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, data: bytes) -> dict:
        """Sends data, returns the next reply, skipping events."""
        self.send(data)
        while True:
            message = self.recv()
            if "event" not in message:
                return message

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _error(reply: dict) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


@pytest.fixture
def vm_path(tmp_path):
    path = str(tmp_path / "qmp.sock")
    vm = QmpVm("bt", [f"unix:{path},server,wait=off"])
    try:
        vm.wait_for_path(path)
        yield vm, path
    finally:
        vm.close()


def test_negotiation_ids_and_malformed_input(vm_path):
    vm, path = vm_path
    c = LineClient(path)
    greeting = c.recv()
    assert greeting["QMP"]["capabilities"] == [] and "qemu" in greeting["QMP"]["version"]
    assert _error(c.reply(b'{"execute": "query-status"}')) == (
        "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    assert _error(c.reply(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')) == (
        "GenericError", "Capability 'oob' not available")
    assert c.reply(b'{"execute": "qmp_capabilities", "id": "neg"}') == {"return": {}, "id": "neg"}
    assert _error(c.reply(b'{"execute": "qmp_capabilities"}'))[0] == "CommandNotFound"

    # Any JSON value is echoed as the id, on errors too; no newline is needed between messages.
    c.send(b'{"execute": "query-status", "id": [1, {"a": "}"}]}{"execute": "nope", "id": 2}')
    first, second = c.recv(), c.recv()
    assert first["id"] == [1, {"a": "}"}] and first["return"]["status"] == "running"
    assert second["id"] == 2 and second["error"]["class"] == "CommandNotFound"

    assert _error(c.reply(b"garbage\n"))[0] == "GenericError"
    assert _error(c.reply(b'{"execute": }\n'))[1].startswith("JSON parse error")
    assert _error(c.reply(b'[1, 2]\n')) == ("GenericError", "QMP input must be a JSON object")
    assert _error(c.reply(b'{"arguments": {}}')) == ("GenericError", "QMP input lacks member 'execute'")
    assert _error(c.reply(b'{"execute": "stop", "bogus": 1}')) == (
        "GenericError", "QMP input member 'bogus' is unexpected")
    assert _error(c.reply(b'{"execute": "stop", "arguments": []}')) == (
        "GenericError", "QMP input member 'arguments' must be an object")
    assert _error(c.reply(b'{"execute": "human-monitor-command"}')) == (
        "GenericError", "Parameter 'command-line' is missing")
    # A huge message: one error, then the connection goes on.
    huge = b'{"execute": "query-status", "arguments": {"x": "' + b"A" * (MAX_MESSAGE + 10) + b'"}}\n'
    assert "longer than" in _error(c.reply(huge))[1]
    assert _error(c.reply(b"[" * 10_000 + b"\n"))[1].startswith("JSON nesting deeper")
    assert c.reply(b'{"execute": "query-status"}')["return"]["running"] is True
    hmp = c.reply(b'{"execute": "human-monitor-command", "arguments": {"command-line": "info  tlbx"}}')
    assert hmp["return"].startswith("unknown command: 'info tlbx'")
    hmp = c.reply(b'{"execute": "human-monitor-command", "arguments": {"command-line": "info  registers"}}')
    assert hmp["return"].startswith("EAX=")          # extra spaces are one, as in QEMU's monitor
    c.close()

    # A client that leaves half a message, and one that leaves mid-command.
    partial = LineClient(path)
    partial.recv()
    partial.send(b'{"execute": "qmp_capabilities"}{"execute": "query-st')
    partial.close()
    leaver = LineClient(path)
    leaver.recv()
    leaver.send(b'{"execute": "qmp_capabilities"}{"execute": "stop"}{"execute": "cont"}')
    leaver.close()

    c = LineClient(path)
    c.recv()
    c.reply(b'{"execute": "qmp_capabilities"}')
    deadline = time.monotonic() + 10
    while c.reply(b'{"execute": "query-status"}')["return"]["status"] != "running":
        assert time.monotonic() < deadline, "the VM did not run on after a client left mid-command"
        time.sleep(0.05)
    assert vm.proc.poll() is None
    assert c.reply(b'{"execute": "quit"}') == {"return": {}}
    c.close()
    assert vm.wait() == 0


def test_flooding_client_is_served_in_order(vm_path):
    vm, path = vm_path
    c = LineClient(path)
    c.recv()
    c.reply(b'{"execute": "qmp_capabilities"}')
    n = 500
    c.send(b"".join(b'{"execute": "query-name", "id": %d}' % i for i in range(n)))
    assert [c.recv()["id"] for _ in range(n)] == list(range(n))
    c.send(b'{"execute": "quit"}')
    assert c.recv() == {"return": {}}          # QEMU's order: the reply, then the event
    shutdown = c.recv()
    assert shutdown["event"] == "SHUTDOWN" and shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert c.file.readline() == b""             # and the connection closes
    c.close()
    assert vm.wait() == 0


def test_splitter_cuts_at_the_closing_brace_outside_strings():
    s = JsonSplitter()
    assert s.feed(b'  {"a": "x}\\"{"') == []
    assert s.feed(b'}{"b": [1,') == ['{"a": "x}\\"{"}']
    out = s.feed(b' 2]}\r\nzz\n{}')
    assert out[0] == '{"b": [1, 2]}' and isinstance(out[1], ValueError) and out[2] == "{}"


@pytest.mark.parametrize("text,endpoint", [
    ("unix:/tmp/q.sock,server", Endpoint("unix", "/tmp/q.sock", 0, True)),
    ("unix:/tmp/q.sock,server=on,wait=off", Endpoint("unix", "/tmp/q.sock", 0, False)),
    ("tcp:127.0.0.1:4444,server,wait=off", Endpoint("tcp", "127.0.0.1", 4444, False)),
    ("tcp:[::1]:4444,server", Endpoint("tcp", "::1", 4444, True)),
])
def test_parse_endpoint(text, endpoint):
    assert parse_endpoint(text) == endpoint


@pytest.mark.parametrize("text,message", [
    ("unix:/tmp/q.sock", "only server sockets"),
    ("tcp:127.0.0.1,server", "bad --qmp"),
    ("tcp:127.0.0.1:99999,server", "bad --qmp"),
    ("stdio,server", "bad --qmp"),
    ("unix:/tmp/q,server,nowait=1", "bad --qmp"),
])
def test_bad_endpoints_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_endpoint(text)


def test_config_round_trip_and_validation():
    cfg = VmConfig(kernel="/k", engine="bt", qmp=["unix:/tmp/a,server,wait=off", "tcp:127.0.0.1:1,server"])
    assert VmConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="bad --qmp"):
        VmConfig.from_dict({"qmp": ["nonsense"]})


def test_listen_refusal_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--qmp tcp:127.0.0.1:{port}"):
            Endpoint("tcp", "127.0.0.1", port).listen()


def test_qmp_beside_config_file_and_bad_spec_on_the_command_line(tmp_path):
    from tests.api.qmpvm import REPO, idle_kernel
    import subprocess
    import sys
    vm_json = tmp_path / "vm.json"
    vm_json.write_text(json.dumps({"kernel": str(idle_kernel()), "engine": "bt", "mem_mib": 32,
                                   "no_reboot": True, "block_store": None}))
    bad = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--config", str(vm_json), "--qmp", "tcp:x,server"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "pyvmm: error: bad --qmp 'tcp:x,server' (expected unix:PATH,server[,wait=off] or tcp:HOST:PORT,server)"]
    path = str(tmp_path / "q.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--config", str(vm_json),
                             "--qmp", f"unix:{path},server,wait=off"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        c = LineClient(path)
        c.recv()
        c.reply(b'{"execute": "qmp_capabilities"}')
        assert c.reply(b'{"execute": "quit"}') == {"return": {}}
        c.close()
        assert proc.wait(30) == 0
        assert not os.path.exists(path)     # the socket file goes with the VM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_client_that_floods_and_never_reads_cannot_stall_the_others(vm_path):
    """One client sends commands without ever reading a reply; the server
    stops reading it (backpressure) and drops it once its unread replies
    pass the cap, while another client is answered promptly throughout."""
    import socket
    import threading
    vm, path = vm_path
    flooder = raw_connect(path)
    flooder.settimeout(0.2)
    sent = [0]
    stop = threading.Event()
    command = b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-version"}' * 64

    def flood() -> None:
        while not stop.is_set():
            try:
                sent[0] += flooder.send(command)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return                                     # dropped by the server
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    c = LineClient(path)
    c.recv()
    c.reply(b'{"execute": "qmp_capabilities"}')
    worst = 0.0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        start = time.monotonic()
        assert c.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.02)
    stop.set()
    t.join(5)
    flooder.close()
    assert sent[0] > 100_000, sent[0]                     # it did flood
    assert worst < 2.0, worst
    assert vm.proc.poll() is None
    assert c.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"
    c.close()


def test_clients_that_leave_during_snapshots_and_big_replies_harm_nothing(vm_path, tmp_path):
    """One client asks for a snapshot file save and a load and leaves before
    either reply; another asks for large memory dumps and leaves while they
    are written to it. The save is whole (it loads, checksums verified),
    the VM runs, and the next client is served."""
    vm, path = vm_path
    snap = str(tmp_path / "left.snap")
    leaver = LineClient(path)
    leaver.recv()
    leaver.send(b'{"execute": "qmp_capabilities"}'
                b'{"execute": "x-snapshot-file-save", "arguments": {"path": "%s"}}'
                b'{"execute": "x-snapshot-file-load", "arguments": {"path": "%s"}}' % (snap.encode(), snap.encode()))
    leaver.close()
    dumper = LineClient(path)
    dumper.recv()
    dumper.send(b'{"execute": "qmp_capabilities"}'
                + b'{"execute": "human-monitor-command", "arguments": {"command-line": "x/4096x 0x100000"}}' * 50)
    dumper.sock.recv(100)                     # the replies have started
    dumper.close()

    c = LineClient(path)
    c.recv()
    c.reply(b'{"execute": "qmp_capabilities"}')
    deadline = time.monotonic() + 15
    while not os.path.exists(snap) or c.reply(b'{"execute": "query-status"}')["return"]["status"] != "running":
        assert time.monotonic() < deadline, "the VM did not run on after its clients left"
        time.sleep(0.05)
    loaded = c.reply(b'{"execute": "x-snapshot-file-load", "arguments": {"path": "%s", "verify": true}}'
                     % snap.encode())
    assert "load-ms" in loaded["return"], loaded
    assert c.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"
    assert vm.proc.poll() is None
    assert c.reply(b'{"execute": "quit"}') == {"return": {}}
    c.close()
    assert vm.wait() == 0
