"""`--engine auto`: choosing hw, bt or hybrid per host and guest.

The rule (decide()):
1. no usable /dev/kvm                          -> bt (the only engine that runs);
2. KVM with real hardware assist (vmx/svm, no kvm_pvm) -> hw: guest kernel and
   user code both run natively, far ahead of a translator in Python;
3. KVM that emulates guest kernel mode (kvm_pvm, hostfit.kernel_mode_emulated):
   - a Linux guest (bzImage or vmlinux ELF) -> hybrid: its kernel in bt, its
     user code natively under KVM.  hw cannot run Linux user space here
     (kvm_pvm runs a non-PVM-aware guest's user `syscall` into the kernel's
     entry point without leaving CPL3, and init dies), and hybrid beats bt
     overall (bench/modes.py, fitted kernel, 1 vCPU, this host):
       boot to PYVMM-INIT-READY   bt 26.1 s   hybrid 23.6 s
       shell loop (user CPU)      bt 34.5 s   hybrid  2.5 s  (13.6x)
       dd bs=1 (system calls)     bt  1.4 s   hybrid  2.4 s  (bt 1.7x)
       fork+exec loop             bt  9.1 s   hybrid 10.0 s
   - any other guest (Multiboot, PVH, raw test kernels: CPL0 code only) -> bt:
     kernel-mode code is what this KVM runs slowest.

Measured on this host (kvm_pvm, 2 CPUs, python3.11; tests/modeguests.py
guests and /tmp scripts built like bench/modes.py):
- CPL0 ALU loop, 10 M instructions:   hw 1.26 M insn/s, bt 4.90 M insn/s (bt 3.9x);
- CPL3 ALU loop, 8 M iterations:      bt 2.06 s, hybrid 0.013 s (native under KVM);
- CPL0 SSE2 checksum (4 x 64 KiB):    hw 41.6 s (every SSE instruction is a
  pyvmm completion), bt 0.145 s (bt ~290x);
- port I/O exits (bench/exits.py):    hw 12.8 us per exit; bt handles
  2000 UART writes in 5 ms of guest time (~2.6 us each with the loop).

Nothing here raises."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KVM_PATH = "/dev/kvm"


@dataclass(frozen=True)
class HostFacts:
    kvm_usable: bool            # /dev/kvm exists and we may open it read-write
    hardware_assist: bool       # the CPU shows vmx or svm
    kernel_mode_emulated: bool  # KVM runs guest CPL0 in a software emulator (kvm_pvm)


@dataclass(frozen=True)
class GuestFacts:
    linux: bool                 # a Linux bzImage or vmlinux ELF (has user space)


@dataclass(frozen=True)
class Decision:
    engine: str                 # "hw", "bt" or "hybrid"
    reason: str

    def line(self) -> str:
        return f"pyvmm: engine auto -> {self.engine}: {self.reason}"


def host_facts(kvm_path: str = KVM_PATH) -> HostFacts:
    """What this host offers (reads /dev/kvm, /proc/cpuinfo, /sys/module)."""
    from .engines.kvm import hostfit
    usable = os.path.exists(kvm_path) and os.access(kvm_path, os.R_OK | os.W_OK)
    try:
        flags = re.search(r"^flags\s*:.*\b(vmx|svm)\b", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        flags = None
    return HostFacts(kvm_usable=usable, hardware_assist=bool(flags) and not os.path.isdir("/sys/module/kvm_pvm"),
                     kernel_mode_emulated=usable and hostfit.kernel_mode_emulated())


def guest_facts(kernel: str | None) -> GuestFacts:
    """Whether the kernel image is Linux (unreadable or absent: not Linux)."""
    if not kernel:
        return GuestFacts(linux=False)
    try:
        with open(kernel, "rb") as f:
            head = f.read()
    except OSError:
        return GuestFacts(linux=False)
    from .boot.bzimage import looks_like_bzimage
    from .boot.elf import is_linux_elf
    try:
        linux = looks_like_bzimage(head) or is_linux_elf(head)
    except Exception:  # a truncated header: the loader will say what is wrong
        linux = False
    return GuestFacts(linux=bool(linux))


def decide(host: HostFacts, guest: GuestFacts) -> Decision:
    """The engine for this host and guest, with the reason (module docstring)."""
    if not host.kvm_usable:
        return Decision("bt", "no usable /dev/kvm")
    if not host.kernel_mode_emulated:
        return Decision("hw", "KVM with hardware assist runs guest kernel and user code natively")
    if guest.linux:
        return Decision("hybrid", "KVM emulates kernel mode here (slow, and it faults a Linux guest's "
                                  "user-mode syscalls), so the kernel runs in bt and user code natively "
                                  "under KVM (bench/modes.py: user CPU work ~14x faster than bt)")
    return Decision("bt", "KVM emulates kernel mode here and this guest runs kernel-mode code only "
                          "(bt ~4x faster on CPL0 code, ~300x on CPL0 SSE)")


def choose(kernel: str | None) -> Decision:
    """decide() for this host and the given kernel image."""
    d = decide(host_facts(), guest_facts(kernel))
    log.info("%s", d.line())
    return d
