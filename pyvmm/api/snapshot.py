"""Snapshot commands: QMP's snapshot-save / snapshot-load / snapshot-delete
as jobs (QEMU >= 6.0 arguments: job-id, tag, vmstate, devices), query-jobs
and job-dismiss, and HMP's savevm / loadvm / delvm / info snapshots.

The work is snapshot/savevm.py's; this module stops the vCPUs around it
(STOP and RESUME events, as QEMU emits them around a snapshot job) and
turns its errors into QMP and HMP output."""

from __future__ import annotations

from typing import Callable

from ..runstate import RunState
from ..snapshot import savevm
from .commands import (COMMANDS, HMP_COMMANDS, RUNNING_OR_PAUSED, Command, CommandError, Target, _machine,
                       _state_call, refuse_while_migrating)
from .hotplug import bind_ejects
from .jobs import job_dismiss, query_jobs, start_job


def stopped_for(t: Target, action: Callable[[], None]) -> None:
    """Runs `action` with the vCPUs stopped, then lets a machine that was
    running go on (STOP ... RESUME, as QEMU's savevm and loadvm)."""
    m = _machine(t)
    was_running = m.state is RunState.RUNNING and not m.stopping
    if was_running:
        _state_call(m.pause)
        t.emit("STOP", {})
    try:
        action()
    finally:
        if was_running and m.state is RunState.PAUSED:
            _state_call(m.resume)
            t.emit("RESUME", {})


def _devices(args: dict) -> list[str]:
    devices = args["devices"]
    if not all(isinstance(d, str) for d in devices):
        raise CommandError("Invalid parameter type for 'devices', expected: array of strings")
    return devices


def snapshot_save(t: Target, args: dict) -> dict:
    tag, drive, devices = args["tag"], args["vmstate"], _devices(args)
    start_job(t, args["job-id"], "snapshot-save",
              lambda: stopped_for(t, lambda: savevm.save_vm(_machine(t), tag, drive, devices)))
    return {}


def snapshot_load(t: Target, args: dict) -> dict:
    tag, drive, devices = args["tag"], args["vmstate"], _devices(args)
    refuse_while_migrating(t, "snapshot-load")
    start_job(t, args["job-id"], "snapshot-load",
              lambda: stopped_for(t, lambda: _loaded(t, savevm.load_vm(_machine(t), tag, drive, devices))))
    return {}


def _loaded(t: Target, result=None):
    """After a load: the devices it plugged back (device_add's, hotplugged.py)
    get their block nodes and netdevs named and their ejects handled here."""
    bind_ejects(t)
    return result


def snapshot_delete(t: Target, args: dict) -> dict:
    tag, devices = args["tag"], _devices(args)
    start_job(t, args["job-id"], "snapshot-delete", lambda: savevm.delete_vm(_machine(t), tag, devices))
    return {}


def _file_call(t: Target, action: Callable[[], object]) -> object:
    """Runs a snapshot-file action with the vCPUs stopped; its errors as QMP errors."""
    from ..errors import VmmError
    out: list = []
    try:
        stopped_for(t, lambda: out.append(action()))
    except CommandError:
        raise
    except VmmError as e:                      # VmStateError, and the host refusing a mapping
        raise CommandError(str(e)) from None
    return out[0]


def snapshot_file_save(t: Target, args: dict) -> dict:
    """pyvmm's x-snapshot-file-save {path, type: full|diff}: the whole VM
    into one file (snapshot/file.py), synchronously."""
    from ..snapshot.file import save_file
    kind = args.get("type", "full")
    if kind not in ("full", "diff"):
        raise CommandError("Parameter 'type' does not accept value '%s' (full or diff)" % kind)
    return _file_call(t, lambda: save_file(_machine(t), args["path"], diff=kind == "diff"))


def snapshot_file_load(t: Target, args: dict) -> dict:
    """pyvmm's x-snapshot-file-load {path}: the running or paused VM takes
    the state of a snapshot file, its RAM mapped lazily from the file."""
    from ..snapshot.file import load_file
    refuse_while_migrating(t, "x-snapshot-file-load")
    took = _file_call(t, lambda: _loaded(t, load_file(_machine(t), args["path"], bool(args.get("verify", False)))))
    return {"load-ms": round(took * 1e3, 3)}


# -- HMP ----------------------------------------------------------------------------------
def _tag(word: str, rest: str, default: str | None = None) -> str:
    if not rest and default is None:
        raise CommandError(f"Parameter 'name' is missing (usage: {word} TAG)")
    return rest or default


def hmp_savevm(t: Target, word: str, rest: str) -> str:
    import time
    tag = _tag(word, rest, time.strftime("vm-%Y%m%d%H%M%S"))
    stopped_for(t, lambda: savevm.save_vm(_machine(t), tag, replace=True))
    return ""


def hmp_loadvm(t: Target, word: str, rest: str) -> str:
    tag = _tag(word, rest)
    refuse_while_migrating(t, "loadvm")
    stopped_for(t, lambda: _loaded(t, savevm.load_vm(_machine(t), tag)))
    return ""


def hmp_delvm(t: Target, word: str, rest: str) -> str:
    savevm.delete_vm(_machine(t), _tag(word, rest))
    return ""


def hmp_info_snapshots(t: Target, word: str, rest: str) -> str:
    return savevm.info_snapshots(_machine(t))


SNAPSHOT_ARGS = {"job-id": (str, True), "tag": (str, True), "vmstate": (str, True), "devices": (list, True)}

COMMANDS.update({c.name: c for c in [
    Command("snapshot-save", snapshot_save, RUNNING_OR_PAUSED, SNAPSHOT_ARGS),
    Command("snapshot-load", snapshot_load, RUNNING_OR_PAUSED, SNAPSHOT_ARGS),
    Command("snapshot-delete", snapshot_delete, RUNNING_OR_PAUSED,
            {"job-id": (str, True), "tag": (str, True), "devices": (list, True)}),
    Command("x-snapshot-file-save", snapshot_file_save, RUNNING_OR_PAUSED, {"path": (str, True), "type": (str, False)}),
    Command("x-snapshot-file-load", snapshot_file_load, RUNNING_OR_PAUSED, {"path": (str, True), "verify": (bool, False)}),
    Command("query-jobs", query_jobs),
    Command("job-dismiss", job_dismiss, args={"id": (str, True)}),
]})
HMP_COMMANDS.update({"savevm": hmp_savevm, "loadvm": hmp_loadvm, "delvm": hmp_delvm,
                     "info snapshots": hmp_info_snapshots})
