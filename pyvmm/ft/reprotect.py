"""Re-protection, the live side: a member running without a backup (a
backup gone live, or a primary whose backup died) seeds a new one and
becomes its primary.

While unprotected, the live member dials its --ft-channel every DIAL_S.
A new backup started there with `--ft-seed` answers; at the next round top
(on the vCPU thread, so the guest is stopped between rounds) the live
member writes the SEED record and then sends its whole state the way live
migration does (migration/sender.py's Migration: RAM, vCPUs, devices).
Once the backup has loaded it, a fresh Recorder logs from that same
position, and the backup replays from there: output commit, heartbeats
and failover work as for a pair started together.

Console input always enters through a Recorder (an "alone" one, which logs
nothing, while unprotected), so no byte reaches the guest between the
state being taken and the log starting.  Virtio disks and NICs are first
brought to a point with nothing in flight (seedpoint.py); the frames held
meanwhile go to the new Recorder."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time

from ..errors import VmmError
from ..migration.sender import Migration, Parameters
from ..migration.uri import MigrationError
from . import channel as C
from . import log as L
from .commit import Writer
from .failover import ALONE, PRIMARY, FtLock
from .record import Recorder, position
from .seedpoint import SeedPoint
from .setup import CONSOLE_UART, attach_primary, guest_fields

logger = logging.getLogger(__name__)

DIAL_S = 0.5
SEND_TIMEOUT_S = 10     # a new backup that stops reading must not hold the stopped guest for ever


def alone_recorder(machine, commit) -> Recorder:
    """A Recorder with no backup: it applies console input at round tops and logs nothing."""
    rec = Recorder(machine, lambda data: None, commit)
    rec.alone = rec.ended = True
    return rec


def why_not(machine) -> str | None:
    """Why `machine` cannot seed a backup, or None."""
    if machine.engine.name != "bt" or not machine.config.deterministic:
        return "re-protection needs a guest under --ft (bt, deterministic time)"
    return None


def cpu_extras(machine) -> list[dict]:
    """Per vCPU, what the migration state leaves out and the replay needs:
    instructions retired (the log's positions), halted, the interrupt shadow."""
    sched = machine.engine.sched
    return [{"icount": c.icount, "halted": c.halted, "pending": c.pending, "shadow_int": c.shadow_int,
             "shadow_rip": c.shadow_rip, "waiting_sipi": sched.waiting_sipi[c.index]}
            for c in machine.engine.cpus]


class _Dialled:
    """Hands Migration the FT channel as if it had dialled it (a duplicate
    descriptor: Migration closes its socket when done, the log goes on)."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name

    def connect(self) -> socket.socket:
        return self.sock.dup()

    def __str__(self) -> str:
        return self.name


class Reprotector:
    """The live member's engine.ft: runs the current Recorder's round top and
    seeds a backup that dialled in. Console input goes through typed()."""

    def __init__(self, machine, recorder: Recorder, channel: str, lock: FtLock, writer: Writer, wall_ns: int,
                 say=lambda text: None, config=None):
        self.machine = machine
        self.config = config            # as given: the builder adds to machine.config (mmio cmdline, ...)
        self.recorder = recorder
        self.link: C.PrimaryLink | None = None
        self.old_links: list[C.PrimaryLink] = []
        self.channel = channel
        self.lock = lock
        self.writer = writer
        self.wall_ns = wall_ns
        self.say = say
        self.seeded = 0
        self._offer: socket.socket | None = None
        self._stop = threading.Event()
        self._typing = threading.Lock()     # typed() and the switch to a new recorder
        self._dialler: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Reprotector({self.recorder!r}, seeded={self.seeded})"

    # -- any thread ---------------------------------------------------------------------
    def typed(self, data: bytes) -> None:
        with self._typing:
            self.recorder.serial_input(CONSOLE_UART, data)

    def start_dialling(self) -> None:
        """From now on (unprotected), look for a new backup at the channel."""
        if self._dialler is None or not self._dialler.is_alive():
            self._dialler = threading.Thread(target=self._dial, name="ft-reprotect", daemon=True)
            self._dialler.start()

    def stop(self) -> None:
        self._stop.set()
        offer, self._offer = self._offer, None
        if offer is not None:
            offer.close()

    def _dial(self) -> None:
        uri = C._uri(self.channel)
        while not self._stop.wait(DIAL_S):
            if self._offer is not None or not self.recorder.alone:
                if not self.recorder.alone:
                    return              # protected again: lost() starts a new dialler
                continue
            try:
                sock = uri.connect()
            except MigrationError:
                continue
            sock.settimeout(None)
            self._offer = sock
            self.machine.engine.sched._wake.set()

    def lost(self) -> None:
        """The recorder's on_alone: fence the backup off, then look for a new one."""
        self.lock.mark(ALONE)
        self.start_dialling()

    # -- the vCPU thread ----------------------------------------------------------------
    def round_top(self) -> None:
        self.recorder.round_top()
        offer = self._offer
        if offer is not None and self.recorder.alone and not self._stop.is_set():
            self._offer = None
            self._seed(offer)

    def finish(self) -> None:
        """The guest stopped: END to a backup, if there is one."""
        self.stop()
        self.recorder.finish()

    def _seed(self, sock: socket.socket) -> None:
        m = self.machine
        why = why_not(m)
        if why is not None:
            _send_quietly(sock, L.header() + L.refuse(why))
            sock.close()
            self.say(f"a new backup dialled in and was refused: {why}")
            return
        old = self.recorder
        point = SeedPoint(m, old)
        try:
            point.hold()                # nothing in flight in the state sent
        except VmmError as e:
            point.abandon()
            _send_quietly(sock, L.header() + L.refuse(f"the virtio devices did not settle: {e}"))
            sock.close()
            self.say(f"seeding a new backup failed: {e}")
            return
        pos = position(m.engine)
        seed = random.SystemRandom().getrandbits(63)
        doc = {"config": guest_fields(self.config or m.config), "wall_ns": self.wall_ns, "seed": seed,
               "cpus": cpu_extras(m), "console": old.commit.offset}
        self.lock.mark(PRIMARY)         # before the backup can hold a log: it may go live on it
        stopped_at = time.monotonic()
        try:
            _send_timeout(sock, SEND_TIMEOUT_S)
            sock.sendall(L.header() + L.seed(doc))
            mig = Migration(_Dialled(sock, self.channel), Parameters(max_bandwidth=0))
            mig.run(m, lambda: None, lambda: None)       # the vCPUs wait in this round top
            m.postmigrate = False
            if mig.status != "completed":
                raise VmmError(mig.error or mig.status)
        except (OSError, VmmError) as e:
            self.lock.mark(ALONE)
            point.abandon()
            sock.close()
            self.say(f"seeding a new backup failed: {e}")
            return
        _send_timeout(sock, 0)
        link = C.PrimaryLink(sock)
        with m.lock:                    # no frame from the network between the two
            rec = attach_primary(m, self.wall_ns, seed, link.send, self.writer, console_offset=old.commit.offset)
            point.release(rec)          # held frames: delivered and logged at the next round
        m.engine.ft = self              # attach_primary made the recorder the round top's: it is ours
        rec.executed = pos[0]          # the backup starts here: no lag wait for its first ACK
        rec.on_alone = self.lost
        link.start(rec)
        if self.link is not None:
            self.old_links.append(self.link)
        with self._typing:              # what was typed since the old recorder's round top: logged now
            with old._lock:
                rec._inputs.extend(old._inputs)
                old._inputs.clear()
            self.link, self.recorder = link, rec
        self.seeded += 1
        self.say(f"re-protected: a new backup replays from instruction {pos[0]} "
                 f"(guest stopped {(time.monotonic() - stopped_at) * 1000:.0f} ms, {mig.transferred} bytes sent)")
        rec.round_top()                 # this round's input goes to the log, at the seed's position

    def close(self) -> None:
        self.stop()
        for link in [*self.old_links, *([self.link] if self.link else [])]:
            link.close()


def _send_timeout(sock: socket.socket, seconds: int) -> None:
    """SO_SNDTIMEO (0: none): kept by the descriptor Migration sends through (a dup)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass

