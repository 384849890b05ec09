"""Live migration commands (QEMU's names and arguments): migrate (uri;
blk: the drives' contents go along, migration/blocks.py),
query-migrate, migrate_cancel, migrate-set-parameters (downtime-limit in
ms, max-bandwidth in bytes/s), query-migrate-parameters, and the
MIGRATION event for every status.  The work is migration/sender.py's, on a
thread of its own so query-migrate answers while it runs.
On a destination started with `--incoming defer`, migrate-incoming (uri,
or QEMU's channels; exit-on-error, default true) starts the receiving side
(migration/incoming.py); query-status says "inmigrate" until the received
guest runs, and stays so after a failed migration that did not exit (as
QEMU: the guest is not whole, so it never runs).

After a completed migration the source stays paused with status
"postmigrate": `cont` is refused there, since the destination owns the
guest and its shared disks now (QEMU lets it through after re-activating
the disks; two running copies of one guest is what pyvmm rules out)."""

from __future__ import annotations

import threading

from ..migration.incoming import ALREADY_STARTED
from ..migration.sender import Migration, Parameters
from ..migration.uri import MigrationError, parse_uri
from .commands import COMMANDS, RUNNING_OR_PAUSED, Command, CommandError, Target, _machine, _state_call


def _params(t: Target) -> Parameters:
    params = getattr(t, "migration_params", None)
    if params is None:
        params = t.migration_params = Parameters()
    return params


def _current(t: Target) -> Migration | None:
    return getattr(t, "migration", None)


def migrate(t: Target, args: dict) -> dict:
    m = _machine(t)
    running = _current(t)
    if running is not None and running.active:
        raise CommandError("There's a migration process in progress")
    if getattr(m, "postmigrate", False):
        raise CommandError("migrate: the guest has migrated already")
    if args.get("inc"):
        raise CommandError("incremental block migration (inc) is not supported: use blk, or shared storage")
    try:
        uri = parse_uri(args["uri"])
    except MigrationError as e:
        raise CommandError(str(e)) from None
    p = _params(t)
    job = t.migration = Migration(uri, Parameters(p.downtime_limit_ms, p.max_bandwidth), t.emit,
                                  blk=bool(args.get("blk")))
    job.emit("MIGRATION", {"status": "setup"})

    def pause() -> None:
        with t.lock:
            _state_call(m.pause)
            t.emit("STOP", {})

    def resume() -> None:
        with t.lock:
            _state_call(m.resume)
            t.emit("RESUME", {})

    threading.Thread(target=job.run, args=(m, pause, resume), name="pyvmm-migrate", daemon=True).start()
    return {}


# An incoming migration's statuses while its guest is not whole: waiting,
# loading, or failed (with exit-on-error false the destination stays up).
INMIGRATE = ("none", "setup", "active", "failed")


def _uri_of_channels(channels: list) -> str:
    """QEMU's `channels` ([{"channel-type": "main", "addr": {"transport":
    "socket", "type": "inet"|"unix", ...}}]) as a URI. Raises CommandError."""
    if len(channels) != 1 or not isinstance(channels[0], dict) or channels[0].get("channel-type") != "main":
        raise CommandError("channels: exactly one channel, of channel-type 'main', is supported")
    addr = channels[0].get("addr")
    if not isinstance(addr, dict) or addr.get("transport") != "socket":
        raise CommandError("channels: only an addr with transport 'socket' is supported")
    if addr.get("type") == "unix" and isinstance(addr.get("path"), str):
        return f"unix:{addr['path']}"
    if addr.get("type") == "inet" and isinstance(addr.get("host"), str) and isinstance(addr.get("port"), str):
        return f"tcp:{addr['host']}:{addr['port']}"
    raise CommandError("channels: addr needs type 'unix' with a path, or type 'inet' with host and port strings")


def migrate_incoming(t: Target, args: dict) -> dict:
    """Starts listening for the source on a `--incoming defer` destination."""
    if ("uri" in args) == ("channels" in args):
        raise CommandError("migrate-incoming: give exactly one of 'uri' and 'channels'")
    uri = args["uri"] if "uri" in args else _uri_of_channels(args["channels"])
    job = getattr(t, "incoming", None)
    if job is None:
        raise CommandError("'-incoming' was not specified on the command line")
    if job.started:
        raise CommandError(ALREADY_STARTED)
    try:
        job.start(uri, exit_on_error=args.get("exit-on-error", True))
    except MigrationError as e:
        raise CommandError(str(e)) from None
    t.migration = job           # query-migrate reports the destination's side
    return {}


def query_migrate(t: Target, args: dict) -> dict:
    job = _current(t)
    return job.info() if job is not None else {}


def migrate_cancel(t: Target, args: dict) -> dict:
    job = _current(t)
    if job is not None and job.active:
        job.cancel()
    return {}


def migrate_set_parameters(t: Target, args: dict) -> dict:
    p = _params(t)
    for key in ("downtime-limit", "max-bandwidth"):
        if key in args and args[key] < 0:
            raise CommandError(f"Parameter '{key}' expects a non-negative value")
    if "downtime-limit" in args:
        if args["downtime-limit"] > 2_000_000:
            raise CommandError("Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 ms")
        p.downtime_limit_ms = args["downtime-limit"]
    if "max-bandwidth" in args:
        p.max_bandwidth = args["max-bandwidth"]
    return {}


def query_migrate_parameters(t: Target, args: dict) -> dict:
    p = _params(t)
    return {"downtime-limit": p.downtime_limit_ms, "max-bandwidth": p.max_bandwidth}


_cont, _query_status = COMMANDS["cont"], COMMANDS["query-status"]


def cont(t: Target, args: dict) -> dict:
    if getattr(_machine(t), "postmigrate", False):
        raise CommandError("cont: not while postmigrate (the guest runs on the migration's destination)")
    return _cont.run(t, args)


def query_status(t: Target, args: dict) -> dict:
    out = _query_status.run(t, args)
    if t.machine is not None and getattr(t.machine, "postmigrate", False):
        out = {**out, "status": "postmigrate", "running": False}
    elif out["status"] == "prelaunch" and getattr(getattr(t, "incoming", None), "status", "") in INMIGRATE:
        out = {**out, "status": "inmigrate"}     # waiting for, or loading, the source's guest
    return out


COMMANDS.update({c.name: c for c in [
    Command("migrate", migrate, RUNNING_OR_PAUSED,
            {"uri": (str, True), "detach": (bool, False), "blk": (bool, False), "inc": (bool, False)}),
    Command("migrate-incoming", migrate_incoming,
            args={"uri": (str, False), "channels": (list, False), "exit-on-error": (bool, False)}),
    Command("query-migrate", query_migrate),
    Command("migrate_cancel", migrate_cancel),
    Command("migrate-set-parameters", migrate_set_parameters,
            args={"downtime-limit": (int, False), "max-bandwidth": (int, False)}),
    Command("query-migrate-parameters", query_migrate_parameters),
    Command("cont", cont, _cont.states, _cont.args),
    Command("query-status", query_status, _query_status.states, _query_status.args),
]})
