"""QMP against a real `pyvmm run`, driven by the real `qemu.qmp` client
library (QEMU's own Python client, from PyPI)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("qemu.qmp", reason="qemu.qmp comes with pyvmm's test extras (pip install -e .[test])")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402

from tests.api.qmpvm import QmpVm, free_tcp_port  # noqa: E402

EVENT_TIMEOUT = 10.0


async def _event(client: QMPClient, name: str) -> dict:
    """The next event of that name (others are skipped)."""
    while True:
        event = await asyncio.wait_for(client.events.get(), EVENT_TIMEOUT)
        if event["event"] == name:
            return event


async def _disconnect_after_exit(client: QMPClient) -> None:
    """The server closed the socket as the VM ended (QEMU does too): the
    client's reader may already have seen EOF."""
    try:
        await client.disconnect()
    except EOFError:
        pass


def _check_timestamp(event) -> None:
    ts = event["timestamp"]
    assert isinstance(ts["seconds"], int) and ts["seconds"] > 1_600_000_000
    assert 0 <= ts["microseconds"] < 1_000_000


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_stop_cont_quit_lifecycle(tmp_path, engine):
    path = str(tmp_path / "qmp.sock")
    vm = QmpVm(engine, [f"unix:{path},server"])    # wait=on: the guest starts once we connect

    async def session() -> None:
        client = QMPClient("lifecycle")
        vm.wait_for_path(path)
        await client.connect(path)      # greeting and qmp_capabilities happen in here
        assert list(client.greeting.QMP.capabilities) == []
        assert set(client.greeting.QMP.version["qemu"]) == {"major", "minor", "micro"}
        assert (await client.execute("query-status")) == {"status": "running", "running": True,
                                                          "singlestep": False}
        assert (await client.execute("query-kvm"))["enabled"] is (engine == "hw")
        cpus = await client.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0] and cpus[0]["target"] == "x86_64"

        assert (await client.execute("stop")) == {}
        _check_timestamp(await _event(client, "STOP"))
        assert (await client.execute("query-status")) == {"status": "paused", "running": False,
                                                          "singlestep": False}
        assert (await client.execute("human-monitor-command",
                                     {"command-line": "info status"})) == "VM status: paused\r\n"
        with pytest.raises(ExecuteError) as err:      # stop while paused: the state rule
            await client.execute("stop")
        assert err.value.error.error.class_ == "GenericError" and "not while paused" in err.value.error.error.desc

        assert (await client.execute("cont")) == {}
        _check_timestamp(await _event(client, "RESUME"))
        assert (await client.execute("query-status"))["running"] is True

        assert (await client.execute("quit")) == {}
        shutdown = await _event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await _disconnect_after_exit(client)

    try:
        asyncio.run(session())
        assert vm.wait() == 0, vm.stderr()
    finally:
        vm.close()


def test_errors_and_two_clients_over_unix_and_tcp(tmp_path):
    path = str(tmp_path / "qmp.sock")
    port = free_tcp_port()
    vm = QmpVm("bt", [f"unix:{path},server,wait=off", f"tcp:127.0.0.1:{port},server,wait=off"])

    async def session() -> None:
        vm.wait_for_path(path)
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(path)
        await b.connect(("127.0.0.1", port))

        with pytest.raises(ExecuteError) as err:
            await a.execute("no-such-command")
        assert err.value.error.error.class_ == "CommandNotFound"
        assert err.value.error.error.desc == "The command no-such-command has not been found"
        with pytest.raises(ExecuteError) as err:      # cont while running
            await b.execute("cont")
        assert err.value.error.error.class_ == "GenericError" and err.value.error.error.desc == "cont: not while running"
        with pytest.raises(ExecuteError) as err:
            await a.execute("query-status", {"verbose": True})
        assert err.value.error.error.desc == "Parameter 'verbose' is unexpected"
        with pytest.raises(ExecuteError) as err:
            await a.execute("human-monitor-command", {"command-line": 5})
        assert "Invalid parameter type for 'command-line'" in err.value.error.error.desc

        # One client stops the VM: both see it, in the state and as an event.
        await a.execute("stop")
        assert (await _event(a, "STOP"))["event"] == (await _event(b, "STOP"))["event"] == "STOP"
        assert (await b.execute("query-status"))["status"] == "paused"
        await b.execute("cont")
        await _event(a, "RESUME")
        assert (await a.execute("query-status"))["status"] == "running"

        await b.execute("system_powerdown")      # the guest has no ACPI: it idles on
        await _event(a, "POWERDOWN")
        assert (await a.execute("query-status"))["status"] == "running"
        assert (await a.execute("query-name")) == {}

        await b.execute("quit")
        for client in (a, b):
            assert (await _event(client, "SHUTDOWN"))["data"]["reason"] == "host-qmp-quit"
            await _disconnect_after_exit(client)

    try:
        asyncio.run(session())
        assert vm.wait() == 0, vm.stderr()
    finally:
        vm.close()


def test_system_reset_with_no_reboot_ends_the_run(tmp_path):
    path = str(tmp_path / "qmp.sock")
    vm = QmpVm("bt", [f"unix:{path},server,wait=off"])

    async def session() -> None:
        vm.wait_for_path(path)
        client = QMPClient("reset")
        await client.connect(path)
        await client.execute("system_reset")
        shutdown = await _event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        await _disconnect_after_exit(client)

    try:
        asyncio.run(session())
        assert vm.wait() == 0, vm.stderr()
    finally:
        vm.close()


def test_system_reset_reboots_and_the_socket_serves_the_new_machine(tmp_path):
    path = str(tmp_path / "qmp.sock")
    vm = QmpVm("bt", [f"unix:{path},server,wait=off"], reboot=True)

    async def session() -> None:
        vm.wait_for_path(path)
        client = QMPClient("reboot")
        await client.connect(path)
        await client.execute("stop")
        await client.execute("system_reset")      # allowed while paused, as in QEMU
        reset = await _event(client, "RESET")
        assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert (await client.execute("query-status"))["status"] == "running"   # the rebuilt machine
        await client.execute("stop")
        assert (await client.execute("query-status"))["status"] == "paused"
        await client.execute("quit")
        await _event(client, "SHUTDOWN")
        await _disconnect_after_exit(client)

    try:
        asyncio.run(session())
        assert vm.wait() == 0, vm.stderr()
    finally:
        vm.close()
