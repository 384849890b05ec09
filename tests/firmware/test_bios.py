"""Booting through SeaBIOS: POST on the serial console, the handoff to a
boot sector, no bootable device, bad images, and the chipset pieces the
firmware needs (PAM registers, PCI reset control, fw_cfg files)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.boot.firmware import DEFAULT_BIOS, e820_table, firmware_files, read_bios
from pyvmm.bus import Bus
from pyvmm.config import DriveConfig, VmConfig
from pyvmm.devices.pci.host import attach_host_bridge
from pyvmm.devices.pci.pam import enable_pam, pam_ram_ranges
from pyvmm.errors import ConfigError
from pyvmm.machine import StopReason
from pyvmm.memory import GuestMemory
from tests.hostfacts import require_from_setup
from tests.rawguest import run_machine

from .bootdisk import DEBUG_EXIT_PORT, GREETING, write_disk

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
BANNER = b"SeaBIOS (version"


def require_seabios() -> None:
    require_from_setup(paths=[DEFAULT_BIOS], package="seabios")


def acpi_tables_in(memory) -> dict[bytes, int]:
    """The tables the guest finds from the RSDP in 0xE0000-0xFFFFF, by
    signature, each checked for a zero checksum; the FADT's DSDT pointer
    is followed too."""
    area = memory.read(0xE0000, 0x20000)
    at = next(i for i in range(0, len(area), 16) if area[i:i + 8] == b"RSD PTR " and area[i + 9:i + 15] == b"PYVMM ")
    rsdp = area[at:at + 36]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0, "RSDP checksums"
    found = {}

    def table(addr: int) -> bytes:
        length = memory.read_u32(addr + 4)
        data = memory.read(addr, length)
        assert sum(data) % 256 == 0, f"{data[:4]} checksum"
        found[data[:4]] = addr
        return data

    for rsdt_like, ptr, size in ((struct.unpack_from("<I", rsdp, 16)[0], "I", 4),
                                 (struct.unpack_from("<Q", rsdp, 24)[0], "Q", 8)):
        data = table(rsdt_like)
        for (entry,) in struct.iter_unpack("<" + ptr, data[36:]):
            table(entry)
    fadt = memory.read(found[b"FACP"], 244)
    table(struct.unpack_from("<I", fadt, 40)[0])
    assert memory.read(struct.unpack_from("<I", fadt, 36)[0], 4) == b"FACS"
    return found


def boot_disk(engine: str, disk: Path, timeout: float = 90.0):
    """Boots `disk` through SeaBIOS under `engine`; (machine, serial
    output). machine.inspected: the ACPI tables found in guest RAM."""
    require_seabios()
    out = bytearray()
    cfg = VmConfig(bios=DEFAULT_BIOS, engine=engine, no_reboot=True, mem_mib=64,
                   drives=[DriveConfig(str(disk), "raw")], debug_exit=(DEBUG_EXIT_PORT, 1))
    machine, _ = run_machine(cfg, None, output=out.extend, timeout=timeout,
                             inspect=lambda m: acpi_tables_in(m.memory))
    return machine, bytes(out)


# --- the whole firmware path, in process ----------------------------------------------

@pytest.mark.parametrize("engine", ["bt", pytest.param("hybrid", marks=pytest.mark.kvm),
                                    pytest.param("hw", marks=pytest.mark.kvm)])
def test_post_banner_and_boot_sector_handoff(engine, tmp_path):
    """POST prints SeaBIOS's banner on COM1, the BIOS loads the MBR from
    the virtio disk and jumps to it with DL = 0x80, and INT 10h / INT 13h
    work for the boot sector."""
    machine, out = boot_disk(engine, write_disk(tmp_path / "mbr.img"))
    text = out.decode(errors="replace")
    assert BANNER in out, text
    assert "Booting from Hard Disk..." in text
    assert GREETING in text
    assert "sector 2 read through INT 13" in text, text       # INT 13h read the disk
    status = machine.stop_status
    assert status.reason is StopReason.DEBUG_EXIT, (status, text)
    assert status.value == 0x80, f"boot drive {status.value:#x}, not the first hard disk"
    # pyvmm's tables, placed by the firmware through etc/table-loader
    assert set(machine.inspected) >= {b"RSDT", b"XSDT", b"FACP", b"APIC", b"DSDT", b"MCFG"}


def _pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=REPO, capture_output=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=timeout,
                          env={**os.environ, "PYVMM_BT_CACHE": "off"})


def test_no_bootable_device_with_no_reboot_exits_cleanly(tmp_path):
    """A disk without a boot signature: the firmware says so, resets, and
    --no-reboot ends pyvmm with status 0 instead of booting in a loop."""
    require_seabios()
    disk = write_disk(tmp_path / "blank.img", bootable=False)
    proc = _pyvmm("run", "--engine", "bt", "-m", "64", "--no-reboot", "--verbose",
                  "--drive", f"file={disk},format=raw")
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    assert BANNER.decode() in out, out + err
    assert "No bootable device." in out, out + err
    assert out.count(BANNER.decode()) == 1, "booted more than once"
    assert proc.returncode == 0, err
    assert "guest stopped: reset" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, why", [
    (b"", "bytes is not a BIOS image"),
    (b"\x90" * 1000, "bytes is not a BIOS image"),
    (bytes(128 * 1024), "corrupt BIOS image"),
], ids=["empty", "short", "no-reset-jump"])
def test_bad_bios_image_is_one_line_error(tmp_path, content, why):
    bad = tmp_path / "bios.bin"
    bad.write_bytes(content)
    proc = _pyvmm("run", "--engine", "bt", "--bios", str(bad), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert why in err and str(bad) in err


def test_missing_bios_is_one_line_error(tmp_path):
    proc = _pyvmm("run", "--engine", "bt", "--bios", str(tmp_path / "none.bin"), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "No such file" in err


def test_read_bios_accepts_seabios_and_checks_reset_vector(tmp_path):
    require_seabios()
    image = read_bios(DEFAULT_BIOS)
    assert len(image) % 65536 == 0 and image[-16] == 0xEA    # jmp far F000:E05B
    broken = bytearray(image)
    broken[-16] = 0
    path = tmp_path / "b.bin"
    path.write_bytes(broken)
    with pytest.raises(ConfigError, match="reset vector"):
        read_bios(str(path))


# --- chipset pieces ---------------------------------------------------------------------

def test_pam_registers_are_writable_in_their_fields_only():
    io, mmio = Bus("io"), Bus("mmio")
    bridge = attach_host_bridge(io, mmio)
    enable_pam(bridge.host)
    io.write(0xCF8, 4, 0x80000058)          # bus 0, dev 0, regs 0x58..0x5B
    io.write(0xCFC + 1, 1, 0xFF)            # 0x59: only bits 5:4 exist
    io.write(0xCFC + 2, 2, 0xFFFF)          # 0x5A, 0x5B
    assert io.read(0xCFC, 4) == 0x33_33_30_00
    ranges = pam_ram_ranges(bridge.host)
    assert ranges[-1] == (0xF0000, 0x10000, True, True)
    assert ranges[0] == (0xC0000, 0x4000, True, True) and ranges[4][2:] == (False, False)
    bridge.reset()
    io.write(0xCF8, 4, 0x80000058)
    assert io.read(0xCFC, 4) == 0, "PAM registers survive a reset"


def test_pci_reset_control_port_resets():
    io, mmio = Bus("io"), Bus("mmio")
    bridge = attach_host_bridge(io, mmio)
    resets = []
    bridge.on_reset = lambda: resets.append(1)
    io.write(0xCF9, 1, 0x02)                 # SYS_RST alone: no reset yet
    assert resets == []
    io.write(0xCF9, 1, 0x06)
    assert resets == [1]


def test_firmware_files_describe_ram_console_and_waits():
    mem = GuestMemory(64 * MIB)
    try:
        files = dict(firmware_files(mem, VmConfig(no_reboot=True)))
        assert files["etc/e820"] == e820_table(mem.ram_ranges()) == struct.pack("<QQI", 0, 64 * MIB, 1)
        assert struct.unpack("<H", files["etc/sercon-port"]) == (0x3F8,)
        assert struct.unpack("<I", files["etc/boot-fail-wait"]) == (0,)
        assert struct.unpack("<I", dict(firmware_files(mem, VmConfig()))["etc/boot-fail-wait"])[0] > 0
    finally:
        mem.close()


def test_rom_region_is_mapped_but_not_ram():
    mem = GuestMemory(16 * MIB)
    try:
        mem.add_rom(0xFFFF0000, b"\xEA" * 65536)
        assert mem.read_u8(0xFFFFFFF0) == 0xEA
        assert mem.ram_ranges() == [(0, 16 * MIB)]
        with pytest.raises(ConfigError):
            mem.add_rom(0x1000, bytes(4096))   # over RAM
    finally:
        mem.close()
