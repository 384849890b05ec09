"""`rep ins/outs` looped once, in the Bus: read_many/write_many give a device
exactly the accesses a loop of read()/write() would, and the bt engine's
string instructions (run through the translator) go through them with
registers and memory as the element-by-element path leaves them."""

from __future__ import annotations

import pytest

from pyvmm.bus import Bus
from pyvmm.cpu import GPR_NAMES
from tests.bt.harness import DATA_ADDR, BtOracle

PORT = 0x1F0


class Recorder:
    """A port device that logs every access and reads back a counter."""

    def __init__(self):
        self.log: list[tuple] = []
        self.n = 0

    def read(self, offset: int, size: int) -> int:
        self.n += 1
        self.log.append(("r", offset, size))
        return (self.n * 0x01030507) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def bus_with(device, serialize: bool = False) -> Bus:
    bus = Bus("io", serialize=serialize)
    bus.insert(PORT, 8, device, "rec")
    return bus


@pytest.mark.parametrize("serialize", [False, True])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_read_many_is_a_loop_of_reads(size, serialize):
    one, many = Recorder(), Recorder()
    bus_one, bus_many = bus_with(one, serialize), bus_with(many, serialize)
    expected = b"".join(bus_one.read(PORT + 1, size).to_bytes(size, "little") for _ in range(37))
    assert bus_many.read_many(PORT + 1, size, 37) == expected
    assert many.log == one.log == [("r", 1, size)] * 37
    assert bus_many.stats()["rec"]["reads"] == 37


@pytest.mark.parametrize("size", [1, 2, 4])
def test_write_many_is_a_loop_of_writes(size):
    dev = Recorder()
    data = bytes(range(size * 11))
    bus_with(dev).write_many(PORT, size, data)
    assert dev.log == [("w", 0, size, int.from_bytes(data[i:i + size], "little"))
                       for i in range(0, len(data), size)]


def test_unmapped_ports_read_all_ones_and_count():
    bus = Bus("io")
    assert bus.read_many(0x80, 2, 5) == b"\xff" * 10
    bus.write_many(0x80, 4, bytes(12))
    assert (bus.unmapped_reads, bus.unmapped_writes) == (5, 3)


def test_device_value_wider_than_the_access_is_cut():
    class Wide:
        def read(self, offset, size):
            return 0x1234

        def write(self, offset, size, value):
            pass
    assert bus_with(Wide()).read_many(PORT, 1, 3) == b"\x34" * 3


# ------------------------------------------------- the bt engine's rep ins/outs
def regs(**values: int) -> list[int]:
    return [values.get(name, 0) for name in GPR_NAMES]


REP_INSW, REP_OUTSW, REP_INSB, STD = b"\x66\xf3\x6d", b"\x66\xf3\x6f", b"\xf3\x6c", b"\xfd"


def attach(dev, calls: list):
    """setup() for BtOracle.run: the device on PORT, and each read_many/
    write_many call noted as (name, count)."""
    def setup(cpu):
        bus = cpu.io
        bus.insert(PORT, 8, dev, "rec")
        read_many, write_many = bus.read_many, bus.write_many

        def spy_read(port, size, count):
            calls.append(("read_many", count))
            return read_many(port, size, count)

        def spy_write(port, size, data):
            calls.append(("write_many", len(data) // size))
            write_many(port, size, data)
        bus.read_many, bus.write_many = spy_read, spy_write
    return setup


# in one page (one bus call), and across a page boundary (one per page)
@pytest.mark.parametrize("start, runs", [(0x10, [40]), (0xFF0, [8, 32])])
def test_bt_rep_insw_fills_memory_through_read_many(start, runs):
    dev, calls = Recorder(), []
    count = 40
    out = BtOracle().run(REP_INSW, regs(rcx=count, rdx=PORT, rdi=DATA_ADDR + start), 0x2,
                         bytes(0x1100), setup=attach(dev, calls))
    assert calls == [("read_many", n) for n in runs]
    R = dict(zip(GPR_NAMES, out.regs))
    assert (R["rcx"], R["rdi"]) == (0, DATA_ADDR + start + 2 * count)
    expected = b"".join(((n * 0x01030507) & 0xFFFF).to_bytes(2, "little") for n in range(1, count + 1))
    assert out.data[start:start + 2 * count] == expected
    assert dev.log == [("r", 0, 2)] * count


def test_bt_rep_outsw_sends_memory_in_order():
    dev, calls = Recorder(), []
    data = bytes((i * 7) & 0xFF for i in range(0x1100))
    start, count = 0xFF8, 12
    out = BtOracle().run(REP_OUTSW, regs(rcx=count, rdx=PORT, rsi=DATA_ADDR + start), 0x2,
                         data, setup=attach(dev, calls))
    assert calls == [("write_many", 4), ("write_many", 8)]
    R = dict(zip(GPR_NAMES, out.regs))
    assert (R["rcx"], R["rsi"]) == (0, DATA_ADDR + start + 2 * count)
    assert dev.log == [("w", 0, 2, int.from_bytes(data[i:i + 2], "little"))
                       for i in range(start, start + 2 * count, 2)]


def test_bt_rep_insb_backwards_takes_the_element_path():
    dev = Recorder()
    count = 5
    out = BtOracle().run(STD + REP_INSB, regs(rcx=count, rdx=PORT, rdi=DATA_ADDR + 0x20), 0x2,
                         bytes(0x40), setup=lambda cpu: cpu.io.insert(PORT, 8, dev, "rec"))
    R = dict(zip(GPR_NAMES, out.regs))
    assert (R["rcx"], R["rdi"]) == (0, DATA_ADDR + 0x20 - count)
    assert out.data[0x1C:0x21] == bytes(((n * 0x07) & 0xFF) for n in range(5, 0, -1))


# ---------------------------------------- a whole machine: KVM's rep exits, bt
def rep_guest(out_count: int, in_count: int) -> bytes:
    """32-bit: rep outsb from 0x200000, rep insw to 0x201000, hlt."""
    return (b"\xbe" + (0x200000).to_bytes(4, "little") + b"\xb9" + out_count.to_bytes(4, "little")
            + b"\x66\xba" + PORT.to_bytes(2, "little") + b"\xf3\x6e"
            + b"\xbf" + (0x201000).to_bytes(4, "little") + b"\xb9" + in_count.to_bytes(4, "little")
            + REP_INSW + b"\xf4")


@pytest.mark.parametrize("engine", ["hw", "bt"])
def test_machine_rep_outs_and_ins(engine):
    from pyvmm.boot import entry
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import VmConfig

    payload = bytes((i * 13) & 0xFF for i in range(300))

    def boot(memory):
        memory.write(0x100000, rep_guest(len(payload), 100))
        memory.write(0x200000, payload)
        return BootResult(entry.protected_mode_32(memory, 0x100000), "raw-prot")

    m = build_machine(VmConfig(mem_mib=32, irqchip=False, no_reboot=True, engine=engine),
                      lambda b: None, boot=boot)
    try:
        dev = Recorder()
        m.io_bus.insert(PORT, 8, dev, "rec")
        m.engine.run()
        assert [e[3] for e in dev.log if e[0] == "w"] == list(payload)
        assert [e for e in dev.log if e[0] == "r"] == [("r", 0, 2)] * 100
        expected = b"".join(((n * 0x01030507) & 0xFFFF).to_bytes(2, "little") for n in range(1, 101))
        assert m.memory.read(0x201000, 200) == expected
    finally:
        destroy_machine(m)
