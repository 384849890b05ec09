"""The machine's run state and pause/resume (pyvmm/runstate.py,
Machine.run/pause/resume, each engine's pause() and resume()).

- Commands check the state: configured -> running <-> paused -> stopped,
  and a command in the wrong state fails with a one-line StateError.
- Assembled guests paused and resumed many times at random moments from
  another thread end with the same result as unpaused runs (bt, hybrid:
  the user/kernel guest against its Python model; hw: the SSE guest
  against bt, on one vCPU and on two with KVM's in-kernel irqchip, where
  the second vCPU's thread is blocked inside KVM_RUN waiting for a SIPI;
  and two bt vCPUs, one halted, one summing).
- While paused, a vCPU's state reads the same twice and guest time stands
  still: across a pause the guest clock advances by at most the time the
  machine ran, never by the time it was paused.
- Under hw with KVM's in-kernel irqchip the PIT does not count while
  paused: the ticks of a one-second pause do not reach the guest after it.
- A Linux guest paused twenty times while a shell loop runs keeps its
  workload and its clock: tests/linux_pauses.py, run on the bt and hybrid
  boots of tests/devices/test_virtio_linux.py (no boot of its own)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.errors import StateError
from pyvmm.machine import Machine, StopReason
from pyvmm.runstate import RunState

from .modeguests import (CHECKPOINT_PORT, CODE, boot_for, expected_user_result, sse_guest, user_guest,
                         user_result)
from .rawguest import build_guest, require_kvm

PAUSED_S = 0.02          # each pause lasts this long: long enough that a leak into guest time shows
CLOCK_SLACK_NS = 2_000_000


class Background:
    """machine.run() in a thread, with whatever it raised."""

    def __init__(self, machine: Machine, timeout: float = 120.0):
        self.machine = machine
        self.error: BaseException | None = None
        self.timer = threading.Timer(timeout, machine.request_stop, args=(StopReason.USER, "test timeout"))
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.timer.start()
        self.thread.start()
        deadline = time.monotonic() + 10
        while machine.state is RunState.CONFIGURED and time.monotonic() < deadline:
            time.sleep(0.001)

    def _main(self) -> None:
        try:
            self.machine.run()
        except BaseException as e:  # re-raised by join() in the test's thread
            self.error = e

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        self.timer.cancel()
        assert not self.thread.is_alive(), "run() did not return"
        if self.error is not None:
            raise self.error


class Checkpoint:
    """Port device for the SSE guest: counts rounds, stops the machine at `stop_at`."""

    def __init__(self, machine: Machine, stop_at: int):
        self.machine, self.stop_at, self.seen = machine, stop_at, 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen += 1
        if self.seen == self.stop_at:
            self.machine.request_stop(StopReason.USER, f"checkpoint {self.seen}")


class StartGate:
    """Port device the guest spins on before its work (gated()): reads 0
    until open(). The first half of the pauses land in that spin, however
    fast the host runs the work itself; the rest land in the work."""

    def __init__(self):
        self.opened = False

    def read(self, offset: int, size: int) -> int:
        return int(self.opened)

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def open(self) -> None:
        self.opened = True


START_PORT = 0xE2
SPIN_AT = 0x180000        # free in modeguests' layout, inside its identity map
SPIN = """
.intel_syntax noprefix
1:  in al, START_PORT
    test al, al
    jz 1b
    xor eax, eax
    push CODE
    ret
"""


def gated(machine_boot):
    """A modeguests boot callable that first spins on StartGate's port."""
    stub = build_guest(SPIN.replace("START_PORT", hex(START_PORT)).replace("CODE", hex(CODE)), "long")

    def boot(memory):
        result = machine_boot(memory)
        memory.write(SPIN_AT, stub)
        result.cpu.rip = SPIN_AT
        return result
    return boot


def gate_machine(cfg: VmConfig, machine_boot) -> tuple[Machine, StartGate]:
    m = build_machine(cfg, lambda b: None, boot=gated(machine_boot))
    start = StartGate()
    m.io_bus.insert(START_PORT, 1, start, "start-gate")
    return m, start


def guest_ns(machine: Machine) -> int | None:
    """The guest's time now: the bt platform clock, or kvmclock under hw."""
    engine = machine.engine
    if engine.name == "hw":
        return engine.kvm_clock()
    clock = engine.bt.clock if engine.name == "hybrid" else engine.clock
    return clock.now_ns()


