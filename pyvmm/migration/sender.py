"""The source side: pre-copy live migration of a running machine.

Pass 1 sends all of RAM while the guest runs, with the dirty log on; each
later pass sends the pages written since the last one.  Before each pass
the remaining dirty bytes are divided by the bandwidth measured so far:
once that fits the downtime limit (or after MAX_PASSES), the vCPUs stop,
the last dirty pages, the drives' flush, the vCPU and device states go
out, and the destination's acknowledgement ends the migration.  The
source then stays paused ("postmigrate").  A cancel, or a destination
that dies or refuses the stream, lets a source it paused run again."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import VmmError
from . import stream
from .blocks import CHUNK, BlockSender
from .state import config_doc, state_doc, warm_up
from .uri import MigrationError, MigrationUri

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

MAX_PASSES = 30                 # a guest that dirties faster than the link is stopped after this many
ZERO_GRAIN = 16                 # pages checked for zero together in pass 1 (64 KiB)
ACK_TIMEOUT_S = 60.0
DEFAULT_DOWNTIME_MS = 300       # QEMU's downtime-limit default
DEFAULT_BANDWIDTH = 128 << 20   # QEMU's max-bandwidth default, bytes/s


class Cancelled(MigrationError):
    pass


@dataclass
class Parameters:
    downtime_limit_ms: int = DEFAULT_DOWNTIME_MS
    max_bandwidth: int = DEFAULT_BANDWIDTH      # bytes/s; 0: unlimited


@dataclass
class Migration:
    """One outgoing migration and its progress (query-migrate's figures)."""
    uri: MigrationUri
    params: Parameters
    emit: Callable[[str, dict], None] = lambda event, data: None
    status: str = "setup"
    passes: int = 0               # dirty-sync-count
    transferred: int = 0
    remaining: int = 0
    dirty_rate: float = 0.0       # pages/s in the last pass
    bandwidth: float = 0.0        # bytes/s measured
    expected_downtime_ms: float = 0.0
    downtime_ms: float | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    total_ram: int = 0
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket | None = None
    blk: bool = False             # block migration: the drives' contents go along (blocks.py)
    _lines: object = None         # the socket's reader for the destination's answers

    @property
    def active(self) -> bool:
        return self.status in ("setup", "active", "device")

    def set_status(self, status: str) -> None:
        self.status = status
        self.emit("MIGRATION", {"status": status})

    def cancel(self) -> None:
        self.cancel_event.set()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # unblocks a sendall stuck on a slow peer
            except OSError:
                pass

    def info(self) -> dict:
        """query-migrate's MigrationInfo."""
        out: dict = {"status": self.status}
        end = self.finished or time.monotonic()
        if self.status != "setup":
            out["total-time"] = int((end - self.started) * 1000)
            out["dirty-sync-count"] = self.passes
            out["ram"] = {"transferred": self.transferred, "remaining": self.remaining,
                          "total": self.total_ram, "dirty-pages-rate": int(self.dirty_rate),
                          "mbps": round(self.bandwidth * 8 / 1e6, 3), "dirty-sync-count": self.passes,
                          "page-size": stream.PAGE}
            if self.status == "completed":
                out["downtime"] = int(self.downtime_ms or 0)
            else:
                out["expected-downtime"] = int(self.expected_downtime_ms)
        if self.error:
            out["error-desc"] = self.error
        return out

    # -- the work -------------------------------------------------------------------
    def run(self, machine: "Machine", pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Migrates `machine` (on the caller's thread). pause/resume stop and
        restart its vCPUs (with the STOP/RESUME events). Never raises: the
        outcome is in `status` and `error`."""
        memory = machine.memory
        paused_here = False
        log_on = False
        blocks = BlockSender(machine) if self.blk else None
        try:
            self.total_ram = sum(r.size for r in memory.regions)
            self.sock = self.uri.connect()
            self.sock.settimeout(None)
            self._check_cancel()
            config = config_doc(machine)
            if blocks is not None:
                config["blocks"] = blocks.describe()
                blocks.start()
            self._send([stream.header(), *stream.json_record(stream.CONFIG, config)])
            warm_up()
            memory.start_dirty_log()
            log_on = True
            self.set_status("active")
            active_since = time.monotonic()
            if blocks is not None:
                self._send_blocks(blocks, blocks.all_chunks(), skip_zero=True)
            self._send_all_ram(machine)
            while True:
                self._sync()
                self._check_cancel()
                t0 = time.monotonic()
                dirty = list(memory.dirty_pages())
                dirty_blocks = blocks.dirty_chunks() if blocks is not None else []
                self.passes += 1
                self.remaining = len(dirty) * stream.PAGE + len(dirty_blocks) * CHUNK
                # Wall time, not socket time: copying pages out of guest RAM is
                # part of what the final pass costs.
                self.bandwidth = self.transferred / max(time.monotonic() - active_since, 1e-6)
                self.expected_downtime_ms = self.remaining / max(self.bandwidth, 1.0) * 1000
                if self.expected_downtime_ms <= self.params.downtime_limit_ms or self.passes >= MAX_PASSES:
                    break
                self._send_pages(machine, dirty)
                if blocks is not None:
                    self._send_blocks(blocks, dirty_blocks)
                self.dirty_rate = len(dirty) / max(time.monotonic() - t0, 1e-6)
            from ..runstate import RunState
            stop_at = time.monotonic()
            if machine.state is RunState.RUNNING:
                pause()
                paused_here = True
            self.set_status("device")
            # Saving the devices may write guest RAM (the local APIC settles a
            # PV-EOI flag the guest has not cleared yet): the state is taken
            # first so that the last pass carries those writes too.  Sent
            # after it, the destination's guest would find its flag still set,
            # skip the EOI and keep that vector in service for ever.
            _flush_drives(machine)
            state = state_doc(machine)
            dirty = sorted(set(dirty) | set(memory.dirty_pages()))
            memory.stop_dirty_log()
            log_on = False
            self._send_pages(machine, dirty)
            if blocks is not None:
                self._send_blocks(blocks, sorted(set(dirty_blocks) | set(blocks.dirty_chunks())))
            self._send(stream.json_record(stream.STATE, state))
            self._send(stream.end_record())
            sent_at = time.monotonic()
            self._await_ack()
            log.debug("migration stop: pause+pages+state %.1f ms, destination load %.1f ms",
                      (sent_at - stop_at) * 1000, (time.monotonic() - sent_at) * 1000)
            self.remaining = 0
            self.downtime_ms = (time.monotonic() - stop_at) * 1000
            self.finished = time.monotonic()
            self.set_status("completed")
            machine.postmigrate = True
            log.info("migration to %s completed: %d passes, %d bytes, downtime %.1f ms",
                     self.uri, self.passes, self.transferred, self.downtime_ms)
        except BaseException as e:
            cancelled = self.cancel_event.is_set()
            self.error = None if cancelled else _one_line(e)
            if log_on:
                memory.stop_dirty_log()
            if paused_here:
                try:
                    resume()
                except VmmError as err:
                    log.warning("migration: the source could not resume: %s", err)
            self.finished = time.monotonic()
            self.set_status("cancelled" if cancelled else "failed")
            if not isinstance(e, (VmmError, OSError)):
                log.exception("migration failed")
        finally:
            if blocks is not None:
                blocks.stop()
            if self.sock is not None:
                self.sock.close()

    def _check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("migration cancelled")

    def _send(self, parts: list) -> None:
        """Sends buffers, keeping to max-bandwidth."""
        n = sum(len(p) for p in parts)
        try:
            self.sock.sendall(b"".join(parts))
        except OSError as e:
            self._check_cancel()
            self._check_peer()
            raise MigrationError(f"the destination went away ({e.strerror or e})") from None
        self._check_peer()
        self.transferred += n
        limit = self.params.max_bandwidth
        if limit > 0:
            ahead = self.transferred / limit - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)

    def _send_blocks(self, blocks: BlockSender, chunks, skip_zero: bool = False) -> None:
        for parts in blocks.records(chunks, skip_zero):
            self._check_cancel()
            self._send(parts)

    def _send_all_ram(self, machine: "Machine") -> None:
        """Pass 1: every page, zero pages as markers (64 KiB at a time)."""
        page = stream.PAGE
        for r in machine.memory.regions:
            zero = bytes(ZERO_GRAIN * page)
            runs, size = [], 0
            for off in range(0, r.size, ZERO_GRAIN * page):
                n = min(ZERO_GRAIN * page, r.size - off)
                if r.mm.find(zero[:n], off, off + n) == off:
                    runs.append((r.gpa + off, n // page, None))
                else:
                    runs.append((r.gpa + off, n // page, bytes(memoryview(r.mm)[off:off + n])))
                    size += n
                if len(runs) >= stream.MAX_RUNS or size >= stream.MAX_PAGES_BYTES - ZERO_GRAIN * page:
                    self._check_cancel()
                    self._send(stream.pages_record(runs))
                    runs, size = [], 0
            if runs:
                self._send(stream.pages_record(runs))

    def _send_pages(self, machine: "Machine", pages: list[int]) -> None:
        """Sends the given page frames (sorted), consecutive ones as runs."""
        memory = machine.memory
        runs, size = [], 0
        i = 0
        while i < len(pages):
            start = pages[i]
            j = i + 1
            while j < len(pages) and pages[j] == start + (j - i) and j - i < stream.MAX_RUN_PAGES:
                j += 1
            count = j - i
            gpa = start * stream.PAGE
            if memory.is_ram(gpa, count * stream.PAGE):
                runs.append((gpa, count, bytes(memory.view(gpa, count * stream.PAGE))))
                size += count * stream.PAGE
            if len(runs) >= stream.MAX_RUNS or size >= stream.MAX_PAGES_BYTES - stream.MAX_RUN_PAGES * stream.PAGE:
                self._check_cancel()
                self._send(stream.pages_record(runs))
                runs, size = [], 0
            i = j
        if runs:
            self._send(stream.pages_record(runs))

    def _check_peer(self) -> None:
        """A destination that refused the stream says why before it hangs up:
        fail with its reason as soon as it is there."""
        try:
            data = self.sock.recv(1024, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise MigrationError(f"the destination went away ({e.strerror or e})") from None
        if data.startswith((b"OK", b"SYNC")):
            return                      # an answer: _sync or _await_ack reads it
        if not data:
            raise MigrationError("the destination closed the connection")
        if data.startswith(b"ERR ") and b"\n" not in data:
            time.sleep(0.05)            # the rest of its line
            data = self.sock.recv(1024, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        why = data.split(b"\n", 1)[0].decode(errors="replace").removeprefix("ERR ").strip()
        raise MigrationError(f"the destination refused the stream: {why}")

    def _sync(self) -> None:
        """Waits until the destination has loaded everything sent so far."""
        self._send(stream.sync_record())
        line = self._read_line()
        if line.strip() != b"SYNC":
            why = line.decode(errors="replace").strip().removeprefix("ERR ") or "it closed the connection"
            raise MigrationError(f"the destination refused the stream: {why}")

    def _read_line(self) -> bytes:
        self.sock.settimeout(ACK_TIMEOUT_S)
        try:
            if self._lines is None:
                self._lines = self.sock.makefile("rb")
            return self._lines.readline(1024)
        except OSError as e:
            self._check_cancel()
            raise MigrationError(f"the destination did not answer ({e.strerror or e})") from None
        finally:
            self.sock.settimeout(None)

    def _await_ack(self) -> None:
        """The destination's answer: "OK" once it loaded everything, or its error."""
        line = self._read_line()
        if line.strip() != b"OK":
            why = line.decode(errors="replace").strip().removeprefix("ERR ") or "it closed the connection"
            raise MigrationError(f"the destination refused the stream: {why}")


def _flush_drives(machine: "Machine") -> None:
    """Shared storage: everything the source wrote is on the images before
    the destination (which opened the same paths) runs."""
    from ..snapshot.savevm import drives
    for drive in drives(machine).values():
        if not drive.readonly:
            drive.flush()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
