"""The control plane's closed set of commands, each with the run states it
may be given in (Firecracker's VmmAction, QMP's run-state rules).

A command is a function of a `Target` (what it acts on) and its checked
arguments, returning plain data. It raises `CommandError` with a QMP error
class; a command given in a state it does not allow raises it with
GenericError and a one-line "cont: not while running" (runstate.require's
wording). Protocol adapters (qmp.py) only translate to and from the wire.

Commands may block (stop waits for every vCPU to park), so callers run
them on a thread of their own, never on the event loop: Machine.pause must
not be called while holding the machine's lock, which loop callbacks hold."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__
from ..errors import StateError, VmmError
from ..machine import Machine, StopReason
from ..runstate import RunState, require

# QMP's error classes (qapi/error.json); the rest map to GenericError.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

RUNNING_OR_PAUSED = (RunState.RUNNING, RunState.PAUSED)
ANY_STATE = tuple(RunState)

# Why a SHUTDOWN was asked for, by who asked (QMP's ShutdownCause names).
QUIT_DETAIL = "qmp quit"
RESET_DETAIL = "qmp system_reset"


class CommandError(VmmError):
    """A command that failed; `error_class` is its QMP error class."""

    def __init__(self, message: str, error_class: str = GENERIC_ERROR):
        super().__init__(message)
        self.error_class = error_class


@dataclass
class Target:
    """What commands act on: the current machine (None between a reset and
    the rebuilt machine) and a way to announce events."""
    name: str | None = None
    emit: Callable[[str, dict], None] = lambda event, data: None
    machine: Machine | None = None
    # Serialises commands: the state a command checked stays true while it acts.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Background jobs by id (jobs.py); they outlive a reset's rebuilt machine.
    jobs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[Target, dict], Any]
    states: tuple[RunState, ...] = ANY_STATE
    # argument name -> (Python type, required)
    args: dict[str, tuple[type, bool]] = field(default_factory=dict)


def _machine(t: Target) -> Machine:
    if t.machine is None:
        raise CommandError("the machine is being rebuilt (reset); try again", DEVICE_NOT_ACTIVE)
    return t.machine


def refuse_while_migrating(t: Target, command: str) -> None:
    """QEMU's rule: what changes the device set or loads another state
    waits until a live migration (api/migration.py's t.migration) is over,
    or the destination would get a state its devices do not match."""
    job = getattr(t, "migration", None)
    if job is not None and job.active:
        raise CommandError(f"{command} not allowed while migrating")


def _status_name(m: Machine) -> str:
    """QMP's RunState names for pyvmm's states."""
    if m.state is RunState.STOPPED or m.stopping:
        return "shutdown"
    return {RunState.CONFIGURED: "prelaunch", RunState.RUNNING: "running",
            RunState.PAUSED: "paused"}[m.state]


# -- the commands ------------------------------------------------------------------
def query_version(t: Target, args: dict) -> dict:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"pyvmm {__version__}"}


def query_status(t: Target, args: dict) -> dict:
    m = _machine(t)
    status = _status_name(m)
    return {"status": status, "running": status == "running", "singlestep": False}


def query_name(t: Target, args: dict) -> dict:
    return {"name": t.name} if t.name else {}


def query_kvm(t: Target, args: dict) -> dict:
    m = _machine(t)
    return {"enabled": m.config.engine in ("hw", "hybrid"), "present": os.access("/dev/kvm", os.R_OK | os.W_OK)}


def query_cpus_fast(t: Target, args: dict) -> list[dict]:
    m = _machine(t)
    threads = [th.native_id for th in getattr(m.engine, "_threads", []) if th.native_id]
    cpus = []
    for i in range(m.config.cpus):
        cpus.append({"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                     "thread-id": threads[i] if i < len(threads) else os.getpid(),
                     "props": {"core-id": 0, "thread-id": 0, "socket-id": i}, "target": "x86_64"})
    return cpus


def stop(t: Target, args: dict) -> dict:
    _state_call(_machine(t).pause)
    t.emit("STOP", {})
    return {}


def cont(t: Target, args: dict) -> dict:
    _state_call(_machine(t).resume)
    t.emit("RESUME", {})
    return {}


def system_reset(t: Target, args: dict) -> dict:
    """A host reset: the runner rebuilds the machine (or, with --no-reboot,
    ends the run, as QEMU's -no-reboot does)."""
    m = _machine(t)
    m.request_stop(StopReason.RESET, RESET_DETAIL)   # parked vCPUs see it too
    return {}


def system_powerdown(t: Target, args: dict) -> dict:
    """Presses the ACPI power button; the guest's ACPI decides what to do
    (a guest without ACPI ignores it, as on QEMU)."""
    m = _machine(t)
    pm = m.devices.get("acpi_pm")
    if pm is None:
        raise CommandError("this machine has no ACPI power button")
    with m.lock:
        pm.press_power_button()
    t.emit("POWERDOWN", {})
    return {}


def quit_(t: Target, args: dict) -> dict:
    m = _machine(t)
    m.request_stop(StopReason.USER, QUIT_DETAIL)   # parked vCPUs see it too
    return {}


def human_monitor_command(t: Target, args: dict) -> str:
    """One HMP command line; its output (errors too, as QEMU's monitor
    prints them) is the return value."""
    line = " ".join(args["command-line"].split())
    word = line.split(" ", 1)[0]
    key = " ".join(line.split(" ", 2)[:2]) if word == "info" else word.split("/", 1)[0]
    handler = HMP_COMMANDS.get(key)
    if handler is None:
        # As QEMU's monitor: an unknown command is output, not a QMP error.
        return f"unknown command: '{line}' (pyvmm's monitor knows: {', '.join(sorted(HMP_COMMANDS))})\r\n"
    rest = line[len(key):].strip() if word == "info" else line[len(word):].strip()
    try:
        return handler(t, word, rest)
    except VmmError as e:
        return f"Error: {e}\r\n"


def hmp_info_status(t: Target, word: str, rest: str) -> str:
    """QEMU's wording: "running", "paused", or "paused (STATE)" for any
    other stopped state (prelaunch, inmigrate, postmigrate, shutdown).
    Read from the registry's query-status, which migration overrides."""
    info = COMMANDS["query-status"].run(t, {})
    state = "running" if info["running"] else "paused"
    if not info["running"] and info["status"] != "paused":
        state += f" ({info['status']})"
    return f"VM status: {state}\r\n"


# HMP commands by name ("info X" for info): fn(target, first word, the rest) -> output.
HMP_COMMANDS: dict[str, Callable[[Target, str, str], str]] = {"info status": hmp_info_status}


def _state_call(action: Callable[[], None]) -> None:
    try:
        action()
    except StateError as e:
        raise CommandError(str(e)) from None


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("query-version", query_version),
    Command("query-status", query_status),
    Command("query-name", query_name),
    Command("query-kvm", query_kvm),
    Command("query-cpus-fast", query_cpus_fast, RUNNING_OR_PAUSED),
    Command("stop", stop, (RunState.RUNNING,)),
    Command("cont", cont, (RunState.PAUSED,)),
    Command("system_reset", system_reset, RUNNING_OR_PAUSED),
    Command("system_powerdown", system_powerdown, (RunState.RUNNING,)),
    Command("quit", quit_),
    Command("human-monitor-command", human_monitor_command,
            args={"command-line": (str, True), "cpu-index": (int, False)}),
]}

_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array"}


def check_arguments(command: Command, args: dict) -> None:
    """Raises CommandError (GenericError, QEMU's wording) for arguments the
    command does not take, lacks or gets with the wrong type."""
    for key, value in args.items():
        if key not in command.args:
            raise CommandError(f"Parameter '{key}' is unexpected")
        kind = command.args[key][0]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CommandError(f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES[kind]}")
    for key, (_, required) in command.args.items():
        if required and key not in args:
            raise CommandError(f"Parameter '{key}' is missing")


def execute(target: Target, name: str, args: dict) -> Any:
    """Runs one command: looks it up, checks arguments and run state, runs
    it. Blocks (stop waits for the vCPUs). Raises CommandError."""
    command = COMMANDS.get(name)
    if command is None:
        raise CommandError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
    check_arguments(command, args)
    with target.lock:
        if command.states != ANY_STATE:
            m = _machine(target)
            state = RunState.STOPPED if m.stopping else m.state
            try:
                require(state, name, *command.states)
            except StateError as e:
                raise CommandError(str(e)) from None
        try:
            return command.run(target, args)
        except CommandError:
            raise
        except VmmError as e:
            raise CommandError(str(e)) from None