def pause_at_random(machine: Machine, rng: random.Random, cycles: int, run_max_s: float,
                    start: StartGate | None = None) -> int:
    """Pauses and resumes `machine` up to `cycles` times, each after running
    a random 0..run_max_s, checking in each pause that vCPU 0's state reads
    the same twice and that guest time did not count earlier pauses; opens
    `start` halfway. Returns how many pauses happened before the guest ended."""
    done = 0
    last: tuple[int, float] | None = None     # guest ns at the last pause, host time resume began
    for n in range(cycles):
        if start is not None and n == cycles // 2:
            start.open()
        time.sleep(rng.uniform(0, run_max_s))
        try:
            machine.pause()
        except StateError:
            assert machine.stop_status is not None, "pause failed on a running machine"
            break
        paused_at = time.monotonic()
        assert machine.state is RunState.PAUSED
        g = guest_ns(machine)
        first = machine.engine.save_state(0)
        time.sleep(PAUSED_S)
        assert machine.engine.save_state(0) == first          # nothing ran meanwhile
        if last is not None and g is not None:
            ran_ns = (paused_at - last[1]) * 1e9
            assert 0 <= g - last[0] <= ran_ns + CLOCK_SLACK_NS, (g - last[0], ran_ns)
        if g is not None:
            last = (g, time.monotonic())
        machine.resume()
        assert machine.state is RunState.RUNNING or machine.stop_status is not None
        done += 1
    return done


def test_commands_check_the_run_state():
    m = build_machine(VmConfig(mem_mib=64, engine="bt", irqchip=False, no_reboot=True), lambda b: None,
                      boot=boot_for(user_guest(1_000_000, 2000)))
    try:
        def refused(command, words):
            with pytest.raises(StateError) as e:
                command()
            assert str(e.value) == words and "\n" not in str(e.value)

        assert m.state is RunState.CONFIGURED
        refused(m.pause, "pause: not while configured")
        refused(m.resume, "resume: not while configured")
        bg = Background(m)
        assert m.state is RunState.RUNNING
        refused(m.run, "run: not while running")
        refused(m.resume, "resume: not while running")
        m.pause()
        assert m.state is RunState.PAUSED
        refused(m.pause, "pause: not while paused")
        refused(m.run, "run: not while paused")
        m.resume()
        assert m.state is RunState.RUNNING
        m.pause()
        m.request_stop(StopReason.USER, "stopped while paused")    # wakes the parked vCPUs
        bg.join(10)
        assert m.state is RunState.STOPPED
        assert m.stop_status.detail == "stopped while paused"
        for name in ("pause", "resume", "run"):
            refused(getattr(m, name), f"{name}: not while stopped")
        m.clear_stop()                                  # migrate.py's way back to a runnable machine
        assert m.state is RunState.CONFIGURED
    finally:
        destroy_machine(m)


@pytest.mark.parametrize("engine", ["bt", pytest.param("hybrid", marks=pytest.mark.kvm)])
def test_user_guest_paused_at_random_ends_as_unpaused(engine):
    if engine == "hybrid":
        require_kvm()
    args = (120, 6000, 7) if engine == "bt" else (800, 500, 7)
    m, start = gate_machine(VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True),
                            boot_for(user_guest(*args)))
    try:
        bg = Background(m)
        pauses = pause_at_random(m, random.Random(15), 40, 0.01, start)
        bg.join()
        assert m.stop_status.reason is StopReason.HALTED, m.stop_status
        assert user_result(m.engine.save_state(0).regs) == expected_user_result(*args)
        assert pauses >= 20
    finally:
        destroy_machine(m)


def _sse_result(m: Machine) -> tuple:
    st = m.engine.save_state(0)
    return st.regs["rbx"], st.regs["rsi"], st.fxsave[160:192], st.fxsave[24:28]


def _sse_machine(engine: str, cpus: int = 1, irqchip: bool = False) -> tuple[Machine, Checkpoint, StartGate]:
    rounds, blocks = 3, 48
    cfg = VmConfig(mem_mib=64, engine=engine, cpus=cpus, irqchip=irqchip, no_reboot=True)
    m, start = gate_machine(cfg, boot_for(sse_guest(rounds, blocks)))
    cp = Checkpoint(m, rounds)       # with the irqchip the final hlt never exits: stop at the last round
    m.io_bus.insert(CHECKPOINT_PORT, 1, cp, "checkpoint")
    return m, cp, start


@pytest.mark.kvm
@pytest.mark.parametrize("cpus, irqchip", [(1, False), (2, True)])
def test_hw_sse_guest_paused_at_random_ends_as_unpaused_bt(cpus, irqchip):
    require_kvm()
    ref, _, ref_start = _sse_machine("bt")
    ref_start.open()
    try:
        Background(ref).join()
        expected = _sse_result(ref)
    finally:
        destroy_machine(ref)
    m, cp, start = _sse_machine("hw", cpus, irqchip)
    try:
        bg = Background(m)
        pauses = pause_at_random(m, random.Random(cpus), 30, 0.03, start)
        bg.join()
        assert cp.seen == 3, m.stop_status
        assert _sse_result(m) == expected
        assert pauses >= 15
    finally:
        destroy_machine(m)


# Two vCPUs under bt: the BSP wakes the AP (INIT, SIPI) and halts with
# interrupts off; the AP sums 1..AP_ROUNDS in real mode, stores it and
# ends the run through the debug-exit port. The pauses land while one vCPU
# sits halted with interrupts off and the other runs (nothing may take that
# for "every vCPU halted for good").
AP_ROUNDS = 600_000
AP_SUM = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    xor %ebx, %ebx
    xor %esi, %esi
    mov $ROUNDS, %ecx
