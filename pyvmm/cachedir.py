"""Where pyvmm keeps what it builds or fetches between runs."""

from __future__ import annotations

import os
from pathlib import Path


def pyvmm_cache(name: str, override_env: str | None = None) -> Path:
    """$<override_env> when set, else $XDG_CACHE_HOME/pyvmm/<name>, else
    ~/.cache/pyvmm/<name> (a relative XDG_CACHE_HOME is ignored, as the
    XDG spec asks)."""
    if override_env:
        override = os.environ.get(override_env, "")
        if override:
            return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pyvmm" / name
