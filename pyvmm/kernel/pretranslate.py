"""Translating a freshly built kernel ahead of its first boot under bt.

The bt engine keeps every block it compiles in a block store on disk
(engines/bt/blockstore.py), so only the first boot of a kernel pays for
translation: ~25 k blocks, about two thirds of that boot's time.
`pyvmm kernel build` therefore boots the new image once under bt, with
pyvmm's default initramfs, up to the init's ready marker, and powers it
off: the blocks of the boot path and of the init's commands are then in
the store when the user first runs the kernel, as Rosetta 2 translates an
application when it is installed rather than when it is first opened.

A failed pretranslation is not a failed build: the first boot then simply
translates everything itself."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_CMDLINE
from ..guest.initramfs import READY_MARKER, ensure_default_initramfs

# `pyvmm run`'s own default command line (its early console is code too),
# with the word that makes the default initramfs power off after the marker.
CMDLINE = DEFAULT_CMDLINE + " pyvmm.poweroff"
TIMEOUT_S = 600.0


@dataclass
class Pretranslation:
    """What one pretranslation boot did, or why it stopped short."""
    seconds: float = 0.0
    blocks: int = 0                 # blocks the boot translated (now in the store)
    loaded: int = 0                 # of which were in the store already
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure

    def summary(self) -> str:
        if self.failure:
            return f"pretranslation stopped: {self.failure}; the first boot under bt will translate instead"
        fresh = self.blocks - self.loaded
        return (f"pretranslated for --engine bt in {self.seconds:.0f} s: {fresh:,} new blocks stored "
                f"({self.blocks:,} on the boot path)")


def boot_command(image: Path, store: str | None, stats: Path) -> list[str]:
    """`pyvmm run` for one bt boot of `image` to the marker and power off."""
    cmd = [sys.executable, "-m", "pyvmm", "run", "--engine", "bt", "--kernel", str(image),
           "--initrd", str(ensure_default_initramfs()), "--append", CMDLINE,
           "--no-reboot", "--stats-json", str(stats)]
    return cmd + (["--bt-cache", store] if store else [])


def pretranslate(image: Path, store: str | None = None, timeout: float = TIMEOUT_S) -> Pretranslation:
    """Boots `image` once under bt so that its blocks land in the block store
    `store` (None: the default one `pyvmm run` uses).  Never raises for a
    guest that does not get there; ConfigError when the initramfs cannot
    be made."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-pretranslate-") as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = boot_command(image, store, stats)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Pretranslation(failure=f"no power off within {timeout:.0f} s")
        result = Pretranslation(seconds=time.monotonic() - start)
        out = proc.stdout.decode(errors="replace")
        if READY_MARKER not in out or proc.returncode != 0:
            err = [l for l in proc.stderr.decode(errors="replace").splitlines() if l.strip()]
            why = err[0] if err else (out.strip().splitlines() or ["no output"])[-1]
            result.failure = f"exit {proc.returncode} before {READY_MARKER}: {why[:200]}"
            return result
        try:
            engine = json.loads(stats.read_text()).get("engine", {})
        except (OSError, ValueError):
            engine = {}
        result.blocks = int(engine.get("blocks_translated") or 0)
        result.loaded = int(engine.get("blocks_loaded") or 0)
        if not engine.get("block_store"):
            result.failure = "the block store is off (--no-bt-cache or PYVMM_BT_CACHE=off)"
        return result