1:  add %ecx, %ebx
    adc $0, %esi
    dec %ecx
    jnz 1b
    mov %ebx, 0x5000
    mov %esi, 0x5004
    mov $0xf4, %dx
    mov $0x10, %al
    out %al, %dx
    hlt
"""
BSP_WAKES_AP_AND_HALTS = """
    movl $0x1ff, 0xfee000f0          # SVR: APIC software-enabled
    movl $(1 << 24), 0xfee00310      # ICR high: destination APIC id 1
    movl $0x4500, 0xfee00300         # INIT
    movl $0x4608, 0xfee00300         # SIPI, vector 8 -> 0x8000
    cli
1:  hlt
    jmp 1b
"""


def test_two_bt_vcpus_paused_at_random_end_as_unpaused():
    from pathlib import Path

    from .asm import assemble
    from .rawguest import raw_boot
    ap = Path(assemble(".code16\n" + AP_SUM.replace("ROUNDS", str(AP_ROUNDS)), fmt="bin",
                       org=0x8000)).read_bytes()
    cfg = VmConfig(mem_mib=64, engine="bt", cpus=2, debug_exit=(0xF4, 1), no_reboot=True)
    m = build_machine(cfg, lambda b: None, boot=raw_boot(build_guest(BSP_WAKES_AP_AND_HALTS, "prot"), "prot",
                                                         {0x8000: ap}))
    try:
        bg = Background(m)
        pauses = pause_at_random(m, random.Random(2), 40, 0.01)
        bg.join()
        assert m.stop_status.reason is StopReason.DEBUG_EXIT, m.stop_status
        assert m.memory.read_u64(0x5000) == AP_ROUNDS * (AP_ROUNDS + 1) // 2
        assert pauses >= 10, f"the guest ended after {pauses} pauses: make it longer"
    finally:
        destroy_machine(m)


# -- hw with the in-kernel irqchip: the PIT does not count while paused ----------------

PIT_HZ = 100                    # modeguests.PIT_10MS
TICK_PAUSE_S = 1.0
TICK_RUN_S = 0.5

# Counts PIT ticks (IRQ 0 through the in-kernel 8259) in EBX forever.
TICK_COUNTER = """
    xor ebx, ebx
    sti
1:  hlt
    jmp 1b
common:
    push rax
    mov rax, [rsp + 8]
    cmp eax, 0x20
    jne 2f
    inc ebx
2:  mov al, 0x20
    out 0x20, al
    pop rax
    add rsp, 16
    iretq
"""


def _ticks(m: Machine) -> int:
    return m.engine.save_state(0).regs["rbx"] & 0xFFFFFFFF


@pytest.mark.kvm
def test_hw_pit_ticks_do_not_pile_up_across_a_pause():
    """KVM's in-kernel PIT runs on host time: left alone, the ticks it could
    not deliver during a pause reach the guest right after (KVM re-injects
    missed ticks), a second of them for a one-second pause. pause() saves
    the PIT and kvmclock and resume() loads them back, so the guest counts
    only the ticks of the time it ran."""
    require_kvm()
    from .modeguests import IDT_STUBS, PIC_INIT, PIT_10MS, idt_setup
    src = (".intel_syntax noprefix\n    cli\n" + idt_setup(0x180000) + PIC_INIT
           + "    mov al, 0xfe; out 0x21, al; mov al, 0xff; out 0xa1, al\n" + PIT_10MS + TICK_COUNTER + IDT_STUBS)
    cfg = VmConfig(mem_mib=64, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda b: None, boot=boot_for(build_guest(src, "long")))
    try:
        bg = Background(m, timeout=60)
        time.sleep(0.3)
        m.pause()
        before, clock_before = _ticks(m), m.engine.kvm_clock()
        assert before > 0, "the guest counted no tick"
        time.sleep(TICK_PAUSE_S)
        m.resume()
        resumed = time.monotonic()
        time.sleep(TICK_RUN_S)
        m.pause()
        ran_s = time.monotonic() - resumed
        after, clock_after = _ticks(m), m.engine.kvm_clock()
        m.resume()
        m.request_stop(StopReason.USER, "test ended")
        bg.join()
    finally:
        destroy_machine(m)
    ticks = after - before
    print(f"{ticks} ticks in {ran_s:.3f} s run after a {TICK_PAUSE_S} s pause; "
          f"kvmclock {(clock_after - clock_before) / 1e6:.1f} ms")
    assert ticks >= ran_s * PIT_HZ / 4, f"the guest hardly ticked: {ticks} in {ran_s:.3f} s"
    assert ticks <= ran_s * PIT_HZ + PIT_HZ * TICK_PAUSE_S / 5, (
        f"{ticks} ticks in {ran_s:.3f} s of running: the pause's ticks came after it")
    if clock_before is not None:
        assert clock_after - clock_before <= (ran_s + 0.05) * 1e9
