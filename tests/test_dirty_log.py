"""Guest memory dirty tracking (pyvmm/dirty.py): a guest that writes a
known set of pages yields exactly that set, under every engine.

The guest first writes all 16 candidate pages (so no accessed/dirty bit
of its page tables changes later), then, at CPL3 with IOPL 3, tells the
test's port to start the log, writes the user set, makes a system call,
writes the kernel set and tells the port to read the log.  Under hybrid
the user writes go through KVM's dirty log and the kernel's through bt's
write paths; under hw both through KVM's; under bt both through bt's."""

from __future__ import annotations

import pytest

from pyvmm.config import VmConfig
from pyvmm.dirty import DirtyBitmap
from pyvmm.errors import StateError
from pyvmm.machine import StopReason
from pyvmm.memory import GuestMemory

from .modeguests import DATA, SYSCALL_SETUP, USTACK, boot_for, enter_user
from .rawguest import build_guest, require_kvm, run_machine

PORT = 0xE4
CANDIDATES = 16
USER_PAGES = (1, 4, 9, 15)
KERNEL_PAGES = (6, 13)


def _writes(pages) -> str:
    return "".join(f"    mov byte ptr [{DATA + p * 0x1000 + 0x123:#x}], {p}\n" for p in pages)


SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + _writes(range(CANDIDATES)) + enter_user(0x3002) + "sys_entry:\n" + _writes(KERNEL_PAGES) + f"""
    mov al, 2
    out {PORT:#x}, al
1:  jmp 1b
user:
    mov al, 1
    out {PORT:#x}, al
""" + _writes(USER_PAGES) + """    syscall
"""


class LogPort:
    """Port PORT: 1 starts the dirty log, 2 reads it and ends the run."""

    def __init__(self, machine):
        self.machine = machine
        self.seen: DirtyBitmap | None = None

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        memory = self.machine.memory
        if value == 1:
            memory.start_dirty_log()
        elif value == 2:
            self.seen = memory.dirty_pages()
            memory.stop_dirty_log()
            self.machine.request_stop(StopReason.POWEROFF, "dirty log read")


def _dirty(engine: str) -> set[int]:
    code = build_guest(SOURCE.format(ustack=USTACK), "long")
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    ports = []

    def setup(machine):
        ports.append(LogPort(machine))
        machine.io_bus.insert(PORT, 1, ports[0], "dirty-log-test")
    machine, _ = run_machine(cfg, boot_for(code), timeout=120, setup=setup)
    assert machine.stop_status.detail == "dirty log read", machine.stop_status
    return set(ports[0].seen)


EXPECTED = {(DATA >> 12) + p for p in USER_PAGES + KERNEL_PAGES}


def test_dirty_log_under_bt_is_exactly_what_the_guest_wrote():
    assert _dirty("bt") == EXPECTED


@pytest.mark.kvm
@pytest.mark.parametrize("engine", ["hw", "hybrid"])
def test_dirty_log_under_kvm_is_exactly_what_the_guest_wrote(engine):
    require_kvm()
    assert _dirty(engine) == EXPECTED


def test_vmm_writes_are_logged_and_reading_clears():
    mem = GuestMemory(1 << 20)
    mem.write(0x3000, b"x")                   # before the log: not recorded
    mem.start_dirty_log()
    with pytest.raises(StateError):
        mem.start_dirty_log()
    mem.write(0x5FFF, b"ab")                  # crosses into the next page
    mem.write_u32(0x9000, 7)
    assert sorted(mem.dirty_pages()) == [5, 6, 9]
    assert len(mem.dirty_pages()) == 0        # read and cleared
    mem.stop_dirty_log()
    with pytest.raises(StateError):
        mem.dirty_pages()


def test_bitmap_iterates_its_set_bits():
    bm = DirtyBitmap(100, {0, 7, 8, 63, 99, 150})
    assert list(bm) == [0, 7, 8, 63, 99] and len(bm) == 5
    assert 63 in bm and 64 not in bm and 150 not in bm
