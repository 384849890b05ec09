"""Where is the guest? A debugging aid for long bt runs.

`Probe` prints, on SIGUSR2 and (when PYVMM_BT_PROBE=<seconds> is set)
every that many seconds, one line per vCPU to stderr: RIP, the nearest
kernel symbol from PYVMM_BT_SYMBOLS or /boot/System.map-* (when it is a
real map, not Debian's stub; KASLR shifts addresses, so boot with nokaslr), instructions
retired and the guest-instruction rate since the last line.  With
PYVMM_BT_PROFILE=<file> it also samples every vCPU's RIP once per
scheduler round and writes "count rip" lines, most frequent first, to
that file on SIGUSR2 and when the run ends (`finish()`).  The scheduler
calls `tick()` between rounds.

Nothing here raises: an unreadable System.map just means no symbols."""

from __future__ import annotations

import bisect
import collections
import glob
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


class SymbolMap:
    """Kernel text symbols from a System.map, looked up by address."""

    def __init__(self, path: str | None = None):
        self.addrs: list[int] = []
        self.names: list[str] = []
        path = path or os.environ.get("PYVMM_BT_SYMBOLS")
        if path is None:
            found = sorted(glob.glob("/boot/System.map-*"))
            path = found[-1] if found else None
        if path is None:
            return
        try:
            with open(path) as f:
                rows = []
                for line in f:
                    parts = line.split()
                    if len(parts) == 3 and parts[1] in "tTwW":
                        rows.append((int(parts[0], 16), parts[2]))
        except (OSError, ValueError):
            return
        rows.sort()
        self.addrs = [a for a, _ in rows]
        self.names = [n for _, n in rows]

    def name(self, addr: int) -> str:
        """"symbol+0xoff", or "?" outside the map."""
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 0x100000:
            return "?"
        return f"{self.names[i]}+{addr - self.addrs[i]:#x}"


class Probe:
    """Periodic / on-signal dumps of the vCPUs' positions."""

    def __init__(self, cpus, clock=None):
        self.cpus = cpus
        self.clock = clock
        self.armed = False
        self._symbols: SymbolMap | None = None
        self._last = (time.monotonic(), 0)
        try:
            self.period = float(os.environ.get("PYVMM_BT_PROBE", "0") or 0)
        except ValueError:
            self.period = 0.0
        self._next = time.monotonic() + self.period if self.period > 0 else None
        self.profile_path = os.environ.get("PYVMM_BT_PROFILE") or None
        self.samples: collections.Counter = collections.Counter()
        if threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGUSR2, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame) -> None:
        self.armed = True

    def tick(self) -> None:
        """Samples RIPs when profiling; dumps if a signal came or the period passed."""
        if self.profile_path is not None:
            for c in self.cpus:
                if not c.halted:
                    self.samples[(c.sb[1] + c.rip) & c.ipmask] += 1
        if self._next is not None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.period
            self.armed = True
        if self.armed:
            self.armed = False
            self.dump()

    def finish(self) -> None:
        """Writes the profile, if one is being taken."""
        if self.profile_path is None:
            return
        try:
            with open(self.profile_path, "w") as f:
                for rip, n in self.samples.most_common():
                    f.write(f"{n} {rip:#x}\n")
        except OSError as e:
            log.warning("bt profile %s: %s", self.profile_path, e.strerror)

    def dump(self) -> None:
        self.finish()
        if self._symbols is None:
            self._symbols = SymbolMap()
        now = time.monotonic()
        total = sum(c.icount for c in self.cpus)
        t0, n0 = self._last
        rate = (total - n0) / max(now - t0, 1e-9)
        self._last = (now, total)
        gns = self.clock.now_ns() if self.clock is not None else 0
        parts = [f"pyvmm-probe: {total} insns, {rate / 1e6:.2f} M/s, guest {gns / 1e9:.3f} s"]
        for c in self.cpus:
            la = (c.sb[1] + c.rip) & c.ipmask
            parts.append(f"  cpu{c.index}: rip={la:#x} {self._symbols.name(la)}"
                         f"{' hlt' if c.halted else ''} icount={c.icount}")
        print("\n".join(parts), file=sys.stderr, flush=True)
