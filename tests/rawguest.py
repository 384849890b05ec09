"""Running small assembled guests on a real pyvmm machine, without a kernel loader."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from pyvmm.boot import entry
from pyvmm.boot.result import BootResult
from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.machine import Machine, StopReason

from .asm import assemble
from .hostfacts import require_kvm  # noqa: F401 - the one KVM host-fact check, re-exported

ENTRY = {"real": 0x7C00, "prot": 0x100000, "long": 0x100000}


def build_guest(source: str, mode: str) -> bytes:
    """Assembles `source` as a flat binary for `mode` (real, prot or long)."""
    directive = {"real": ".code16", "prot": ".code32", "long": ".code64"}[mode]
    path = assemble(f"{directive}\n{source}", fmt="bin", org=ENTRY[mode])
    return Path(path).read_bytes()


def raw_boot(code: bytes, mode: str, extra: dict[int, bytes] | None = None):
    """A boot callable for build_machine: code at the mode's entry address."""
    def boot(memory) -> BootResult:
        addr = ENTRY[mode]
        memory.write(addr, code)
        for where, blob in (extra or {}).items():
            memory.write(where, blob)
        if mode == "real":
            st = entry.real_mode(0, addr)
        elif mode == "prot":
            st = entry.protected_mode_32(memory, addr)
        else:
            st = entry.long_mode_64(memory, addr)
        st.regs["rsp"] = 0x7000 if mode != "real" else 0x7B00
        return BootResult(st, f"raw-{mode}", f"{len(code)} bytes at 0x{addr:x}")
    return boot


@dataclass
class RawRun:
    output: bytes
    machine: Machine
    state: object  # CpuState of vCPU 0 at the end

    @property
    def status(self):
        return self.machine.stop_status


def run_until_stop(machine: Machine, timeout: float, detail: str = "test timeout") -> None:
    """Runs `machine` until it stops; past `timeout` seconds it is stopped
    as if the user quit, with `detail` as the reason.  The timer is gone
    on return, so it cannot stop a later run."""
    timer = threading.Timer(timeout, machine.request_stop, args=(StopReason.USER, detail))
    timer.start()
    try:
        machine.engine.run()
    finally:
        timer.cancel()
        timer.join()


def run_machine(cfg: VmConfig, boot, output=None, timeout: float = 30.0, setup=None, inspect=None):
    """Builds a machine from `cfg` around `boot`, runs it to its end (or
    `timeout`, which stops it as if the user quit), destroys it and returns
    (machine, final state of vCPU 0).  `inspect(machine)` runs before the
    machine is destroyed (guest RAM is still readable); its result is
    kept as machine.inspected."""
    machine = build_machine(cfg, output or (lambda data: None), boot=boot)
    if setup is not None:
        setup(machine)
    timer = threading.Timer(timeout, machine.request_stop, args=(StopReason.USER, "test timeout"))
    timer.start()
    try:
        machine.engine.run()
        state = machine.engine.save_state(0)
        if inspect is not None:
            machine.inspected = inspect(machine)
    finally:
        timer.cancel()
        destroy_machine(machine)
    return machine, state


def run_raw(code: bytes, mode: str, *, engine: str = "hw", cpus: int = 1, irqchip: bool = False,
            debug_exit: tuple[int, int] | None = None, extra: dict[int, bytes] | None = None,
            timeout: float = 30.0, setup=None) -> RawRun:
    """Builds a machine around `code`, runs it to its end (or `timeout`, which
    stops it as if the user quit) and returns what the UART printed."""
    out = bytearray()
    cfg = VmConfig(mem_mib=64, cpus=cpus, engine=engine, irqchip=irqchip, debug_exit=debug_exit,
                   no_reboot=True)
    machine, state = run_machine(cfg, raw_boot(code, mode, extra), out.extend, timeout, setup)
    return RawRun(bytes(out), machine, state)
