"""A tiny 32-bit guest for snapshot tests: it counts in RAM at COUNTER and
prints each new count to COM1 as eight hex digits and a newline, with a
short delay loop between counts. Runs in-process (build_machine) or as a
Multiboot kernel under `pyvmm run`."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from pyvmm.api.catalog import execute
from pyvmm.api.commands import Target
from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import DriveConfig, VmConfig
from pyvmm.machine import Machine, StopReason

from tests.asm import multiboot_kernel
from tests.rawguest import build_guest, raw_boot

COUNTER = 0x200000

# Counts at COUNTER and prints the count as 8 hex digits and a newline on COM1.
PRINT_COUNTER = f"""
    incl {COUNTER:#x}
    mov {COUNTER:#x}, %ebx
    mov $8, %esi
    mov $0x3f8, %dx
2:  rol $4, %ebx
    mov %ebx, %eax
    and $0xf, %eax
    add $0x30, %al
    cmp $0x39, %al
    jbe 3f
    add $7, %al
3:  out %al, %dx
    dec %esi
    jnz 2b
    mov $0x0a, %al
    out %al, %dx
"""


def counter_loop(delay: int) -> str:
    """PRINT_COUNTER for ever, `delay` LOOP iterations apart."""
    return f"1:\n{PRINT_COUNTER}\n    mov ${delay}, %ecx\n4:  loop 4b\n    jmp 1b\n"


SOURCE = counter_loop(20000)

_kernel: list[Path] = []


def counter_kernel() -> Path:
    if not _kernel:
        _kernel.append(multiboot_kernel(SOURCE))
    return _kernel[0]


def counts(output: bytes) -> list[int]:
    """The counts printed so far (whole lines only)."""
    return [int(x, 16) for x in re.findall(rb"^([0-9A-F]{8})$", bytes(output), re.M)]


class CounterVm:
    """The counter guest on an in-process machine running on a thread,
    driven through the control plane's commands (api/commands.py)."""

    def __init__(self, engine: str, drives: list[DriveConfig], mem_mib: int = 32):
        self.output = bytearray()
        self.events: list[tuple[str, dict]] = []
        cfg = VmConfig(mem_mib=mem_mib, engine=engine, drives=drives, no_reboot=True)
        self.machine: Machine = build_machine(cfg, self.output.extend,
                                              boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))
        self.target = Target(name="counter", machine=self.machine,
                             emit=lambda event, data: self.events.append((event, data)))
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.machine.run()
        except BaseException as e:
            self.error = e

    def qmp(self, name: str, **args):
        return execute(self.target, name, args)

    def hmp(self, line: str) -> str:
        return execute(self.target, "human-monitor-command", {"command-line": line})

    def counter(self) -> int:
        return self.machine.memory.read_u32(COUNTER)

    def wait_counts(self, n: int, after: int = 0, timeout: float = 30.0) -> list[int]:
        """Waits until at least `n` counts were printed after byte `after` of the output."""
        deadline = time.monotonic() + timeout
        while len(counts(self.output[after:])) < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"the guest printed {bytes(self.output[-60:])!r}"
            time.sleep(0.01)
        return counts(self.output[after:])

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j["id"]: j for j in self.qmp("query-jobs")}
            if jobs[job_id]["status"] == "concluded":
                return jobs[job_id]
            assert time.monotonic() < deadline, jobs
            time.sleep(0.01)

    def job_events(self, job_id: str) -> list[str]:
        """The job's statuses, with the STOP/RESUME emitted while it ran, in order."""
        out: list[str] = []
        for event, data in self.events:
            mine = event == "JOB_STATUS_CHANGE" and data["id"] == job_id
            if mine or (out and out[-1] != "concluded" and event in ("STOP", "RESUME")):
                out.append(data["status"] if mine else event)
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.machine.request_stop(StopReason.USER)
        self.thread.join(30)
        destroy_machine(self.machine)
