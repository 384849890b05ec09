"""A VM's side of the switch without a guest: `--net switch=NAME` and the
QEMU `-netdev stream` client spelling parse to the same backend, the
first VM's connect starts `pyvmm switch run NAME` as a detached process
(one, even when VMs start together), frames cross both ways through the
StreamPort read on an EventLoop, the NIC's default MAC is stable per VM
and differs between VMs, and `pyvmm switch stop NAME` ends the switch."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvmm.config import NetConfig, VmConfig, parse_net, parse_qemu_nets
from pyvmm.errors import ConfigError
from pyvmm.loop import EventLoop
from pyvmm.net.framing import LENGTH
from pyvmm.net.port import NetError
from pyvmm.net.switch_client import StreamPort, connect_switch
from pyvmm.net.switchd import SwitchError, query_status
from tests.net.switch_helpers import BROADCAST, Client, eth, mac


@pytest.fixture
def rundir(monkeypatch):
    d = Path(tempfile.mkdtemp(prefix="pvsc", dir="/tmp"))
    monkeypatch.setenv("PYVMM_SWITCH_DIR", str(d))
    yield d
    for name in {p.name.split(".")[0] for p in d.glob("*.ctl")}:
        try:
            query_status(name, d, request=b"stop")
        except SwitchError:
            pass
    time.sleep(0.2)
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_the_switch_and_stream_spellings_parse_to_one_backend_each():
    assert parse_net("switch=lab,mac=52:54:00:aa:bb:cc,id=n1") == NetConfig(switch="lab", mac="52:54:00:aa:bb:cc",
                                                                            id="n1")
    [net] = parse_qemu_nets(["stream,id=n0,server=off,addr.type=unix,addr.path=/run/pyvmm/lab.sock"],
                            ["virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02"])
    assert (net.stream, net.mac, net.tap, net.switch) == ("/run/pyvmm/lab.sock", "52:54:00:00:00:02", None, None)
    for bad in ("switch=no/slash", "tap=t0,switch=lab", "switch=lab,vlan=3"):
        with pytest.raises(ConfigError):
            parse_net(bad)
    with pytest.raises(ConfigError):
        parse_qemu_nets(["stream,id=n0,server=on,addr.type=unix,addr.path=/x"], ["virtio-net-pci,netdev=n0"])
    # a JSON config round-trips the new backends
    cfg = VmConfig(nets=[NetConfig(switch="lab")])
    assert VmConfig.from_dict(cfg.to_dict()).nets == [NetConfig(switch="lab")]


def test_default_macs_are_stable_per_vm_and_distinct_between_vms(rundir):
    from pyvmm.devices.virtio.install import _vm_mac
    def machine(cmdline: str):
        return SimpleNamespace(config=VmConfig(kernel="/boot/vmlinuz", cmdline=cmdline))
    net = NetConfig(switch="nosuch")
    a, a_again, b = _vm_mac(machine("x"), net, 0), _vm_mac(machine("x"), net, 0), _vm_mac(machine("y"), net, 0)
    second_nic = _vm_mac(machine("x"), net, 1)
    assert a == a_again and len({a, b, second_nic}) == 3
    assert all(m[:3] == b"\x52\x54\x00" and not m[0] & 1 for m in (a, b, second_nic))


def test_first_vm_starts_one_detached_switch_and_frames_cross_both_ways(rundir):
    with pytest.raises(NetError, match="not running"):
        connect_switch("lab", start=False)
    socks: list = []
    threads = [threading.Thread(target=lambda: socks.append(connect_switch("lab"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(socks) == 3
    st = query_status("lab", rundir)
    pid = st["pid"]
    assert os.getpgid(pid) == pid and os.getpgid(pid) != os.getpgid(0)   # its own session: outlives the VM
    assert len(list(rundir.glob("lab.ctl"))) == 1

    loop = EventLoop()
    loop.start()
    got: list[bytes] = []
    port = StreamPort(socks[0], loop, "switch=lab")
    port.on_receive(got.append)
    for s in socks[1:]:
        s.close()
    peer = Client(rundir / "lab.sock")
    try:
        vm_mac, peer_mac = mac(1), mac(2)
        end = time.monotonic() + 10
        while len(query_status("lab", rundir)["ports"]) != 2:
            assert time.monotonic() < end
            time.sleep(0.02)
        frames = [eth(BROADCAST, vm_mac, bytes([i]) * 100) for i in range(50)] + [eth(peer_mac, vm_mac, b"x" * 1400)]
        for f in frames:
            port.send(f)
        received = [peer.recv() for _ in frames]
        assert received == frames
        peer.send(eth(vm_mac, peer_mac, b"reply"))
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            time.sleep(0.01)
        assert got == [eth(vm_mac, peer_mac, b"reply")]
        assert port.tx_frames == len(frames) and port.rx_frames == 1 and port.tx_dropped == 0
    finally:
        port.close()
        peer.close()
        loop.close()

    stop = subprocess.run([sys.executable, "-m", "pyvmm", "switch", "stop", "lab"], capture_output=True, text=True,
                          check=False, timeout=30, env=dict(os.environ))
    assert stop.returncode == 0, stop.stderr
    end = time.monotonic() + 10
    while (rundir / "lab.ctl").exists():
        assert time.monotonic() < end, "the switch did not stop"
        time.sleep(0.05)
    with pytest.raises(SwitchError):
        query_status("lab", rundir)


def test_a_switch_that_goes_away_disconnects_the_nic_without_raising(rundir):
    sock = connect_switch("gone")
    loop = EventLoop()
    loop.start()
    port = StreamPort(sock, loop, "switch=gone")
    port.on_receive(lambda f: None)
    try:
        query_status("gone", rundir, request=b"stop")
        end = time.monotonic() + 10
        while port.connected:
            assert time.monotonic() < end, "the NIC did not notice the switch leaving"
            time.sleep(0.02)
        port.send(eth(BROADCAST, mac(1)))
        assert port.tx_dropped == 1
    finally:
        port.close()
        loop.close()


def test_a_vcpu_sending_while_the_loop_retries_a_full_socket_never_raises():
    """send() runs on a vCPU thread and the queued tail's retry on the event
    loop; with the peer reading slowly both touch the queue at once (found
    as a BufferError that killed a Linux guest's vCPU: the queue cannot grow
    while sock.send has it exported).  Every frame sent arrives, in order."""
    import socket as socketlib
    ours, peer = socketlib.socketpair()
    peer.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
    port = StreamPort(ours, loop=None, label="race")
    errors: list[BaseException] = []
    done = threading.Event()

    def retry_forever() -> None:          # what the loop's call_later does, as often as it can
        while not done.is_set():
            try:
                port._on_retry()
            except BaseException as e:    # noqa: BLE001  (the failure under test)
                errors.append(e)
                return

    got = bytearray()

    def read_slowly() -> None:
        while not done.is_set() or len(got) < expected:
            peer.settimeout(2)
            try:
                chunk = peer.recv(512)
            except OSError:
                return
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.0005)

    frames = [bytes([i % 251]) * (60 + i % 1400) for i in range(3000)]
    expected = sum(LENGTH.size + len(f) for f in frames)
    threads = [threading.Thread(target=retry_forever), threading.Thread(target=read_slowly)]
    for t in threads:
        t.start()
    try:
        for f in frames:
            while len(port.out) > 256 << 10:      # keep under OUT_LIMIT: nothing dropped
                time.sleep(0.0005)
            port.send(f)
            if errors:
                break
        deadline = time.monotonic() + 30
        while port.out and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        for t in threads:
            t.join(30)
        ours.close()
        peer.close()
    assert not errors, repr(errors[0])
    assert port.tx_dropped == 0
    assert len(got) == expected
