"""build_machine(config): the one place that wires memory, buses, devices,
firmware tables, the boot image and the engine together."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

from .boot import layout
from .boot.result import BootResult
from .bus import Bus
from .config import MIB, VmConfig, parse_serial
from .engines.base import Engine
from .errors import ConfigError
from .irq import IrqLine
from .loop import EventLoop
from .machine import Machine, StopReason
from .memory import GuestMemory

log = logging.getLogger(__name__)

# The PC board: where each legacy device sits and which ISA IRQ it drives.
COM1_PORT, COM1_IRQ = 0x3F8, 4
# COM1..COM4: the PC's I/O ports and ISA IRQs for the UARTs of config.serials.
SERIAL_PORTS = ((COM1_PORT, COM1_IRQ), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))
I8042_BASE, I8042_IRQ_KBD, I8042_IRQ_AUX = 0x60, 1, 12
RTC_PORT, RTC_IRQ = 0x70, 8
POST_PORT = 0x80
FW_CFG_PORT, FW_CFG_LENGTH = 0x510, 12

Output = Callable[[bytes], None]


# Engines whose kernel-mode code is bt's: they get bt's boot preparation and
# its Python platform devices (PIC, PIT, APICs, guest clock).
BT_PLATFORM_ENGINES = ("bt", "hybrid")


def create_engine(machine: Machine) -> Engine:
    """The engine named by machine.config.engine."""
    name = machine.config.engine
    if name == "hw":
        from .engines.kvm.engine import KvmEngine
        return KvmEngine(machine)
    if name == "bt":
        from .engines.bt.engine import BtEngine
        return BtEngine(machine)
    if name == "hybrid":
        from .engines.hybrid.engine import HybridEngine
        return HybridEngine(machine)
    raise ConfigError(f"unknown engine {name!r}")


def _irq(machine: Machine, gsi: int) -> IrqLine:
    # The sink looks the engine up at call time: devices exist before it does.
    return IrqLine(gsi, lambda g, level: machine.engine.set_irq(g, level) if machine.engine else None)


def _serial_sink(machine: Machine, spec: str, console: Output) -> Output:
    """Where a UART's output goes: the console, nowhere, or a file (opened
    for appending now, closed with the machine). Raises ConfigError."""
    kind, path = parse_serial(spec)
    if kind == "stdio":
        return console
    if kind == "null":
        return lambda data: None
    try:
        f = open(path, "ab", buffering=0)
    except OSError as e:
        raise ConfigError(f"serial port file {path}: {e.strerror or e}") from None
    machine.closers.append(f.close)
    return f.write


def add_legacy_devices(machine: Machine, output: Output) -> None:
    """UART, keyboard controller, RTC, POST port and the optional test devices."""
    from .devices.legacy.debug_exit import DebugExit
    from .devices.legacy.i8042 import I8042
    from .devices.legacy.port80 import Port80
    from .devices.legacy.rtc import Rtc
    from .devices.legacy.serial8250 import Serial8250

    cfg, io = machine.config, machine.io_bus
    for i, spec in enumerate(cfg.serials):
        port, irq = SERIAL_PORTS[i]
        uart = Serial8250(_irq(machine, irq), _serial_sink(machine, spec, output))
        io.insert(port, 8, uart, f"serial{i}")
        machine.devices[f"serial{i}"] = uart

    def on_reset() -> None:
        machine.request_stop(StopReason.RESET, "i8042 reset")

    kbd = I8042(on_reset, _irq(machine, I8042_IRQ_KBD), _irq(machine, I8042_IRQ_AUX))
    for offset, length, part in kbd.ranges():  # two ports: 0x61 between them is the PIT's
        io.insert(I8042_BASE + offset, length, part, "i8042")
    rtc = Rtc(mem_size_bytes=cfg.mem_mib * MIB,
              below_4g_bytes=sum(n for start, n in machine.memory.ram_ranges() if start < 1 << 32))
    io.insert(RTC_PORT, 2, rtc, "rtc")
    post = Port80()
    io.insert(POST_PORT, 1, post, "post")
    machine.devices.update(i8042=kbd, rtc=rtc, post=post)
    if cfg.debug_exit is not None:
        base, size = cfg.debug_exit

        def on_exit(code: int) -> None:
            # The device reports QEMU's status (v << 1) | 1; the machine keeps v.
            machine.request_stop(StopReason.DEBUG_EXIT, f"isa-debug-exit code {code}", value=code >> 1)

        debug_exit = DebugExit(on_exit, size)
        io.insert(base, size, debug_exit, "debug-exit")
        machine.devices["debug_exit"] = debug_exit


def add_firmware(machine: Machine) -> None:
    """Tables that tell the guest about CPUs and interrupt routing, plus fw_cfg
    and the ACPI power-management block."""
    from .boot import mptable
    cfg = machine.config
    from .boot import acpi
    from .devices import acpi_pm, fw_cfg
    from .devices.virtio.install import wants_pci
    from .devices.pci.aml import pci_root_aml
    from .devices.pci.host import ECAM_BASE
    from .boot.acpi_hotplug import pci_hotplug_aml
    pci = wants_pci(cfg) or bool(getattr(cfg, "ide_drives", None))
    dsdt_pci = pci_root_aml() + pci_hotplug_aml() if pci else b""
    if not cfg.bios:     # a BIOS writes its own tables where these would go
        mptable.write_mptable(machine.memory, cfg.cpus)
        acpi.write_acpi_tables(machine.memory, cfg.cpus, dsdt_pci,
                               (acpi.build_mcfg(ECAM_BASE, 0, 0),) if pci else ())

    def on_poweroff() -> None:
        machine.request_stop(StopReason.POWEROFF, "ACPI poweroff")

    clock = machine.devices.get("clock")   # the bt platform's guest clock
    pm = acpi_pm.AcpiPm(on_poweroff=on_poweroff, sci=_irq(machine, acpi.SCI_IRQ),
                        **({"clock": (lambda: clock.now_ns() / 1e9)} if clock is not None else {}))
    machine.io_bus.insert(acpi_pm.PM_BASE, acpi_pm.PM_LENGTH, pm, "acpi-pm")
    machine.devices["acpi_pm"] = pm
    if pci:              # ACPI PCI hotplug: the registers the DSDT's slot methods use
        from .devices.pcihotplug import HOTPLUG_BASE, HOTPLUG_GPE, HOTPLUG_LENGTH, PciHotplug
        hotplug = PciHotplug(raise_gpe=lambda: pm.raise_gpe(HOTPLUG_GPE))
        machine.io_bus.insert(HOTPLUG_BASE, HOTPLUG_LENGTH, hotplug, "pci-hotplug")
        machine.devices["pci_hotplug"] = hotplug
    files = []
    for name, path in cfg.fw_cfg_files:
        try:
            with open(path, "rb") as f:
                files.append((name, f.read()))
        except OSError as e:
            raise ConfigError(f"--fw-cfg {name}: {path}: {e.strerror}") from None
    if cfg.bios:     # the same tables, for the firmware to place (boot/acpi_loader.py)
        from .boot.acpi_loader import acpi_files
        from .boot.firmware import firmware_files
        taken = {name for name, _ in files}
        tables = acpi_files(cfg.cpus, dsdt_pci,
                            (acpi.build_mcfg(ECAM_BASE, 0, 0),) if pci else ())
        files += [f for f in firmware_files(machine.memory, cfg) + tables if f[0] not in taken]
    linux: dict = {"cmdline": cfg.cmdline}
    if cfg.bios and cfg.kernel:      # the firmware boots it, from fw_cfg (boot/linuxboot.py)
        from .boot.linuxboot import linuxboot_fw_cfg
        low_ram = sum(n for start, n in machine.memory.ram_ranges() if start < 1 << 32)
        linux, rom_files = linuxboot_fw_cfg(cfg, low_ram)
        files += rom_files
    fwc = fw_cfg.FwCfg(ram_size=cfg.mem_mib * MIB, cpus=cfg.cpus, files=files, memory=machine.memory,
                       **linux)
    machine.io_bus.insert(FW_CFG_PORT, FW_CFG_LENGTH, fwc, "fw_cfg")
    machine.devices["fw_cfg"] = fwc


def _add_bios_chipset(machine: Machine) -> None:
    """What a BIOS expects of the board beyond the devices: a PCI host
    bridge (even with no PCI device) with its PAM registers."""
    from .devices.pci.host import attach_host_bridge
    from .devices.pci.pam import enable_pam
    bridge = machine.devices.get("pci_host")
    if bridge is None:
        bridge = attach_host_bridge(machine.io_bus, machine.mmio_bus)
        machine.devices["pci_host"] = bridge
    enable_pam(bridge.host, machine.memory)
    bridge.on_reset = lambda: machine.request_stop(StopReason.RESET, "PCI reset control (port 0xcf9)")


def fit_guest(config: VmConfig) -> VmConfig:
    """A copy of config adjusted to what this host's engine can run."""
    if config.engine != "hw" or not config.fit_guest_to_host:
        return config
    from .engines.kvm import hostfit
    if not hostfit.kernel_mode_emulated():
        return config
    hide = list(config.cpuid_hide) + [f for f in hostfit.CPUID_HIDE if f not in config.cpuid_hide]
    extra = " ".join(filter(None, (config.linux_cmdline_extra, hostfit.LINUX_PARAMS)))
    return dataclasses.replace(config, cpuid_hide=hide, linux_cmdline_extra=extra)


