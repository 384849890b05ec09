"""Making a machine an FT primary or backup: the config FT can run, the
wall clock pinned to the primary's, and the recorder or replayer hooked
into the bt scheduler and the console UART."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Callable

from ..config import VmConfig
from ..errors import ConfigError
from .commit import HOLD, REPLAY, OutputCommit, Writer
from .record import Recorder
from .replay import Replayer
from . import virtio as V

CONSOLE_UART = "serial0"
# Differences between primary and backup options that do not change the guest.
_LOCAL_FIELDS = {"verbose", "qmp", "block_store", "serials", "loadvm"}


def ft_config(cfg: VmConfig) -> VmConfig:
    """`cfg` as FT runs it: bt with deterministic time, no reboot, no
    paravirtual one-shot timer. Raises ConfigError for what FT cannot
    record yet (other engines, virtio-rng and -console, QMP) and for
    writable disks that are not format=raw."""
    if cfg.engine != "bt":
        raise ConfigError(f"--ft needs --engine bt (record and replay of translated code), not {cfg.engine}")
    if cfg.virtio_rng or cfg.virtio_console:
        raise ConfigError("--ft: virtio-rng and virtio-console are not recorded yet (disks and NICs are)")
    for drive in cfg.drives:     # the backup's image metadata (qcow2 tables) would go stale under the primary
        if drive.format != "raw" and not drive.readonly:
            raise ConfigError(f"--ft: drive {drive.file} needs format=raw (both members open it; "
                              "only raw images keep no metadata in the process)")
    for net in cfg.nets:         # a derived MAC skips those on the switch: the backup would see the primary's
        if net.switch is not None and not net.mac:
            raise ConfigError(f"--ft: --net switch={net.switch} needs mac=MAC (the backup must get the same one)")
    if cfg.qmp or cfg.loadvm:
        raise ConfigError("--ft: --qmp and --loadvm are not supported with fault tolerance")
    return dataclasses.replace(cfg, deterministic=True, no_reboot=True, paravirt=False)


def guest_fields(cfg: VmConfig) -> dict:
    """What of `cfg` must match between primary and backup."""
    doc = json.loads(json.dumps(cfg.to_dict()))     # as it crosses the channel: tuples become lists
    for name in _LOCAL_FIELDS:
        doc.pop(name, None)
    doc["serial_count"] = len(cfg.serials)
    return doc


def check_same_guest(mine: dict, primary: dict) -> None:
    """Raises ConfigError naming the first option where the backup differs."""
    for key in sorted(set(mine) | set(primary)):
        if mine.get(key) != primary.get(key):
            raise ConfigError(f"--ft backup: {key} differs from the primary's "
                              f"({mine.get(key)!r} here, {primary.get(key)!r} there)")


def pin_host_inputs(machine, wall_ns: int, seed: int) -> None:
    """Both sides: the wall clock and the RDRAND/RDSEED stream from the primary's values."""
    pin_wall_clock(machine, wall_ns)
    for c in machine.engine.cpus:       # engines/bt/rng.py takes c.rng when set
        c.rng = random.Random(seed * 65537 + c.index)


def pin_wall_clock(machine, wall_ns: int) -> None:
    """The guest's wall clock (CMOS RTC, kvmclock, the VMware backdoor's GETTIME) =
    wall_ns + guest time, on both sides."""
    clock = machine.devices["clock"]
    rtc = machine.devices.get("rtc")
    if rtc is not None:
        rtc.clock = lambda: (wall_ns + clock.now_ns()) / 1e9
        rtc.last_c_read = int(rtc.clock())
    backdoor = machine.devices.get("vmware_backdoor")
    if backdoor is not None:
        backdoor.wall_ns = lambda: wall_ns + clock.now_ns()
    for c in machine.engine.cpus:
        pv = getattr(c, "kvm_pv", None)
        if pv is not None:
            pv.wall_ns = lambda: wall_ns + clock.now_ns()


def _console_commit(machine, writer: Writer, mode: str, offset: int = 0) -> OutputCommit:
    """`offset`: console bytes already out (a re-protected guest's stream goes on from there)."""
    uart = machine.devices.get(CONSOLE_UART)
    if uart is None:
        raise ConfigError("--ft needs a serial console (COM1)")
    commit = OutputCommit(writer, mode)
    commit.offset = commit.released = offset
    uart.output = commit.output
    return commit


def attach_primary(machine, wall_ns: int, seed: int, send: Callable[[bytes], None], writer: Writer,
                   console_offset: int = 0) -> Recorder:
    """Makes `machine` (built, not yet run; or live, at a round top, when it
    seeded a new backup) a primary logging through `send`."""
    pin_host_inputs(machine, wall_ns, seed)
    rec = Recorder(machine, send, _console_commit(machine, writer, HOLD, console_offset))
    for name, dev in V.virtio_devices(machine):
        if isinstance(dev, V.VirtioBlock):
            member = V.PrimaryBlock(name, dev, rec.disk_answered)
        else:
            member = V.PrimaryNet(name, dev, rec.frame_in)
            rec.frame_commits.append(member.commit)
        rec.virtio.append(member)
        rec.items.append(member.commit)
    machine.engine.ft = rec
    return rec


def attach_backup(machine, wall_ns: int, seed: int, writer: Writer,
                  on_live: Callable[[], None] | None = None, console_offset: int = 0) -> Replayer:
    """Makes `machine` (built, not yet run) a backup replaying what it is fed."""
    pin_host_inputs(machine, wall_ns, seed)
    rep = Replayer(machine, _console_commit(machine, writer, REPLAY, console_offset), on_live)
    for name, dev in V.virtio_devices(machine):
        if isinstance(dev, V.VirtioBlock):
            rep.virtio[name] = V.BackupBlock(name, dev)
        else:
            rep.virtio[name] = member = V.BackupNet(name, dev)
            rep.frame_commits.append(member.commit)
    machine.engine.ft = rep
    return rep


def backup_go_live(machine, rep: Replayer) -> None:
    """The backup's devices take over the disks and the network; the MAC is announced."""
    for member in rep.virtio.values():
        member.go_live()
    if rep.frame_commits:
        V.announce_live(machine)


def host_values() -> tuple[int, int]:
    """The primary's (wall clock ns, random seed) for HELLO."""
    return time.time_ns(), random.SystemRandom().getrandbits(63)
