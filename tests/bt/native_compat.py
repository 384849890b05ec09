"""The host CPU itself in compatibility mode, as a differential-test oracle.

kvm_pvm emulates 32-bit user code of its guests (its instruction emulator
answers SSE, x87 and every VEX form there with #UD), so KvmOracle cannot
show what the silicon does in a 32-bit code segment.  A 64-bit Linux
process can: its GDT has a 32-bit user code segment (selector 0x23), and a
far jump there runs 32-bit code natively at CPL3, under long mode.

A child process (this file run as a script) maps harness's layout at the
same addresses (code at CODE_ADDR, data at DATA_ADDR, stack below
STACK_TOP), so registers holding addresses compare as they are.  For each
case it loads EAX..EDI and RFLAGS, far-jumps to the code, which ends with a
far jump back to 64-bit code that stores the registers; the data page comes
back too.  A case the CPU faults on kills the child with a signal (SIGILL
for #UD, SIGSEGV for #GP/#PF): run_cases reports the signal for that case
and goes on in a new child.

Only the low 32 bits of each GPR are defined after compatibility mode."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import struct
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import harness

CODE_ADDR, DATA_ADDR = 0x200000, 0x300000    # harness's (checked in run_cases; the child skips importing it)
AREA, AREA_SIZE = 0x200000, 0x200000         # CODE_ADDR .. STACK_TOP, one RWX mapping
TRAMP, RET64, BLOCK = 0x280000, 0x280800, 0x290000
IN_REGS, IN_FLAGS, FAR32 = BLOCK, BLOCK + 0x40, BLOCK + 0x50
OUT_REGS, OUT_FLAGS = BLOCK + 0x100, BLOCK + 0x180
SAVE_RSP, SAVE_MXCSR, SAVE_DS, SAVE_ES = BLOCK + 0x200, BLOCK + 0x208, BLOCK + 0x210, BLOCK + 0x212
USER32_CS, USER64_CS = 0x23, 0x33             # Linux's __USER32_CS and __USER_CS
NAMES = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")   # harness (GPR_NAMES) order

ENTER = f"""
    push rbx; push rbp; push r12; push r13; push r14; push r15
    mov qword ptr [{SAVE_RSP}], rsp
    stmxcsr dword ptr [{SAVE_MXCSR}]
    mov ax, ds; mov word ptr [{SAVE_DS}], ax
    mov ax, es; mov word ptr [{SAVE_ES}], ax
    mov ax, ss; mov ds, ax; mov es, ax       /* 64-bit Linux leaves DS/ES null: 32-bit code needs them */
    push qword ptr [{IN_FLAGS}]
    popfq
""" + "".join(f"    mov {r}, dword ptr [{IN_REGS + 4 * i}]\n" for i, r in enumerate(NAMES)) + f"""
    jmp fword ptr [{FAR32}]
"""
LEAVE = "".join(f"    mov qword ptr [{OUT_REGS + 8 * i}], {'r' + r[1:]}\n" for i, r in enumerate(NAMES)) + f"""
    pushfq
    pop qword ptr [{OUT_FLAGS}]
    mov ax, word ptr [{SAVE_DS}]; mov ds, ax
    mov ax, word ptr [{SAVE_ES}]; mov es, ax
    mov rsp, qword ptr [{SAVE_RSP}]
    ldmxcsr dword ptr [{SAVE_MXCSR}]
    pop r15; pop r14; pop r13; pop r12; pop rbp; pop rbx
    ret
"""
BACK_TO_64 = b"\xEA" + struct.pack("<IH", RET64, USER64_CS)   # ljmp 0x33:RET64 (32-bit form)
SIGNAL_VECTOR = {signal.SIGILL: 6, signal.SIGSEGV: 13, signal.SIGBUS: 13, signal.SIGFPE: 0}


def _child() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace, map_private_anon = 0x100000, 0x22
    got = libc.mmap(AREA, AREA_SIZE, 7, map_private_anon | map_fixed_noreplace, -1, 0)
    if got != AREA:
        sys.exit(f"native_compat: cannot map {AREA:#x}: errno {ctypes.get_errno()}")
    mem = (ctypes.c_char * AREA_SIZE).from_address(AREA)
    for where, blob in zip((TRAMP, RET64), json.loads(sys.stdin.readline())):   # _trampolines()
        blob = bytes.fromhex(blob)
        ctypes.memmove(where, blob, len(blob))
    ctypes.memmove(FAR32, struct.pack("<IH", CODE_ADDR, USER32_CS), 6)
    enter = ctypes.CFUNCTYPE(None)(TRAMP)
    for line in sys.stdin:
        case = json.loads(line)
        code, data = bytes.fromhex(case["code"]) + BACK_TO_64, bytes.fromhex(case["data"])
        ctypes.memmove(CODE_ADDR, code, len(code))
        ctypes.memmove(DATA_ADDR, data, len(data))
        ctypes.memmove(IN_REGS, struct.pack("<8I", *[r & 0xFFFFFFFF for r in case["regs"][:8]]), 32)
        ctypes.memmove(IN_FLAGS, struct.pack("<Q", case["rflags"]), 8)
        enter()
        regs = list(struct.unpack("<8Q", bytes(mem[OUT_REGS - AREA:OUT_REGS - AREA + 64])))
        rflags = struct.unpack("<Q", bytes(mem[OUT_FLAGS - AREA:OUT_FLAGS - AREA + 8]))[0]
        out = bytes(mem[DATA_ADDR - AREA:DATA_ADDR - AREA + len(data)])
        print(json.dumps({"regs": [r & 0xFFFFFFFF for r in regs], "rflags": rflags, "data": out.hex()}), flush=True)


@functools.lru_cache(maxsize=1)
def _trampolines() -> str:
    """The child's first input line: its 64-bit entry and return code."""
    import harness
    return json.dumps([harness.assemble(ENTER, bits=64).hex(), harness.assemble(LEAVE, bits=64).hex()]) + "\n"


def run_cases(cases: list[tuple[bytes, list[int], int, bytes]]) -> list[harness.Outcome]:
    """Runs each (code, regs, rflags, data) natively in compatibility mode;
    an Outcome per case (vector set, from the signal, where the CPU faulted).
    Raises RuntimeError when the child cannot start."""
    sys.path.insert(0, os.path.dirname(__file__))
    import harness
    assert (harness.CODE_ADDR, harness.DATA_ADDR) == (CODE_ADDR, DATA_ADDR)
    results: list[harness.Outcome] = []
    while len(results) < len(cases):
        todo = cases[len(results):]
        lines = _trampolines() + "".join(json.dumps({"code": c.hex(), "regs": r, "rflags": f, "data": d.hex()}) + "\n"
                        for c, r, f, d in todo)
        p = subprocess.run([sys.executable, os.path.abspath(__file__)], input=lines, capture_output=True, text=True,
                           check=False)
        got = [json.loads(x) for x in p.stdout.splitlines()]
        for g in got:
            results.append(harness.Outcome(g["regs"] + [0] * 8, g["rflags"], bytes.fromhex(g["data"])))
        if p.returncode == 0:
            continue
        if p.returncode > 0 or not got and len(results) == 0 and -p.returncode not in SIGNAL_VECTOR:
            raise RuntimeError(f"native_compat child failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        _, regs, _, data = todo[len(got)]
        results.append(harness.Outcome(list(regs), 0, data, SIGNAL_VECTOR.get(-p.returncode, -1)))
    return results


if __name__ == "__main__":
    _child()
