"""What every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu import CpuState


@dataclass
class BootResult:
    cpu: CpuState          # entry state of the boot vCPU
    protocol: str          # "linux-bzimage", "linux-elf", "multiboot", "pvh", "raw-long", ...
    summary: str = ""      # one line for --verbose: what was loaded where
