"""Option ROMs pyvmm gives BIOS firmware, assembled from their sources here
at first use (GNU as and ld, from binutils) and cached."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...cachedir import pyvmm_cache
from ...errors import ConfigError

SOURCES = Path(__file__).resolve().parent
BLOCK = 512
PNP_SIGNATURE = b"$PnP"
PNP_CHECKSUM = 9          # offset of the checksum byte in the PnP header
PNP_LENGTH_UNITS = 5      # offset of its length, in 16-byte units
ROM_PNP_POINTER = 0x1A


def _checksummed(image: bytes) -> bytes:
    """`image` padded to whole 512-byte blocks with its size byte, the PnP
    header's checksum and the ROM's last byte set so each sums to 0."""
    rom = bytearray(image)
    rom.extend(bytes(-(len(rom) + 1) % BLOCK + 1))    # at least one byte for the checksum
    rom[2] = len(rom) // BLOCK
    pnp = int.from_bytes(rom[ROM_PNP_POINTER:ROM_PNP_POINTER + 2], "little")
    if rom[pnp:pnp + 4] == PNP_SIGNATURE:
        length = rom[pnp + PNP_LENGTH_UNITS] * 16
        rom[pnp + PNP_CHECKSUM] = 0
        rom[pnp + PNP_CHECKSUM] = -sum(rom[pnp:pnp + length]) & 0xFF
    rom[-1] = 0
    rom[-1] = -sum(rom) & 0xFF
    return bytes(rom)


def option_rom(name: str) -> bytes:
    """The ROM built from SOURCES/<name>.S. Raises ConfigError when binutils
    is missing or the source does not assemble."""
    source = SOURCES / f"{name}.S"
    text = source.read_bytes()
    cached = pyvmm_cache("optionroms") / f"{name}-{hashlib.sha256(text).hexdigest()[:16]}.bin"
    if cached.exists():
        return cached.read_bytes()
    if not (shutil.which("as") and shutil.which("ld")):
        raise ConfigError(f"option ROM {name}: GNU as and ld are needed to build it (install binutils)")
    with tempfile.TemporaryDirectory(prefix="pyvmm-rom-") as work:
        obj, out = Path(work) / "rom.o", Path(work) / "rom.bin"
        for cmd in (["as", "--32", "-o", str(obj), str(source)],
                    ["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-e", "_start",
                     "-o", str(out), str(obj)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
                raise ConfigError(f"option ROM {name}: {cmd[0]} failed: {first[0] if first else proc.returncode}")
        rom = _checksummed(out.read_bytes())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(rom)
    tmp.replace(cached)
    return rom


__all__ = ["option_rom"]
