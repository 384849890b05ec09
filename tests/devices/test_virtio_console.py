"""virtio-console driven through virtio-pci on real buses, with the
control queues and two ports laid out in a GuestMemory the way the Linux
driver does it (DEVICE_READY, PORT_READY, PORT_OPEN), fake backends for
the device model and real Unix sockets for console_ports.SocketPort and
the builder.  No guest runs."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pyvmm.devices.virtio import console as vc
from pyvmm.devices.virtio.console import CONTROL, VirtioConsole
from pyvmm.devices.virtio.console_ports import SocketPort, check_ports, parse_port
from pyvmm.devices.virtio.device import F_VERSION_1
from pyvmm.devices.virtio.queue import DESC, DESC_F_WRITE
from pyvmm.errors import ConfigError
from pyvmm.loop import EventLoop

from .virtio_driver import DRIVER_OK, FEATURES_OK, NEEDS_RESET, Driver

QSIZE = 16
NQUEUES = 6                       # port 0 rx/tx, control rx/tx, port 1 rx/tx


def rings(q: int) -> tuple[int, int, int]:
    base = 0x10000 + 0x3000 * q
    return base, base + 0x1000, base + 0x2000


class FakePort:
    def __init__(self, connected: bool = True):
        self.connected = connected
        self.written = bytearray()
        self.on_input = self.on_connect = None
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def start(self, on_input, on_connect) -> None:
        self.on_input, self.on_connect = on_input, on_connect

    def close(self) -> None:
        self.closed = True


class ConsoleDriver(Driver):
    """Driver with every queue of a two-port virtio-console."""

    def __init__(self, ports: list[FakePort], names=(None, "org.pyvmm.test")):
        super().__init__(lambda mem: VirtioConsole(mem, ports, list(names)), 0x078000)
        self.device.wake = self.fn.notify
        self.device.start()
        self.next = [0] * NQUEUES
        self.avail = [0] * NQUEUES
        self.seen = [0] * NQUEUES

    def init(self, features: int | None = None, queue_size: int = QSIZE) -> int:
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, 1 | 2)
        want = self.offered() & ~(1 << 29) if features is None else features   # no EVENT_IDX
        for sel in (0, 1):
            self.common_write(0x08, 4, sel)
            self.common_write(0x0C, 4, (want >> 32 * sel) & 0xFFFFFFFF)
        self.common_write(0x14, 1, 1 | 2 | FEATURES_OK)
        self.queue_size = queue_size
        for q in range(NQUEUES):
            self.common_write(0x16, 2, q)
            self.common_write(0x18, 2, queue_size)
            for off, addr in zip((0x20, 0x28, 0x30), rings(q)):
                self.common_write(off, 4, addr)
                self.common_write(off + 4, 4, 0)
            self.common_write(0x1C, 2, 1)
        self.common_write(0x14, 1, 1 | 2 | FEATURES_OK | DRIVER_OK)
        return self.status

    def post(self, q: int, data: bytes | int, writable: bool) -> int:
        """One single-buffer chain on queue q; returns the buffer address."""
        desc, avail, _ = rings(q)
        addr, n = self.buffer(data)
        head = self.next[q]
        self.memory.write(desc + 16 * head, DESC.pack(addr, n, DESC_F_WRITE if writable else 0, 0))
        self.next[q] = (head + 1) % self.queue_size
        self.memory.write_u16(avail + 4 + 2 * (self.avail[q] % self.queue_size), head)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        self.memory.write_u16(avail + 2, self.avail[q])
        self.kick(q)
        return addr

    def taken(self, q: int, addrs: dict[int, int]) -> list[bytes]:
        """What the device returned on queue q since the last call, by the
        buffer addresses of the heads (`addrs`: head -> address)."""
        _, _, used = rings(q)
        idx = self.memory.read_u16(used + 2)
        out = []
        while self.seen[q] != idx:
            head, n = struct.unpack("<II", self.memory.read(used + 4 + 8 * (self.seen[q] % self.queue_size), 8))
            out.append(self.memory.read(addrs[head], n))
            self.seen[q] += 1
        return out

    def send_control(self, port: int, event: int, value: int) -> None:
        self.post(3, CONTROL.pack(port, event, value), False)


def bring_up(ports=None):
    ports = ports or [FakePort(), FakePort(connected=False)]
    d = ConsoleDriver(ports)
    assert d.init() & DRIVER_OK
    heads = {}
    for _ in range(8):
        head = d.next[2]
        heads[head] = d.post(2, 64, True)
    d.send_control(0, vc.DEVICE_READY, 1)
    return d, ports, heads


def messages(d, heads):
    return [CONTROL.unpack(m[:8]) + (m[8:],) for m in d.taken(2, heads)]


def test_handshake_adds_ports_names_and_opens():
    d, ports, heads = bring_up()
    assert d.device.multiport
    assert messages(d, heads) == [(0, vc.DEVICE_ADD, 1, b""), (1, vc.DEVICE_ADD, 1, b"")]
    d.send_control(0, vc.PORT_READY, 1)
    d.send_control(1, vc.PORT_READY, 1)
    assert messages(d, heads) == [(0, vc.CONSOLE_PORT, 1, b""), (0, vc.PORT_OPEN, 1, b""),
                                  (1, vc.PORT_NAME, 1, b"org.pyvmm.test"), (1, vc.PORT_OPEN, 0, b"")]
    ports[1].connected = True
    ports[1].on_connect(True)                      # a client came: the guest hears of it
    assert messages(d, heads) == [(1, vc.PORT_OPEN, 1, b"")]
    assert d.device_config(12)[4:8] == (2).to_bytes(4, "little")   # max_nr_ports


def test_guest_output_reaches_each_ports_backend():
    d, ports, _ = bring_up()
    d.post(1, b"hello hvc0\n", False)
    d.post(5, b"to the named port", False)
    assert bytes(ports[0].written) == b"hello hvc0\n" and bytes(ports[1].written) == b"to the named port"


def test_host_input_waits_for_buffers_and_for_the_named_port_to_open():
    d, ports, _ = bring_up()
    ports[0].on_input(b"typed")
    addr = d.post(0, 16, True)                     # the buffer comes after the input
    assert d.taken(0, {0: addr}) == []             # but Linux would drop it before PORT_OPEN
    d.send_control(0, vc.PORT_OPEN, 1)
    assert d.taken(0, {0: addr}) == [b"typed"]
    ports[1].on_input(b"early")
    heads = {d.next[4]: d.post(4, 16, True)}
    assert d.taken(4, heads) == []                 # the guest has not opened port 1: held
    d.send_control(1, vc.PORT_OPEN, 1)
    assert d.taken(4, heads) == [b"early"]


def test_input_beyond_the_limit_is_dropped_and_counted():
    d, ports, _ = bring_up()
    ports[0].on_input(bytes(vc.INPUT_LIMIT + 100))
    assert d.device.dropped_in == 100 and len(d.device.pending_in[0]) == vc.INPUT_LIMIT


def test_wrong_direction_chain_needs_reset():
    d, _, _ = bring_up()
    d.post(1, 8, True)                             # a writable buffer on a transmit queue
    assert d.status & NEEDS_RESET


def test_without_multiport_only_the_console_queues_work():
    d = ConsoleDriver([FakePort(), FakePort()])
    assert d.init(features=F_VERSION_1) & DRIVER_OK
    d.post(1, b"plain", False)
    assert bytes(d.device.backends[0].written) == b"plain"
    assert not d.device.multiport


def test_state_round_trip():
    d, ports, _ = bring_up()
    ports[1].on_input(b"held")
    state = d.fn.save()
    e = ConsoleDriver([FakePort(), FakePort(connected=False)])
    e.fn.restore(state)
    assert bytes(e.device.pending_in[1]) == b"held"


@pytest.mark.parametrize("spec, parsed", [
    ("stdio", ("stdio", None, None)), ("null", ("null", None, None)),
    ("socket=/tmp/x.sock,name=org.qemu.guest_agent.0", ("socket", "/tmp/x.sock", "org.qemu.guest_agent.0")),
])
def test_port_specs(spec, parsed):
    assert parse_port(spec) == parsed


@pytest.mark.parametrize("specs", [["tty"], ["socket="], ["stdio,socket=/x"], ["stdio,name=a/b"],
                                   ["stdio", "null"], ["null,name=a", "stdio,name=a"]])
def test_bad_port_specs(specs):
    with pytest.raises(ConfigError):
        check_ports(specs)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_socket_port_serves_one_client(tmp_path):
    loop = EventLoop()
    loop.start()
    path = str(tmp_path / "port.sock")
    port = SocketPort(path, loop)
    got, ups = [], []
    port.start(got.append, ups.append)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        _wait(lambda: ups == [True])
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        second.settimeout(5)
        assert second.recv(10) == b""              # turned away
        client.sendall(b"from host")
        _wait(lambda: b"".join(got) == b"from host")
        port.write(b"from guest")
        client.settimeout(5)
        assert client.recv(100) == b"from guest"
        client.close()
        _wait(lambda: ups == [True, False])
        port.write(b"nobody")
        assert port.dropped == 6
    finally:
        port.close()
        loop.close()
    with pytest.raises(ConfigError):
        SocketPort(str(tmp_path / "no" / "such" / "dir.sock"), loop)


def test_builder_wires_socket_ports(tmp_path):
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import VmConfig
    from pyvmm.cpu import CpuState
    hvc, named = str(tmp_path / "hvc.sock"), str(tmp_path / "named.sock")
    cfg = VmConfig(engine="bt", mem_mib=32, virtio_console=[f"socket={named},name=org.test", f"socket={hvc}"])
    machine = build_machine(cfg, lambda b: None, boot=lambda memory: BootResult(cpu=CpuState(), protocol="test"))
    try:
        fn = machine.devices["virtio_console"]
        assert fn.device.names == [None, "org.test"]
        assert [p.path for p in fn.device.backends] == [hvc, named]
        assert "virtio-console-bar4" in [name for _, _, name in machine.mmio_bus.devices()]
        fn.restore(fn.save())
    finally:
        destroy_machine(machine)
    assert not (tmp_path / "hvc.sock").exists()


def test_qemu_spelling_maps_to_ports():
    from pyvmm.config import parse_qemu_console, parse_qemu_nets
    devices = ["virtio-serial-pci", "virtserialport,chardev=c1,name=org.qemu.guest_agent.0",
               "virtconsole,chardev=c0"]
    specs = parse_qemu_console(["socket,id=c1,path=/run/qga.sock,server=on,wait=off", "stdio,id=c0"], devices)
    assert specs == ["socket=/run/qga.sock,name=org.qemu.guest_agent.0", "stdio"]
    check_ports(specs)
    assert parse_qemu_nets([], devices) == []                 # none of them is a NIC
    for chardevs, devs in ((["socket,id=c,path=/x"], ["virtconsole,chardev=c"]),      # client end
                           (["pty,id=c"], ["virtconsole,chardev=c"]),
                           (["stdio,id=c"], ["virtserialport,chardev=c"]),            # no name
                           (["stdio,id=c"], ["virtconsole,chardev=d"])):
        with pytest.raises(ConfigError):
            parse_qemu_console(chardevs, devs)


def test_random_queue_contents_only_ever_give_queue_errors():
    """Hostile rings on every console queue, control messages with random
    ids and events included (test_virtio_fuzz.py's generator)."""
    import random

    from pyvmm.devices.virtio.queue import QueueError, VirtQueue
    from pyvmm.memory import GuestMemory

    from .test_virtio_fuzz import AVAIL_AT, DATA_AT, DESC_AT, RAM, SIZE, USED_AT, check_used, scribble
    r = random.Random(3)
    memory = GuestMemory(RAM)
    ports = [FakePort(), FakePort()]
    device = VirtioConsole(memory, ports, [None, "p"])
    device.acked = 1 << 1 | 1 << 32                      # MULTIPORT and VERSION_1
    queues: dict[int, VirtQueue] = {}
    device.wake = lambda index: queues.get(index) and device.process(index, queues[index])
    device.start()
    errors = 0
    for i in range(3000):
        q = r.randrange(NQUEUES)
        if q not in queues:
            queues[q] = VirtQueue(memory, SIZE, DESC_AT, AVAIL_AT, USED_AT, event_idx=r.random() < 0.5,
                                  indirect=True)
        vq = queues[q]
        scribble(r, memory, vq, i)
        if i % 16 == 0:
            memory.write(DATA_AT, b"".join(CONTROL.pack(r.randrange(4), r.randrange(9), r.randrange(3))
                                           for _ in range(64)))
            ports[r.randrange(2)].on_input(r.randbytes(r.randrange(1, 200)))
        before = vq.used_idx
        try:
            device.process(q, vq)
        except QueueError:
            errors += 1
            queues.clear()                                  # one ring layout for all: reset them all
            device.reset()
            device.acked = 1 << 1 | 1 << 32
        check_used(vq, before)
    assert errors and device.bytes_out and any(p.written for p in ports)


def test_stdio_console_port_writes_to_the_console_and_takes_the_keyboard():
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import VmConfig
    from pyvmm.cpu import CpuState
    shown = []
    cfg = VmConfig(engine="bt", mem_mib=32, virtio_console=["stdio"])
    machine = build_machine(cfg, shown.append, boot=lambda memory: BootResult(cpu=CpuState(), protocol="test"))
    try:
        device = machine.devices["virtio_console"].device
        device.backends[0].write(b"from hvc0")
        assert shown == [b"from hvc0"]
        machine.console_feed(b"keys")             # what the runner does with stdin
        assert bytes(device.pending_in[0]) == b"keys"
    finally:
        destroy_machine(machine)
