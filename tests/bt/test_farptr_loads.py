"""lds/les/lfs/lgs/lss under bt, in real mode as BIOS and boot-loader code
uses them (SYSLINUX's boot sector loads a far pointer with lfs): the offset
and the selector land, the segment's base follows, and KVM's real-mode
emulation agrees."""

from __future__ import annotations

import pytest

from tests.rawguest import build_guest, require_kvm, run_raw

SOURCE = """
    cli
    lds %cs:p1, %si
    les %cs:p2, %di
    lfs %cs:p3, %bx
    lgs %cs:p4, %cx
    lss %cs:p5, %sp
    lfsl %cs:p6, %eax      # 32-bit offset: m16:32
    mov %fs:0, %dx         # through the new FS base
    hlt
p1: .word 0x5678, 0x1234
p2: .word 0x9ABC, 0x2000
p3: .word 0x0004, 0x07C0   # FS:BX = 07C0:0004
p4: .word 0x1111, 0x3000
p5: .word 0x7000, 0x0600
p6: .long 0xCAFEF00D
    .word 0x07C0           # FS base 0x7C00: the guest's own first bytes
"""

EXPECTED = {"rsi": 0x5678, "rdi": 0x9ABC, "rbx": 0x0004, "rcx": 0x1111, "rsp": 0x7000,
            "rax": 0xCAFEF00D}
SEGMENTS = {"ds": 0x1234, "es": 0x2000, "gs": 0x3000, "ss": 0x0600, "fs": 0x07C0}


def _run(engine: str):
    run = run_raw(build_guest(SOURCE, "real"), "real", engine=engine, timeout=20)
    return run.state


def _facts(st) -> dict:
    out = {r: st.regs[r] & 0xFFFFFFFF for r in EXPECTED}
    out["rdx"] = st.regs["rdx"] & 0xFFFF
    for name in SEGMENTS:
        seg = getattr(st, name)
        out[name] = (seg.selector, seg.base)
    return out


def test_far_pointer_loads_real_mode_bt():
    st = _run("bt")
    facts = _facts(st)
    for reg, value in EXPECTED.items():
        assert facts[reg] == value, reg
    for name, sel in SEGMENTS.items():
        assert facts[name] == (sel, sel << 4), name
    assert facts["rdx"] == 0x2EFA       # cli; cs prefix: read through the new FS base


@pytest.mark.kvm
def test_far_pointer_loads_agree_with_kvm():
    require_kvm()
    assert _facts(_run("bt")) == _facts(_run("hw"))
