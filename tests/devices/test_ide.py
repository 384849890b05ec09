"""The legacy IDE channel and its ATA disk, driven through the I/O bus at
the PC's ports (0x1F0-0x1F7, 0x3F6) as a driver would, against a real
raw image file; IRQ 14 observed on its line."""

from __future__ import annotations

import os
import random
import struct
import subprocess

import pytest

from pyvmm.bus import Bus
from pyvmm.device import DeviceStateError
from pyvmm.devices.ide.ata import ABRT, BSY, DRDY, DRQ, ERR, IDNF
from pyvmm.devices.ide.piix import PRIMARY_IRQ, piix_ide_function, place_primary_channel
from pyvmm.irq import IrqLine
from pyvmm.storage.image import open_image
from pyvmm.storage.raw import RawImage

CMD, CTL = 0x1F0, 0x3F6
SECTORS = 2048


def make(tmp_path, size: int = SECTORS * 512, readonly: bool = False):
    path = str(tmp_path / "disk.raw")
    RawImage.create(path, size)
    image = open_image(path, "raw", readonly=readonly)
    bus = Bus("io")
    irq = IrqLine(PRIMARY_IRQ)
    channel = place_primary_channel(bus, irq, image)
    return bus, irq, channel, path


def task(bus, lba: int, count: int, cmd: int, ext: bool = False) -> None:
    """Programs the task file as libata does (HOB bytes first for LBA48)."""
    if ext:
        bus.write(CMD + 2, 1, count >> 8)
        for i, shift in ((3, 24), (4, 32), (5, 40)):
            bus.write(CMD + i, 1, lba >> shift)
        bus.write(CMD + 6, 1, 0x40)
    else:
        bus.write(CMD + 6, 1, 0xE0 | (lba >> 24) & 0xF)
    bus.write(CMD + 2, 1, count & 0xFF)
    for i, shift in ((3, 0), (4, 8), (5, 16)):
        bus.write(CMD + i, 1, lba >> shift)
    bus.write(CMD + 7, 1, cmd)


def read_block(bus) -> bytes:
    return bus.read_many(CMD, 2, 256)


def test_identify_device(tmp_path):
    bus, irq, channel, _ = make(tmp_path)
    assert bus.read(CTL, 1) == DRDY | 0x10
    bus.write(CMD + 7, 1, 0xEC)
    assert irq.level == 1 and bus.read(CTL, 1) & DRQ      # alternate status leaves INTRQ alone
    assert irq.level == 1
    assert bus.read(CMD + 7, 1) & DRQ and irq.level == 0  # status acknowledges it
    words = struct.unpack("<256H", read_block(bus))
    assert bus.read(CMD + 7, 1) == DRDY | 0x10            # all 512 bytes read: no DRQ
    assert words[0] & 0x8000 == 0                          # ATA, not ATAPI
    assert words[60] | words[61] << 16 == SECTORS
    assert words[100] | words[101] << 16 | words[102] << 32 | words[103] << 48 == SECTORS
    assert words[83] & (1 << 10) and words[49] & (1 << 9)  # 48-bit, LBA
    model = bytes(b for w in words[27:47] for b in struct.pack(">H", w)).decode().strip()
    assert model == "pyvmm ATA disk"


def test_read_sectors_lba28_one_interrupt_per_sector(tmp_path):
    bus, irq, channel, path = make(tmp_path)
    data = os.urandom(3 * 512)
    with open(path, "r+b") as f:
        f.seek(5 * 512)
        f.write(data)
    task(bus, 5, 3, 0x20)
    got = b""
    for _ in range(3):
        assert irq.level == 1
        assert bus.read(CMD + 7, 1) == DRDY | 0x10 | DRQ
        got += read_block(bus)
    assert got == data
    assert bus.read(CMD + 7, 1) == DRDY | 0x10 and irq.level == 0
    assert bus.read(CMD, 2) == 0


