"""Guest state beyond RAM and device records across a move: what saving
the devices writes into guest RAM travels with the guest, so do the
guest's KVM paravirtual registrations (kvmclock, PV EOI), and a hybrid
destination keeps the user code of a guest booted under bt in bt.

The local APIC settles a PV-EOI flag the guest has not cleared yet when it
is saved: it clears the flag in guest RAM and keeps the vector in service
for the real EOI to come.  Were that write made after the last dirty pass,
the destination's guest would find its flag still set, skip the EOI, and
the vector (the timer's, typically) would stay in service for ever: the
Linux guest that hung after bt -> hybrid.  In-process, deterministic: the
flag is set by hand at the moment the source pauses."""

from __future__ import annotations

import io
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.engines.bt import kvmpv
from pyvmm.engines.bt.kvmpv import PvEoiFlag
from pyvmm.machine import StopReason
from pyvmm.migration.receiver import load_stream
from pyvmm.migration.sender import Migration, Parameters
from pyvmm.migration.uri import parse_uri

from tests.api.counterguest import SOURCE, counts
from tests.hostfacts import require_kvm
from tests.rawguest import build_guest, raw_boot
from tests.migration.test_stream import Recorder

FLAG_GPA = 0x300000          # pages the counter guest never touches
PVTI_GPA, EOI_GPA = 0x301000, 0x302000
VECTOR = 0xEC                # Linux's local timer vector


def _machine(output: bytearray, engine: str = "bt"):
    cfg = VmConfig(mem_mib=16, engine=engine, no_reboot=True)
    return build_machine(cfg, output.extend, boot=raw_boot(build_guest(SOURCE, "prot"), "prot"))


def _migrate(tmp_path, at_pause, engine: str = "bt") -> bytes:
    """A counter guest's stream, with at_pause(source) run once it paused."""
    out = bytearray()
    src = _machine(out, engine)
    thread = threading.Thread(target=src.run, daemon=True)
    thread.start()

    def pause() -> None:
        src.pause()
        at_pause(src)

    try:
        deadline = time.monotonic() + 30
        while len(counts(out)) < 2:
            assert time.monotonic() < deadline, bytes(out[-80:])
            time.sleep(0.01)
        rec = Recorder(str(tmp_path / "dest.sock"))
        job = Migration(parse_uri(f"unix:{tmp_path / 'dest.sock'}"),
                        Parameters(downtime_limit_ms=300, max_bandwidth=0))
        job.run(src, pause, src.resume)
        assert job.status == "completed", job.error
        rec.thread.join(10)
        return bytes(rec.data)
    finally:
        src.request_stop(StopReason.USER)
        thread.join(30)
        destroy_machine(src)


def test_a_pv_eoi_flag_settled_at_save_reaches_the_destination(tmp_path):
    def inside_the_handler(src) -> None:
        # The moment a timer interrupt went in with the flag set and the
        # guest's handler has not reached its EOI yet.
        lapic = src.devices["intc"].lapics[0]
        lapic.set_pv_eoi(PvEoiFlag(src.memory, FLAG_GPA))
        lapic.isr |= 1 << VECTOR
        src.memory.write_u8(FLAG_GPA, 1)
        lapic.pv_eoi_vector = VECTOR
    data = _migrate(tmp_path, inside_the_handler)
    dest = _machine(bytearray())
    try:
        load_stream(dest, io.BytesIO(data))
        # The guest will see a clear flag and write the EOI register; the
        # vector is still in service until then.
        assert dest.memory.read_u8(FLAG_GPA) == 0
        assert dest.devices["intc"].lapics[0].isr >> VECTOR & 1
    finally:
        destroy_machine(dest)


@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_kvm_registrations_and_the_tsc_go_along(tmp_path, engine):
    def register(src) -> None:
        src.engine.cpus[0].tsc_offset = 1_000_000_000     # as after a wrmsr to IA32_TSC
        pv = src.engine.cpus[0].kvm_pv
        assert pv.write_msr(kvmpv.MSR_SYSTEM_TIME, PVTI_GPA | 1)
        assert pv.write_msr(kvmpv.MSR_PV_EOI_EN, EOI_GPA | 1)
    data = _migrate(tmp_path, register)
    if engine == "hybrid":
        require_kvm()
    dest = _machine(bytearray(), engine)
    try:
        load_stream(dest, io.BytesIO(data))
        c = getattr(dest.engine, "bt", dest.engine).cpus[0]
        assert c.tsc_offset == 1_000_000_000
        assert c.kvm_pv.msrs == {kvmpv.MSR_SYSTEM_TIME: PVTI_GPA | 1, kvmpv.MSR_PV_EOI_EN: EOI_GPA | 1}
        assert c.lapic.pv_eoi is not None and c.lapic.pv_eoi.gpa == EOI_GPA
        assert c.cpuid.lookup(kvmpv.CPUID_FEATURES_LEAF, 0)[0] == kvmpv.FEATURES
        # The record the source wrote still gives the destination's clock.
        record = dest.memory.read(PVTI_GPA, kvmpv.PVTI.size)
        guest_ns = kvmpv.pvclock_ns(record, c.clock.tsc() + c.tsc_offset)
        assert abs(guest_ns - c.clock.now_ns()) < 1_000_000
        # and the next update goes on from the guest's version number
        version = dest.memory.read_u32(PVTI_GPA)
        c.kvm_pv.update_clock()
        assert dest.memory.read_u32(PVTI_GPA) == version + 2
    finally:
        destroy_machine(dest)


@pytest.mark.parametrize("source, user_in_kvm", [("bt", False), ("hybrid", True)])
def test_hybrid_runs_user_code_under_kvm_only_for_a_guest_booted_as_hybrid(tmp_path, source, user_in_kvm):
    # A kernel booted under bt has a TSC clocksource its vDSO reads from
    # user mode; under KVM here that rdtsc reads the host's counter.
    require_kvm()
    data = _migrate(tmp_path, lambda src: None, source)
    dest = _machine(bytearray(), "hybrid")
    try:
        load_stream(dest, io.BytesIO(data))
        assert dest.engine.user_in_kvm is user_in_kvm
    finally:
        destroy_machine(dest)
