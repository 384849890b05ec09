"""fw_cfg driven through an I/O bus, as a guest would (port I/O and DMA)."""

from __future__ import annotations

import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.fw_cfg import (DMA_ERROR, DMA_READ, DMA_SELECT, DMA_SKIP, DMA_WRITE,
                                  PORT_RANGE, FwCfg)
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

BASE = 0x510
SEL, DATA, DMA_HI, DMA_LO = 0x510, 0x511, 0x514, 0x518
MIB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(16 * MIB)
    yield m
    m.close()


def make(mem=None, **kw):
    args = dict(ram_size=64 * MIB, cpus=2, cmdline="exit=5",
                files=[("opt/pyvmm/hello", b"hello world"), ("etc/empty", b"")])
    args.update(kw)
    dev = FwCfg(memory=mem, **args)
    bus = Bus("io")
    bus.insert(BASE, PORT_RANGE, dev, "fw_cfg")
    return dev, bus


def read_item(bus: Bus, key: int, n: int) -> bytes:
    bus.write(SEL, 2, key)
    return bytes(bus.read(DATA, 1) for _ in range(n))


def test_signature_id_ram_cpus(mem):
    _, bus = make(mem)
    assert read_item(bus, 0x0000, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(bus, 0x0001, 4))[0] == 3  # traditional + DMA
    assert struct.unpack("<Q", read_item(bus, 0x0003, 8))[0] == 64 * MIB
    assert struct.unpack("<H", read_item(bus, 0x0005, 2))[0] == 2
    assert struct.unpack("<H", read_item(bus, 0x000F, 2))[0] == 2


def test_id_without_dma_and_reads_past_end():
    _, bus = make(None)
    assert struct.unpack("<I", read_item(bus, 0x0001, 4))[0] == 1
    # Past the end of an item, and for unknown items, data reads give 0.
    assert read_item(bus, 0x0000, 6) == b"QEMU\0\0"
    assert read_item(bus, 0x1234, 3) == b"\0\0\0"
    # Without DMA, the DMA register reads as unmapped.
    assert bus.read(DMA_HI, 4) == 0xFFFFFFFF


def test_selecting_rewinds_and_wide_reads():
    _, bus = make(None)
    bus.write(SEL, 2, 0)
    assert bus.read(DATA, 1) == ord("Q")
    bus.write(SEL, 2, 0)
    assert bus.read(DATA, 2).to_bytes(2, "little") == b"QE"


def test_cmdline_items():
    _, bus = make(None)
    size = struct.unpack("<I", read_item(bus, 0x14, 4))[0]
    assert size == len(b"exit=5\0")
    assert read_item(bus, 0x15, size) == b"exit=5\0"


def test_kernel_and_initrd_items():
    _, bus = make(None, kernel=(0x100000, b"KERNEL"), initrd=(0x2000000, b"INITRD!"),
                  kernel_entry=0x100040)
    assert struct.unpack("<I", read_item(bus, 0x07, 4))[0] == 0x100000
    assert struct.unpack("<I", read_item(bus, 0x08, 4))[0] == 6
    assert read_item(bus, 0x11, 6) == b"KERNEL"
    assert struct.unpack("<I", read_item(bus, 0x0A, 4))[0] == 0x2000000
    assert struct.unpack("<I", read_item(bus, 0x0B, 4))[0] == 7
    assert read_item(bus, 0x12, 7) == b"INITRD!"
    assert struct.unpack("<I", read_item(bus, 0x10, 4))[0] == 0x100040


def parse_directory(raw: bytes) -> dict[str, tuple[int, int]]:
    count = struct.unpack_from(">I", raw)[0]
    out = {}
    for i in range(count):
        size, select, _res, name = struct.unpack_from(">IHH56s", raw, 4 + 64 * i)
        out[name.rstrip(b"\0").decode()] = (size, select)
    return out


def test_file_directory_and_user_file():
    _, bus = make(None)
    count = struct.unpack(">I", read_item(bus, 0x19, 4))[0]
    assert count == 2
    directory = parse_directory(read_item(bus, 0x19, 4 + 64 * count))
    assert directory == {"opt/pyvmm/hello": (11, 0x20), "etc/empty": (0, 0x21)}
    size, select = directory["opt/pyvmm/hello"]
    assert read_item(bus, select, size) == b"hello world"


def test_bad_file_names():
    with pytest.raises(ConfigError, match="longer"):
        FwCfg(1 << 26, 1, files=[("x" * 56, b"")])
    with pytest.raises(ConfigError, match="twice"):
        FwCfg(1 << 26, 1, files=[("a", b""), ("a", b"")])


def start_dma(bus: Bus, desc_addr: int) -> None:
    """As a guest does: two big-endian halves written with 32-bit OUTs."""
    bus.write(DMA_HI, 4, int.from_bytes((desc_addr >> 32).to_bytes(4, "big"), "little"))
    bus.write(DMA_LO, 4, int.from_bytes((desc_addr & 0xFFFFFFFF).to_bytes(4, "big"), "little"))


def test_dma_signature_register(mem):
    _, bus = make(mem)
    raw = bus.read(DMA_HI, 4).to_bytes(4, "little") + bus.read(DMA_LO, 4).to_bytes(4, "little")
    assert raw == b"QEMU CFG"


def test_dma_select_skip_read(mem):
    dev, bus = make(mem)
    desc, buf = 0x1000, 0x2000
    mem.fill(buf, 16, 0xAA)
    # Select the user file and skip 6 bytes...
    mem.write(desc, struct.pack(">IIQ", (0x20 << 16) | DMA_SELECT | DMA_SKIP, 6, 0))
    start_dma(bus, desc)
    assert mem.read_u32(desc) == 0
    # ... then read 8: "world" and 3 zero bytes past the end.
    mem.write(desc, struct.pack(">IIQ", DMA_READ, 8, buf))
    start_dma(bus, desc)
    assert mem.read_u32(desc) == 0
    assert mem.read(buf, 9) == b"world\0\0\0\xaa"
    assert dev.dma_transfers == 2
    # The port interface shares the offset: it is at the end now.
    assert bus.read(DATA, 1) == 0


def test_dma_errors(mem):
    _, bus = make(mem)
    desc = 0x1000
    mem.write(desc, struct.pack(">IIQ", DMA_SELECT | DMA_WRITE, 4, 0x2000))
    start_dma(bus, desc)
    assert struct.unpack(">I", mem.read(desc, 4))[0] == DMA_ERROR
    mem.write(desc, struct.pack(">IIQ", DMA_SELECT | DMA_READ, 4, 0xF000_0000))
    start_dma(bus, desc)
    assert struct.unpack(">I", mem.read(desc, 4))[0] == DMA_ERROR
    # A descriptor outside RAM is ignored, not a crash.
    start_dma(bus, 0x1_0000_0000_0000)


def test_state_round_trip(mem):
    dev, bus = make(mem)
    bus.write(SEL, 2, 0)
    bus.read(DATA, 1)
    state = dev.save()
    dev.reset()
    assert bus.read(DATA, 1) == ord("Q")
    dev.restore(state)
    assert bus.read(DATA, 1) == ord("E")