def build_machine(config: VmConfig, output: Output,
                  boot: Callable[[GuestMemory], BootResult] | None = None) -> Machine:
    """Builds a ready-to-run Machine.

    `boot` replaces the kernel loader (tests use it to place raw code).
    Raises VmmError subclasses for bad configs, images or hosts."""
    config.validate()
    config = fit_guest(config)
    from .devices.virtio.install import with_mmio_cmdline
    config = with_mmio_cmdline(config)   # virtio_mmio.device= for --transport mmio
    cleanup = None
    if config.engine in BT_PLATFORM_ENGINES:
        from .engines.bt.bootprep import prepare
        config, cleanup = prepare(config)   # kernel parameters, host-side initrd inflate
    memory = GuestMemory(config.mem_mib * MIB)
    lock = threading.RLock()
    several = config.cpus > 1
    machine = Machine(config, memory, Bus("io", lock, several), Bus("mmio", lock, several), lock)
    machine.loop = EventLoop(lock, name="pyvmm-events")
    try:
        add_legacy_devices(machine, output)
        if config.engine in BT_PLATFORM_ENGINES:
            from .engines.bt.platform import make_platform
            make_platform(machine)   # PIC, PIT, IOAPIC, local APICs and the guest clock
        add_firmware(machine)
        from .devices.virtio.install import attach as attach_virtio
        attach_virtio(machine, lambda gsi: _irq(machine, gsi), output)   # PCI bus 0 and its virtio devices
        from .devices.ide.install import attach as attach_ide
        attach_ide(machine, lambda gsi: _irq(machine, gsi))   # --drive ...,if=ide: PIIX IDE, primary master
        if config.bios:
            _add_bios_chipset(machine)
        if boot is None and config.bios:
            from .boot.firmware import load_bios
            result = load_bios(memory, config)
        elif boot is None:
            from .boot.loader import load_guest
            result = load_guest(memory, config)
        else:
            result = boot(memory)
        machine.boot_protocol = result.protocol
        log.info("boot: %s: %s", result.protocol, result.summary)
        machine.engine = create_engine(machine)
        machine.engine.prepare()
        machine.devices.update(machine.engine.platform_devices())   # e.g. KVM's in-kernel irqchip
        from .devices.virtio.kvm_eventfds import attach_eventfds
        attach_eventfds(machine)   # hw: virtio notifies by ioeventfd, MSI-X by irqfd
        from .paravirt.install import attach as attach_paravirt
        attach_paravirt(machine)
        if getattr(config, "vmware_backdoor", False):
            from .devices.vmware_install import attach as attach_vmware_backdoor
            attach_vmware_backdoor(machine)   # ports 0x5658/0x5659, docs/vmware-backdoor.md
        machine.engine.load_state(0, result.cpu)
    except BaseException:
        if machine.engine is not None:
            machine.engine.close()
        machine.loop.close()
        for close in machine.closers:
            close()
        memory.close()
        raise
    finally:
        if cleanup is not None:
            cleanup()
    machine.loop.start()
    return machine


def destroy_machine(machine: Machine) -> None:
    """Releases the engine, devices with threads of their own, and guest RAM."""
    if machine.loop is not None:
        machine.loop.close()    # no callback runs once the devices go
    if machine.engine is not None:
        machine.engine.close()
    pv = machine.devices.get("paravirt")
    if pv is not None:
        pv.close()  # cancels a pending one-shot timer
    for close in machine.closers:
        close()
    from .devices.virtio.install import close as close_virtio
    close_virtio(machine)   # disk images
    machine.memory.close()


__all__ = ["build_machine", "destroy_machine", "create_engine", "layout"]
