"""What the two-level raw guests share whose kernel half (CPL0) logs the
exceptions that their user half (CPL3) raises: the kernel's start, a table
of label addresses, a `common` handler that logs one vector, and running
such a guest on one engine to its halt (hybridguest's single-step guest,
syscallstep, test_debug_user_breakpoints, test_rf_int3_user).

The source pieces hold no braces of their own, so that they may be
concatenated into sources that are then str.format()ed."""

from __future__ import annotations

from pyvmm.config import VmConfig
from pyvmm.machine import StopReason

from .modeguests import IDT_STUBS, SYSCALL_SETUP, boot_for, idt_setup
from .rawguest import run_machine

IDT = 0x120000
LOG, LABELS = 0x330000, 0x331000      # the handler's log; the label table

# A guest's first lines: syscall/sysret to its `sys_entry`, the IDT's gates
# to IDT_STUBS (so the source must end with one_vector_handler).
KERNEL_START = "\n.intel_syntax noprefix\n" + SYSCALL_SETUP + idt_setup(IDT)


def store_labels(*names: str) -> str:
    """Kernel code that writes the addresses of `names`, 8 bytes each, at
    LABELS, so that a test can say which RIPs it wants (read_labels)."""
    return "".join(f"    mov qword ptr [{LABELS + 8 * i:#x}], OFFSET {name}\n" for i, name in enumerate(names))


def one_vector_handler(vector: int, record: str, *, stride: int = 16, dispatch: str = "",
                       after_count: str = "", more: str = "") -> str:
    """The guest's `common` label, where IDT_STUBS jump with [rsp] = the
    vector, then the error code or 0, then the frame; IDT_STUBS follow it.
    For `vector`: with RAX and RCX pushed (the frame's RIP at [rsp + 32], CS
    at + 40, RFLAGS at + 48), the pushed RIP goes first in entry R8 of the
    log at LOG (`stride` bytes an entry, at LOG + RCX), `record` writes the
    rest of the entry, R8 counts it, `after_count` runs and the handler
    returns.  `dispatch` runs first and may jump to handlers in `more`; any
    other vector halts with the vector in RAX.  Each piece ends in a newline."""
    return f"""
common:                       /* [rsp] = vector, then error code or 0, then the frame */
{dispatch}    cmp qword ptr [rsp], {vector}
    jne other
    push rax
    push rcx
    imul rcx, r8, {stride}
    mov rax, [rsp + 32]       /* the pushed RIP */
    mov [{LOG:#x} + rcx], rax
{record}    inc r8
{after_count}    pop rcx
    pop rax
    add rsp, 16
    iretq
{more}other:
    mov rax, [rsp]
    cli
    hlt                       /* anything else: stop with the vector in RAX */

""" + IDT_STUBS


def read_log(memory, count: int, fields: int = 2) -> list[tuple[int, ...]]:
    """The first `count` entries of the log at LOG, `fields` u64s each."""
    return [tuple(memory.read_u64(LOG + 8 * (fields * i + j)) for j in range(fields)) for i in range(count)]


def read_labels(memory, *names: str) -> dict[str, int]:
    """The addresses store_labels(*names) wrote, by name."""
    return {name: memory.read_u64(LABELS + 8 * i) for i, name in enumerate(names)}


def run_to_halt(engine: str, code: bytes, inspect):
    """Runs `code` (modeguests.boot_for: 64-bit, user-accessible identity
    map) in 64 MiB without an irqchip on `engine` and checks that it halted;
    returns the machine, with inspect(m) as m.inspected, and the vCPU state."""
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True)
    m, st = run_machine(cfg, boot_for(code), timeout=60, inspect=inspect)
    assert m.stop_status.reason is StopReason.HALTED, (engine, m.stop_status, hex(st.rip), st.regs["rax"])
    return m, st
