"""What installers of guest interfaces ask of an engine (engines/base.py):
CPUID leaves, clock rates, the hypercall path, the calling vCPU's registers,
platform devices.  The installers (paravirt/install.py,
devices/vmware_install.py) branch on none of the engines' names."""

from __future__ import annotations

import types

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.devices import vmware_install
from pyvmm.engines.base import Engine
from pyvmm.errors import EngineError
from pyvmm.loop import EventLoop
from pyvmm.memory import GuestMemory
from pyvmm.paravirt import abi
from pyvmm.paravirt import install as paravirt_install
from tests.rawguest import raw_boot

HLT = b"\xf4"


class BareEngine(Engine):
    """An engine that offers nothing beyond the abstract interface."""
    name = "bare"

    def prepare(self): pass
    def set_irq(self, gsi, level): pass
    def load_state(self, cpu, state): pass
    def save_state(self, cpu): raise NotImplementedError
    def run(self): pass
    def kick(self): pass


def test_defaults_say_not_offered():
    eng = BareEngine(types.SimpleNamespace(config=VmConfig()))
    with pytest.raises(EngineError, match="bare engine cannot add CPUID leaves"):
        eng.add_cpuid_leaves({0x40000000: (0, 0, 0, 0)})
    with pytest.raises(EngineError, match="bare engine cannot report CPUID"):
        eng.cpuid_leaf(0)
    assert eng.guest_clock_hz() == (0, 0)
    assert eng.attach_hypercalls(object(), abi.MSR_HYPERCALL_PAGE) is False
    assert eng.port_caller(frozenset({0x5658})) is None
    assert eng.platform_devices() == {} and not eng.shadows_guest_page_tables()


def test_installers_refuse_an_engine_that_offers_nothing():
    loop = EventLoop()
    machine = types.SimpleNamespace(config=VmConfig(), devices={}, memory=GuestMemory(1 << 20),
                                    loop=loop, lock=loop.lock)
    machine.engine = BareEngine(machine)
    try:
        with pytest.raises(EngineError, match="vmware backdoor: engine 'bare' not supported"):
            vmware_install.attach(machine)
        assert paravirt_install.attach(machine) is None and "paravirt" not in machine.devices
    finally:
        loop.close()
        machine.memory.close()


@pytest.mark.parametrize("engine", ["bt", "hw"])
def test_cpuid_leaves_stack_and_later_wins(engine):
    m = build_machine(VmConfig(mem_mib=32, engine=engine), lambda data: None, boot=raw_boot(HLT, "prot"))
    try:
        eng = m.engine
        pyvmm_sig = eng.cpuid_leaf(abi.CPUID_BASE)          # paravirt/install.py added it
        assert pyvmm_sig == abi.cpuid_leaves()[abi.CPUID_BASE]
        eng.add_cpuid_leaves({0x40000300: (1, 2, 3, 4)})
        eng.add_cpuid_leaves({0x40000300: (5, 6, 7, 8)})
        assert eng.cpuid_leaf(0x40000300) == (5, 6, 7, 8)
        assert eng.cpuid_leaf(abi.CPUID_BASE) == pyvmm_sig  # earlier leaves kept
        tsc_hz, bus_hz = eng.guest_clock_hz()
        assert tsc_hz > 0 and bus_hz > 0
        assert eng.port_caller(frozenset()) is not None
    finally:
        destroy_machine(m)


@pytest.mark.parametrize("engine", ["bt", "hw"])
def test_vmware_timing_leaf_from_the_engines_clock(engine):
    m = build_machine(VmConfig(mem_mib=32, engine=engine, vmware_backdoor=True), lambda data: None,
                      boot=raw_boot(HLT, "prot"))
    try:
        tsc_hz, bus_hz = m.engine.guest_clock_hz()
        assert m.engine.cpuid_leaf(vmware_install.CPUID_TIMING)[:2] == (tsc_hz // 1000, bus_hz // 1000)
        assert m.engine.cpuid_leaf(abi.CPUID_BASE) == abi.cpuid_leaves(
            features=paravirt_install.features_for(m.engine.shadows_guest_page_tables()))[abi.CPUID_BASE]
    finally:
        destroy_machine(m)


def test_hw_platform_device_only_with_the_irqchip():
    from tests.hostfacts import require_kvm
    require_kvm()
    for irqchip, names in ((True, {"kvm_platform"}), (False, set())):
        m = build_machine(VmConfig(mem_mib=32, irqchip=irqchip), lambda data: None, boot=raw_boot(HLT, "prot"))
        try:
            assert set(m.engine.platform_devices()) == names
            assert ("kvm_platform" in m.devices) == irqchip
        finally:
            destroy_machine(m)
