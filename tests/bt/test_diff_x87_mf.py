"""x87 #MF against the real CPU (KvmOracle: CPL3 under KVM runs natively,
CR0.NE set): an unmasked x87 exception is not raised by the instruction
that causes it but stays pending (FSW.ES) and raises #MF before the next
waiting x87 instruction; FNSTSW, FNSTCW, FNSTENV, FNCLEX and FNINIT do not
wait, FWAIT does; the instruction with an unmasked IE/DE/ZE neither
stores nor pops.  Compared: the exception, its RIP, and the status word
(TOP, condition codes, ES, SF and the flags) that FNSTSW AX records."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from kvm_oracle import KvmOracle, kvm_usable  # noqa: E402

_why = kvm_usable()
if _why is not None:
    pytest.skip(f"no usable /dev/kvm: {_why}", allow_module_level=True)
from tests.hostfacts import require_from_setup  # noqa: E402
require_from_setup(programs=["as"], package="binutils")
pytestmark = pytest.mark.kvm

CW_AT = 0x3F0
FSW_EXC = 0xFFFF          # the whole status word: TOP, C0-C3, ES, SF and the flags
# FCW with one exception unmasked: ZM (bit 2), IM (bit 0), OM (bit 3), PM (bit 5)
UNMASK = {"z": 0x37B, "i": 0x37E, "o": 0x377, "p": 0x35F, "none": 0x37F}
CAUSE = {"z": "fld1\nfldz\nfdivp st(1), st", "i": "fld1\nfchs\nfsqrt",
         "o": "fld tbyte ptr [rbp + 0x100]\nfmul st, st(0)\nfstp dword ptr [rbp + 0x120]", "p": "fld1\nfld1\nfld1\nfaddp\nfdivp"}
# What follows the cause: (text, whether the CPU must stop with #MF there)
NEXT = ["fld1", "fnstsw ax\nfld1", "fnstcw [rbp + 0x140]\nfnstsw ax\nfwait", "fnstenv [rbp + 0x180]\nfldz",
        "fnclex\nfld1", "fninit\nfld1", "fnstsw ax\nfldcw [rbp + 0x3F0]", "fnstsw ax\nfxch", "nop\nfnop",
        "fnstsw ax\nfcomp st(1)", "mov eax, 5\nfild dword ptr [rbp + 0x150]"]


def cases() -> list[str]:
    out = []
    for kind in UNMASK:
        for nxt in NEXT:
            cause = CAUSE["z" if kind == "none" else kind]
            out.append(f"fninit\nfldcw [rbp + {CW_AT}]\n{cause}\n{nxt}\nfnstsw ax\nfninit")
    return out


def test_pending_x87_exceptions_raise_mf_where_the_cpu_does():
    kvm = KvmOracle()
    bts = [harness.BtOracle(), harness.BtOracle(harness.COLD)]
    for o in bts:
        o.state.cr0 |= 0x20                       # NE, as the KVM oracle's CR0
        o.state.cr4 |= 1 << 9 | 1 << 10
    texts = cases()
    bad, faults = [], 0
    try:
        for text, code in zip(texts, harness.assemble_many(texts)):
            for kind, cw in UNMASK.items():
                page = bytearray(harness.DATA_SIZE)
                page[CW_AT:CW_AT + 2] = cw.to_bytes(2, "little")
                page[0x100:0x10A] = (0x7FFE << 64 | 1 << 63).to_bytes(10, "little")   # huge: overflows
                page[0x150:0x154] = (7).to_bytes(4, "little")
                regs = [0] * 16
                regs[4], regs[5] = harness.STACK_TOP, harness.DATA_ADDR
                want = kvm.run(code, regs, 2, bytes(page))
                faults += want.vector == 16
                for o in bts:
                    got = o.run(code, regs, 2, bytes(page))
                    if (got.vector, got.rip if got.vector else 0, got.regs[0] & FSW_EXC) != \
                            (want.vector, want.rip if want.vector else 0, want.regs[0] & FSW_EXC):
                        bad.append(f"cw={cw:#x} {text!r}: bt {got.vector}@{got.rip:#x} ax={got.regs[0] & 0xFFFF:#x}, "
                                   f"cpu {want.vector}@{want.rip:#x} ax={want.regs[0] & 0xFFFF:#x}")
    finally:
        kvm.close()
    assert faults >= 20                           # the CPU really raised #MF in many of them
    assert not bad, f"{len(bad)} differ:\n" + "\n".join(bad[:20])