def test_write_sectors_lba48_above_28_bits_and_flush(tmp_path):
    size = (1 << 28) * 512 + 64 * 512                   # 128 GiB + 32 KiB, sparse
    bus, irq, channel, path = make(tmp_path, size)
    lba = (1 << 28) + 7
    data = os.urandom(2 * 512)
    task(bus, lba, 2, 0x34, ext=True)
    assert bus.read(CMD + 7, 1) & DRQ and irq.level == 0   # PIO out: first block without interrupt
    bus.write_many(CMD, 4, data[:512])                    # 32-bit data port accesses
    assert irq.level == 1 and bus.read(CMD + 7, 1) & DRQ
    bus.write_many(CMD, 2, data[512:])
    assert irq.level == 1 and bus.read(CMD + 7, 1) == DRDY | 0x10
    bus.write(CMD + 7, 1, 0xEA)                           # FLUSH CACHE EXT
    assert irq.level == 1 and bus.read(CMD + 7, 1) == DRDY | 0x10
    with open(path, "rb") as f:
        f.seek(lba * 512)
        assert f.read(1024) == data
    # HOB: with bit 7 of device control set, the task file reads its previous bytes
    task(bus, lba, 1, 0x24, ext=True)
    bus.write(CTL, 1, 0x80)
    assert bus.read(CMD + 3, 1) == (lba >> 24) & 0xFF
    bus.write(CTL, 1, 0)
    assert bus.read(CMD + 3, 1) == lba & 0xFF
    assert read_block(bus) == data[:512]


@pytest.mark.parametrize("lba,count,cmd,ext", [
    (SECTORS, 1, 0x20, False),            # just past the end
    (SECTORS - 1, 2, 0x30, False),        # straddles the end
    (SECTORS - 1, 0, 0x24, True),         # count 0 = 65536 sectors
    ((1 << 48) - 1, 0, 0x34, True),       # the largest LBA48 request
    (SECTORS - 1, 0, 0x40, False),        # READ VERIFY, 256 sectors
])
def test_requests_past_the_end_fail_with_idnf(tmp_path, lba, count, cmd, ext):
    bus, irq, channel, _ = make(tmp_path)
    task(bus, lba, count, cmd, ext)
    assert irq.level == 1
    assert bus.read(CMD + 7, 1) == DRDY | 0x10 | ERR and bus.read(CMD + 1, 1) == IDNF
    assert bus.read(CMD, 2) == 0                         # no data to give


def test_unknown_commands_and_dma_without_a_bus_master_abort_readonly_writes_abort(tmp_path):
    """A channel with no bus master attached (DMA itself: test_ide_dma.py)
    aborts DMA commands as it does unknown ones."""
    bus, irq, channel, _ = make(tmp_path, readonly=True)
    assert channel.dma_engine is None
    for cmd in (0xC8, 0xCA, 0x25, 0x35, 0xA1, 0xC4, 0x00, 0xFF):
        bus.write(CMD + 7, 1, cmd)
        assert bus.read(CMD + 7, 1) & ERR and bus.read(CMD + 1, 1) == ABRT, hex(cmd)
    task(bus, 0, 1, 0x30)
    assert bus.read(CMD + 7, 1) & ERR and bus.read(CMD + 1, 1) == ABRT
    bus.write(CMD + 7, 1, 0xE7)                          # a later command clears the error
    assert bus.read(CMD + 7, 1) == DRDY | 0x10 and bus.read(CMD + 1, 1) == 0


def test_nien_masks_intrq_and_srst_restores_signature(tmp_path):
    bus, irq, channel, _ = make(tmp_path)
    bus.write(CTL, 1, 0x02)                               # nIEN
    bus.write(CMD + 7, 1, 0xEC)
    assert irq.level == 0 and bus.read(CTL, 1) & DRQ
    bus.write(CTL, 1, 0x04 | 0x02)                        # SRST
    assert bus.read(CTL, 1) & BSY
    bus.write(CMD + 7, 1, 0xEC)                           # ignored while resetting
    bus.write(CTL, 1, 0x00)
    assert bus.read(CTL, 1) == DRDY | 0x10 and irq.level == 0
    assert [bus.read(CMD + i, 1) for i in (1, 2, 3, 4, 5)] == [1, 1, 1, 0, 0]   # ATA signature


def test_absent_slave_reads_zero_and_takes_no_commands(tmp_path):
    bus, irq, channel, _ = make(tmp_path)
    bus.write(CMD + 6, 1, 0xB0)                           # select device 1
    assert bus.read(CMD + 7, 1) == 0 and bus.read(CTL, 1) == 0
    bus.write(CMD + 7, 1, 0xEC)
    assert irq.level == 0
    bus.write(CMD + 6, 1, 0xA0)
    assert bus.read(CMD + 7, 1) == DRDY | 0x10


