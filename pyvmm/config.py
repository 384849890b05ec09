"""Plain-data description of a VM, shared by the CLI, JSON files and the API."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import ConfigError

MIB = 1 << 20
# The kernel command line a Linux guest boots with when the user gives none.
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
ENGINES = ("hw", "bt", "hybrid")
MMU_MODES = ("shadow", "nested")


@dataclass
class VmConfig:
    kernel: str | None = None
    initrd: list[str] = field(default_factory=list)  # several only for Multiboot modules
    cmdline: str = ""
    mem_mib: int = 512
    cpus: int = 1
    engine: str = "hw"
    no_reboot: bool = False
    # CPUID feature names (as in /proc/cpuinfo, e.g. "cx16", "xsave") hidden from the guest.
    cpuid_hide: list[str] = field(default_factory=list)
    # (iobase, iosize) of a QEMU-style isa-debug-exit device, or None.
    debug_exit: tuple[int, int] | None = None
    fw_cfg_files: list[tuple[str, str]] = field(default_factory=list)
    # Decompress a bzImage on the host and enter the ELF kernel directly.
    host_decompress: bool = True
    # False: no in-kernel interrupt controller under KVM, so HLT exits to
    # pyvmm (raw test guests use it; Linux needs the irqchip).
    irqchip: bool = True
    # hw: complete instructions KVM cannot emulate with pyvmm's own code.
    complete_instructions: bool = True
    # hw on hosts that emulate guest kernel mode: keep a Linux guest off the
    # features the host cannot run (engines/kvm/hostfit.py).
    fit_guest_to_host: bool = True
    # Appended to a Linux kernel's command line by pyvmm (not by the user).
    linux_cmdline_extra: str = ""
    # bt: "shadow" page tables kept coherent across guest page-table writes,
    # or "nested": every TLB miss walks the guest tables (EPT/NPT cost model).
    mmu: str = "shadow"
    # bt: guest time from instructions retired instead of the host clock.
    deterministic: bool = False
    # pyvmm's paravirtual interface (paravirt/, docs/paravirt.md): CPUID
    # signature, hypercall page MSR, doorbell. False: a plain PC.
    paravirt: bool = True
    # bt: KVM's paravirtual interface (KVM signature in CPUID 0x40000000,
    # kvmclock, PV EOI, steal time; engines/bt/kvmpv.py).  Under hw KVM
    # provides these itself.
    kvmclock: bool = True
    # The VMware backdoor (ports 0x5658/0x5659, docs/vmware-backdoor.md) and
    # the guestinfo.* values its GuestRPC "info-get" answers (key without
    # the "guestinfo." prefix -> value).
    vmware_backdoor: bool = False
    guestinfo: dict[str, str] = field(default_factory=dict)
    # bt: directory of the on-disk store of translated blocks
    # (engines/bt/blockstore.py); None: every block is compiled afresh.
    block_store: str | None = None
    verbose: bool = False

    def validate(self) -> None:
        """Raises ConfigError for values no machine can have."""
        if self.mem_mib < 16:
            raise ConfigError(f"memory {self.mem_mib} MiB is too small (16 MiB at least)")
        if self.mem_mib > 64 * 1024:
            raise ConfigError(f"memory {self.mem_mib} MiB is too large (64 GiB at most)")
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"cpus must be 1..64, not {self.cpus}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)})")
        if self.mmu not in MMU_MODES:
            raise ConfigError(f"unknown mmu {self.mmu!r} (choose from {', '.join(MMU_MODES)})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*$")
_SIZE_SHIFT = {"": 20, "k": 10, "m": 20, "g": 30, "t": 40}  # bare number means MiB, as in QEMU


def parse_mem_size(text: str) -> int:
    """Parses a QEMU-style size ("512", "256M", "1G") into MiB.

    Raises ConfigError on anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"bad memory size {text!r} (e.g. 512, 256M, 1G)")
    nbytes = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    if nbytes % MIB:
        raise ConfigError(f"memory size {text!r} is not a whole number of MiB")
    return nbytes // MIB
