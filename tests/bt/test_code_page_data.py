"""Data on a page of translated code (bt, shadow.PageGuard.writes_code):
only a write to bytes that translations were made from drops the page's
blocks.  Real-mode programs such as SYSLINUX and the BIOS keep their
variables beside their code; dropping the page at each such store made
them retranslate all the time.  Stores to the code itself still take
effect at once, from the vCPU and from a device alike."""

from __future__ import annotations

from tests.rawguest import build_guest, run_raw

LOOPS = 3000

# A counter two bytes from the loop's own instructions, on the same page.
DATA_BESIDE_CODE = f"""
    mov ${LOOPS}, %ecx
1:  incl counter
    loop 1b
    mov counter, %eax
    shr $4, %eax                  # 3000 >> 4 = 187: fits the exit port's byte
    out %al, $0xF4
    hlt
counter: .long 0
"""

# Self-modifying code: the loop rewrites the immediate of an instruction
# it runs later in the same block, then of one it ran before.
PATCHES_AHEAD_AND_BEHIND = """
    xor %ebx, %ebx
    mov $5, %ecx
1:  movb $7, ahead + 1            # `mov $imm8, %al`: its immediate byte
ahead:
    mov $1, %al
    movzbl %al, %eax
    add %eax, %ebx                # 7 per pass once patched (the store is before it)
    loop 1b
    movb $9, behind + 1
behind:
    mov $1, %al
    movzbl %al, %eax
    add %eax, %ebx                # + 9
    mov %bl, %al
    out %al, $0xF4                # 5 * 7 + 9 = 44
    hlt
"""


def _cpu(run):
    return run.machine.engine.cpus[0]


def test_stores_beside_code_do_not_drop_its_translations():
    run = run_raw(build_guest(DATA_BESIDE_CODE, "prot"), "prot", engine="bt", debug_exit=(0xF4, 1))
    assert run.status.reason.value == "debug-exit", run.status
    assert run.status.value == LOOPS >> 4
    cpu = _cpu(run)
    # Before: every incl was an SMC restart and a page's worth of retranslation.
    assert cpu.smc_restarts < 5 and cpu.translator.invalidated < 5, (cpu.smc_restarts, cpu.translator.invalidated)


def test_stores_to_code_still_take_effect():
    run = run_raw(build_guest(PATCHES_AHEAD_AND_BEHIND, "prot"), "prot", engine="bt", debug_exit=(0xF4, 1))
    assert run.status.reason.value == "debug-exit", run.status
    assert run.status.value == 44
    assert _cpu(run).smc_restarts >= 1


def test_a_device_write_drops_blocks_only_where_it_touches_code():
    from pyvmm.config import VmConfig
    from tests.rawguest import raw_boot, run_machine
    code = build_guest(DATA_BESIDE_CODE, "prot")
    page, counter = 0x100000 >> 12, 0x100000 + len(code) - 4

    def device_writes(machine):
        t, memory = machine.engine.cpus[0].translator, machine.memory
        seen = [page in t.pages, t.invalidated]
        memory.write(counter, b"\0\0\0\0")              # the variable: no code there
        seen += [page in t.pages, t.invalidated]
        memory.write(0x100000, code[:1])                  # the first instruction's byte
        return seen + [page in t.pages, t.invalidated]
    cfg = VmConfig(mem_mib=64, engine="bt", debug_exit=(0xF4, 1), no_reboot=True)
    machine, _ = run_machine(cfg, raw_boot(code, "prot"), inspect=device_writes)
    had, n0, kept, n1, still, n2 = machine.inspected
    assert had and kept and n1 == n0, machine.inspected
    assert not still and n2 > n1, machine.inspected
