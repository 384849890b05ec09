"""Inspection commands (api/inspect.py): query-block, query-pci, and HMP's
info registers / info block / info pci / x / xp, on the counter guest
in-process and, for page-table walks, on hand-built page tables."""

from __future__ import annotations


from pyvmm.config import DriveConfig
from pyvmm.cpu import CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, CpuState
from pyvmm.memory import GuestMemory
from pyvmm.storage.create import create_image

from .counterguest import COUNTER, CounterVm

import pytest


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "d.qcow2"
    create_image(str(path), "qcow2", 2 << 20)
    machine = CounterVm("bt", [DriveConfig(file=str(path), id="disk0"),
                               DriveConfig(file=str(path), id="ro0", readonly=True)])
    machine.wait_counts(1)
    machine.qmp("stop")
    yield machine
    machine.close()


def test_registers_match_the_engine(vm):
    st = vm.machine.engine.save_state(0)
    text = vm.hmp("info registers")
    lines = text.split("\r\n")
    assert lines[0] == " ".join(f"{n}={st.regs[k] & 0xFFFFFFFF:08x}"
                                for n, k in (("EAX", "rax"), ("EBX", "rbx"), ("ECX", "rcx"), ("EDX", "rdx")))
    assert lines[2].startswith(f"EIP={st.rip:08x} EFL={st.rflags:08x} [")
    assert f"CS ={st.cs.selector:04x} {st.cs.base:08x} {st.cs.limit:08x}" in text
    assert f"CR0={st.cr0:08x}" in text and text.endswith(f"EFER={st.efer:016x}\r\n")
    assert vm.hmp("info registers -a").startswith("CPU#0\r\n")
    assert vm.hmp("info registers -c 7").startswith("Error: CPU 7 does not exist")


def test_memory_dumps(vm):
    mem = vm.machine.memory
    mem.write(0x300000, bytes(range(32)))
    assert vm.hmp("xp /4xb 0x300000") == "0000000000300000: 0x00 0x01 0x02 0x03\r\n"
    assert vm.hmp("xp /5xw 0x300000") == ("0000000000300000: 0x03020100 0x07060504 0x0b0a0908 0x0f0e0d0c\r\n"
                                          "0000000000300010: 0x13121110\r\n")
    assert vm.hmp("xp/2xg 0x300008") == "0000000000300008: 0x0f0e0d0c0b0a0908 0x1716151413121110\r\n"
    assert vm.hmp("xp /1dw 0x300000") == "0000000000300000: 50462976\r\n"
    # Paging is off in this guest: virtual is physical.
    assert vm.hmp(f"x /1xw {COUNTER:#x}") == vm.hmp(f"xp /1xw {COUNTER:#x}")
    assert int(vm.hmp(f"x /1xw {COUNTER:#x}").split()[1], 16) == mem.read_u32(COUNTER)
    assert vm.hmp("xp /1xw 0x7fffffff0").startswith("Error: Cannot access memory")
    assert vm.hmp("xp /1q 0").startswith("Error: invalid format")


def test_block_and_pci(vm):
    block = vm.qmp("query-block")
    assert [(b["device"], b["inserted"]["ro"], b["inserted"]["drv"]) for b in block] == [
        ("disk0", False, "qcow2"), ("ro0", True, "qcow2")]
    assert block[0]["inserted"]["image"]["virtual-size"] == 2 << 20
    devices = vm.qmp("query-pci")[0]["devices"]
    assert devices[0]["slot"] == 0 and devices[0]["class_info"]["class"] == 0x0600     # the host bridge
    disk = next(d for d in devices if d["qdev_id"] == "disk0")
    assert disk["id"]["vendor"] == 0x1AF4 and disk["class_info"]["class"] in (0x0100, 0x0180)
    assert disk["regions"] and all(r["size"] > 0 for r in disk["regions"])
    info_pci = vm.hmp("info pci")
    assert 'id "disk0"' in info_pci and 'id "ro0"' in info_pci and "BAR" in info_pci
    info_block = vm.hmp("info block")
    assert info_block.startswith("disk0: ") and "ro0: " in info_block and "read-only" in info_block


def test_page_walks():
    from pyvmm.api.inspect import translate
    mem = GuestMemory(16 << 20)
    # 4-level: 0x7f0000401000 -> 0x5000 by 4 KiB page; 0x7f0000600000 + x -> 0xa00000 + x by a 2 MiB page.
    va = 0x7F0000401000
    mem.write_u64(0x1000 + ((va >> 39) & 0x1FF) * 8, 0x2000 | 3)
    mem.write_u64(0x2000 + ((va >> 30) & 0x1FF) * 8, 0x3000 | 3)
    mem.write_u64(0x3000 + ((va >> 21) & 0x1FF) * 8, 0x4000 | 3)
    mem.write_u64(0x4000 + ((va >> 12) & 0x1FF) * 8, 0x5000 | 3)
    mem.write_u64(0x3000 + 3 * 8, 0xA00000 | 0x83)
    st = CpuState(cr0=CR0_PG | 1, cr3=0x1000, cr4=CR4_PAE, efer=EFER_LMA | EFER_LME)
    assert translate(mem, st, va + 0x123) == 0x5123
    assert translate(mem, st, 0x7F0000600000 + 0x1234) == 0xA01234
    with pytest.raises(Exception, match="Cannot access memory"):
        translate(mem, st, 0x7F0000402000)
    # 32-bit two-level: 0x80001000 -> 0x9000.
    mem.write_u32(0x6000 + (0x80001000 >> 22) * 4, 0x7000 | 3)
    mem.write_u32(0x7000 + 1 * 4, 0x9000 | 3)
    assert translate(mem, CpuState(cr0=CR0_PG | 1, cr3=0x6000), 0x80001abc) == 0x9ABC