def test_chs_addressing_reads_the_same_sector(tmp_path):
    bus, irq, channel, path = make(tmp_path)
    lba = 1000                                            # 16 heads, 63 sectors/track
    cylinder, rest = divmod(lba, 16 * 63)
    head, sector = divmod(rest, 63)
    with open(path, "r+b") as f:
        f.seek(lba * 512)
        f.write(b"C" * 512)
    bus.write(CMD + 6, 1, 0xA0 | head)
    bus.write(CMD + 2, 1, 1)
    bus.write(CMD + 3, 1, sector + 1)
    bus.write(CMD + 4, 1, cylinder & 0xFF)
    bus.write(CMD + 5, 1, cylinder >> 8)
    bus.write(CMD + 7, 1, 0x20)
    assert read_block(bus) == b"C" * 512


def test_hostile_port_writes_never_raise(tmp_path):
    bus, irq, channel, _ = make(tmp_path)
    rng = random.Random(21)
    ports = [CMD + i for i in range(8)] + [CTL]
    for _ in range(5000):
        port = rng.choice(ports)
        size = rng.choice((1, 2, 4)) if port == CMD else 1
        if rng.random() < 0.5:
            bus.write(port, size, rng.getrandbits(8 * size))
        else:
            bus.read(port, size)
    assert bus.read(CTL, 1) & BSY or bus.read(CTL, 1) & DRDY   # still a device, still answering


def test_save_restore_mid_transfer(tmp_path):
    bus, irq, channel, path = make(tmp_path)
    with open(path, "r+b") as f:
        f.write(bytes(range(256)) * 4)
    task(bus, 0, 2, 0x20)
    first = bus.read_many(CMD, 2, 100)
    state = channel.save()
    bus.read_many(CMD, 2, 50)
    channel.restore(state)
    assert first + bus.read_many(CMD, 2, 156) + read_block(bus) == bytes(range(256)) * 4
    with pytest.raises(DeviceStateError):
        channel.restore({**state, "version": 99})


def test_pci_function_is_an_ide_controller_in_compatibility_mode():
    function, _ = piix_ide_function()
    assert function.config_read(0, 4) == 0x7010_8086
    assert function.config_read(8, 4) >> 8 == 0x010180   # mass storage, IDE, legacy ports, bus master
    assert function.bars[4] is not None and function.bars[4].kind == "io"


def test_drive_if_ide_is_parsed_apart_from_virtio_and_survives_json():
    from pyvmm.config import VmConfig, parse_ide_drives, parse_qemu_drives
    from pyvmm.errors import ConfigError
    texts = ["file=a.qcow2,format=qcow2,if=ide", "file=b.raw,format=raw"]
    ide = parse_ide_drives(texts)
    assert [d.file for d in ide] == ["a.qcow2"]
    assert [d.file for d in parse_qemu_drives(texts, [])] == ["b.raw"]
    with pytest.raises(ConfigError, match="if=ide"):
        parse_ide_drives(["file=a,if=scsi"])
    cfg = VmConfig(kernel="k", ide_drives=ide)
    assert VmConfig.from_dict(cfg.to_dict()).ide_drives == ide


def test_four_ide_drives_take_their_positions_as_qemu_places_them():
    """index = bus * 2 + unit; a drive without one takes the first position
    no earlier drive holds, in command-line order, as QEMU's drive_new does."""
    from pyvmm.config import VmConfig, parse_ide_drives
    texts = ["file=d,if=ide,bus=1,unit=1", "file=a,if=ide", "file=b,if=ide,readonly=on", "file=c,if=ide,index=2"]
    drives = parse_ide_drives(texts)
    assert [(d.file, d.index) for d in drives] == [("d", 3), ("a", 0), ("b", 1), ("c", 2)]
    assert [d.index for d in parse_ide_drives(["file=a,if=ide", "file=b,if=ide"])] == [0, 1]
    assert [d.index for d in parse_ide_drives(["file=a,if=ide,unit=1", "file=b,if=ide", "file=c,if=ide"])] == [1, 0, 2]
    cfg = VmConfig(kernel="k", ide_drives=drives)
    assert VmConfig.from_dict(cfg.to_dict()).ide_drives == drives


@pytest.mark.parametrize("texts,message", [
    (["file=a,if=ide", "file=b,if=ide", "file=c,if=ide", "file=d,if=ide", "file=e,if=ide"], "all 4 positions"),
    (["file=a,if=ide,index=1", "file=b,if=ide,bus=0,unit=1"], "a and b are both at bus 0, unit 1"),
    (["file=a,if=ide", "file=b,if=ide,index=0"], "a and b are both at bus 0, unit 0"),
    (["file=a,if=ide,bus=2"], "bus=2 is not 0..1"),
    (["file=a,if=ide,unit=2"], "unit=2 is not 0..1"),
    (["file=a,if=ide,index=4"], "index=4 is not 0..3"),
    (["file=a,if=ide,index=-1"], "index=-1 is not 0..3"),
    (["file=a,if=ide,index=1,unit=1"], "index= or bus=/unit=, not both"),
    (["file=a,index=1"], "unknown option 'index'"),               # a virtio disk has no IDE position
])
def test_ide_drive_positions_that_cannot_be_are_one_line_config_errors(texts, message):
    from pyvmm.config import parse_ide_drives, parse_qemu_drives
    from pyvmm.errors import ConfigError
    with pytest.raises(ConfigError, match=message) as info:
        parse_ide_drives(texts)
        parse_qemu_drives(texts, [])
    assert "\n" not in str(info.value)


