"""Running a VM to its end: console wiring, reboots, stats."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .builder import build_machine, destroy_machine
from .config import VmConfig
from .costs import Costs, machine_report
from .errors import ConfigError, GuestCrash
from .machine import Machine, StopReason, StopStatus

log = logging.getLogger(__name__)

MAX_REBOOTS = 100  # a guest that resets in a loop is ended, not run forever


@dataclass
class RunResult:
    status: StopStatus
    stats: dict = field(default_factory=dict)
    reboots: int = 0


def collect_stats(machine: Machine, seconds: float) -> dict:
    """The --stats report: "costs" has the same keys under every engine
    (costs.py); "engine" keeps the engine's own counters."""
    io, mmio = machine.io_bus.stats(), machine.mmio_bus.stats()
    engine = machine.engine
    costs = engine.costs() if engine is not None else Costs()
    return {
        "mode": getattr(machine, "mode", None) or machine.config.engine,
        "costs": machine_report(costs, io, mmio, seconds),
        "engine": engine.stats() if engine else {},
        "io": io,
        "mmio": mmio,
        "boot_protocol": machine.boot_protocol,
        "wall_seconds": round(seconds, 6),
        "stop": machine.stop_status.reason.value if machine.stop_status else None,
    }


def run_vm(config: VmConfig, console, on_machine: Callable[[Machine], None] | None = None,
           on_serving: Callable[[Machine, object], None] | None = None) -> RunResult:
    """Builds and runs the VM until it powers off, exits, crashes or the user
    quits; a guest reset rebuilds the machine unless config.no_reboot.
    on_machine(machine) runs on each built machine before anything else
    sees it; on_serving(machine, qmp_target or None) once its QMP sockets
    answer, just before it runs (`--incoming defer` waits there).

    `console` provides write(bytes), start(feed, on_quit) and close().
    Raises VmmError subclasses (GuestCrash when the engine cannot go on)."""
    current: list[Machine] = []

    def feed(data: bytes) -> None:
        if current:
            hvc0 = getattr(current[0], "console_feed", None)
            uart = current[0].devices.get("serial0")
            if hvc0 is not None:            # --virtio-console stdio: keyboard to hvc0
                hvc0(data)
            elif uart is not None:          # console input goes to COM1
                uart.receive(data)

    def on_quit() -> None:
        if current:
            current[0].request_stop(StopReason.USER, "user quit")

    reboots = 0
    console_started = False
    qmp = None
    try:
        if config.qmp:
            from .api.endpoint import parse_endpoint
            from .api.qmp import QmpServer
            qmp = QmpServer([parse_endpoint(spec) for spec in config.qmp])
        while True:
            machine = build_machine(config, console.write)
            current[:] = [machine]
            if config.loadvm and reboots == 0:
                _load_snapshot(machine, config.loadvm)
            if on_machine is not None:
                on_machine(machine)
            if not console_started:
                console.start(feed, on_quit, machine.loop)
                console_started = True
            else:
                console.attach(machine.loop)    # the rebooted machine's loop
            if qmp is not None:
                qmp.attach(machine)
                if reboots == 0:
                    qmp.wait_for_client()
            start = time.perf_counter()
            try:
                if on_serving is not None:
                    on_serving(machine, qmp.target if qmp is not None else None)
                machine.run()
            except GuestCrash:
                raise
            finally:
                if qmp is not None:
                    qmp.detach()
                stats = collect_stats(machine, time.perf_counter() - start)
                destroy_machine(machine)
            status = machine.stop_status
            if status.reason is StopReason.RESET and not config.no_reboot and reboots < MAX_REBOOTS:
                reboots += 1
                log.info("guest reset (%s): rebooting", status.detail)
                if qmp is not None:
                    qmp.emit_in_order("RESET", reset_event(status))
                continue
            if qmp is not None:
                qmp.emit_in_order("SHUTDOWN", shutdown_event(status))
            return RunResult(status, stats, reboots)
    finally:
        if qmp is not None:
            qmp.close()
        console.close()


def _load_snapshot(machine: Machine, tag: str) -> None:
    """--loadvm: the built machine takes the snapshot's state before it
    first runs. Raises ConfigError (the machine is destroyed)."""
    from .snapshot.savevm import SnapshotError, load_vm
    try:
        load_vm(machine, tag)
    except SnapshotError as e:
        destroy_machine(machine)
        raise ConfigError(f"--loadvm {tag}: {e}") from None


def reset_event(status: StopStatus) -> dict:
    """QMP's RESET event data for a reset that reboots the machine."""
    from .api.commands import RESET_DETAIL
    host = status.detail == RESET_DETAIL
    return {"guest": not host, "reason": "host-qmp-system-reset" if host else "guest-reset"}


def shutdown_event(status: StopStatus) -> dict:
    """QMP's SHUTDOWN event data (its ShutdownCause names) for how a run ended."""
    from .api.commands import QUIT_DETAIL, RESET_DETAIL
    if status.reason is StopReason.USER:
        host = "host-qmp-quit" if status.detail == QUIT_DETAIL else "host-ui"
        return {"guest": False, "reason": host}
    if status.reason is StopReason.RESET:
        if status.detail == RESET_DETAIL:
            return {"guest": False, "reason": "host-qmp-system-reset"}
        return {"guest": True, "reason": "guest-reset"}
    if status.reason is StopReason.HALTED:
        return {"guest": True, "reason": "guest-panic"}
    return {"guest": True, "reason": "guest-shutdown"}


def write_stats_json(path: str, result: RunResult, config: VmConfig, exit_code: int) -> None:
    """The --stats-json report; `exit_code` is what the CLI made of the stop."""
    doc = {"config": config.to_dict(), "stop": {"reason": result.status.reason.value,
                                                 "code": exit_code, "detail": result.status.detail},
           "reboots": result.reboots, **result.stats}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