def test_ide_positions_from_a_config_file_are_checked_too():
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.errors import ConfigError
    two = {"kernel": "k", "ide_drives": [{"file": "a", "index": 2}, {"file": "b", "index": 2}]}
    with pytest.raises(ConfigError, match="both at bus 1, unit 0"):
        VmConfig.from_dict(two).validate()
    with pytest.raises(ConfigError, match="IDE index 7 is not 0..3"):
        VmConfig.from_dict({"kernel": "k", "ide_drives": [{"file": "a", "index": 7}]}).validate()
    with pytest.raises(ConfigError, match="index is for IDE drives only"):
        VmConfig(kernel="k", drives=[DriveConfig("a", index=1)]).validate()


# --- a real driver: SeaBIOS's ATA driver boots from the IDE disk --------------------

def test_seabios_boots_from_the_ide_disk_as_under_qemu(tmp_path):
    """The BIOS finds the PIIX controller's disk, loads the MBR through it
    (IDENTIFY, READ SECTORS in PIO) and hands over with DL = 0x80; the
    boot sector reads sector 2 through INT 13h. QEMU TCG with its own IDE
    and the same SeaBIOS and disk gives the same text and exit code."""
    from pyvmm.boot.firmware import DEFAULT_BIOS
    from pyvmm.config import DriveConfig, VmConfig
    from pyvmm.machine import StopReason
    from tests.devices.qemu_reference import qemu_binary
    from tests.firmware.bootdisk import (
        DEBUG_EXIT_PORT,
        GREETING,
        SECTOR2_TEXT,
        write_disk,
    )
    from tests.hostfacts import require_from_setup
    from tests.rawguest import run_machine
    require_from_setup(paths=[DEFAULT_BIOS], package="seabios")
    disk = write_disk(tmp_path / "mbr.img")
    out = bytearray()
    cfg = VmConfig(bios=DEFAULT_BIOS, engine="bt", no_reboot=True, mem_mib=64,
                   ide_drives=[DriveConfig(str(disk), "raw")], debug_exit=(DEBUG_EXIT_PORT, 1))
    machine, _ = run_machine(cfg, None, output=out.extend, timeout=240)
    text = out.decode(errors="replace")
    sector2 = SECTOR2_TEXT[:-1]       # the last characters may still sit in SeaBIOS's serial console at the exit
    assert GREETING in text and sector2 in text, text
    assert machine.stop_status.reason is StopReason.DEBUG_EXIT and machine.stop_status.value == 0x80, text
    commands = machine.devices["ide0"].commands
    assert commands.get(0xEC) and (commands.get(0x20) or commands.get(0x24)), commands
    qemu = subprocess.run([qemu_binary(), "-accel", "tcg", "-m", "64", "-nographic", "-no-reboot",
                           "-drive", f"file={disk},format=raw,if=ide,snapshot=on",
                           "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    qtext = qemu.stdout.decode(errors="replace")
    assert qemu.returncode == ((0x80 << 1) | 1) & 0xFF, qtext      # an exit status keeps 8 bits
    assert GREETING in qtext and sector2 in qtext


def test_primary_channel_decode_is_enabled_as_firmware_leaves_it():
    """ata_piix probes a channel only when its IDETIM enable bit (config
    0x41/0x43 bit 7) is set; with no BIOS nobody else sets it.  It stays
    set across a reset, the secondary (no disk) stays off, and the guest
    may still change both."""
    function, _ = piix_ide_function()
    assert function.config_read(0x41, 1) & 0x80 and not function.config_read(0x43, 1) & 0x80
    function.config_write(0x40, 4, 0x80000000)
    assert function.config_read(0x40, 4) == 0x80000000
    function.reset()
    assert function.config_read(0x40, 4) == 0x00008000


# A real driver, Linux's ata_piix, finds and uses this disk on the virtio
# boots of tests/devices/test_virtio_linux.py (tests/linux_ide.py).
