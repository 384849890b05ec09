"""Writing a `.config` fitted to pyvmm's hardware, with the kernel's own tools:

    make tinyconfig                           the smallest kernel there is
    merge_config.sh -m .config <fragment>     add what pyvmm's machine needs
    make KCONFIG_ALLCONFIG=<merged> allnoconfig
                                              resolve it; new symbols stay off
    make olddefconfig                         settle anything left

then check that every requested symbol stuck and nothing forbidden crept in.
Everything runs in an O= build directory; the source tree is only read.
Output of every step goes to <build>/config.log.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VmmError
from .fragment import FITTED, FragmentRequest, render

log = logging.getLogger(__name__)

CONFIG_TOOLS = ("make", "gcc", "flex", "bison")
BUILD_TOOLS = CONFIG_TOOLS + ("bc", "lz4")
TOOL_HINT = "run scripts/install-kernel-build-deps.sh"
FRAGMENT_NAME = "pyvmm.fragment"
MERGED_NAME = "pyvmm-merged.config"
CONFIG_LOG = "config.log"
# pyvmm's own fitted fragment as it was when the build directory was
# configured: a pyvmm that fits the kernel differently reconfigures it.
FITTED_STAMP = ".pyvmm-fitted"

_LINE_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_LINE_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


class ToolchainError(VmmError):
    """A tool the kernel build needs is not installed."""


class KernelBuildError(VmmError):
    """A configuration or build step failed; the message names the log."""


class KernelConfigError(KernelBuildError):
    """The resolved .config lacks requested symbols or has forbidden ones."""

    def __init__(self, message: str, missing: list[str], forbidden: list[str]):
        super().__init__(message)
        self.missing = missing
        self.forbidden = forbidden


def require_tools(tools: tuple[str, ...] = BUILD_TOOLS) -> None:
    """Raises ToolchainError naming every tool of `tools` not on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ToolchainError(f"kernel build tools missing: {', '.join(missing)}: {TOOL_HINT}")


def run_logged(argv: list[str], log_path: Path, what: str, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> None:
    """Runs `argv`, appending its output to `log_path`.
    Raises KernelBuildError "<what> failed (exit N): <last line>; log: <path>"."""
    with open(log_path, "a") as logf:
        logf.write(f"\n$ {' '.join(argv)}\n")
        logf.flush()
        try:
            proc = subprocess.run(argv, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        except OSError as e:
            raise KernelBuildError(f"{what} failed: {e.strerror or e}; log: {log_path}") from None
    if proc.returncode != 0:
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}): "
                               f"{last_error_line(log_path)}; log: {log_path}")


def last_error_line(log_path: Path) -> str:
    """The most telling line near the end of a make log (an 'error' line if
    any, else the last non-empty line), shortened."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "?"
    for line in reversed(lines):
        if re.search(r"\berror\b", line, re.I) and not line.startswith("make"):
            return line[:200]
    return (lines[-1] if lines else "?")[:200]


def read_config(path: Path) -> dict[str, str]:
    """A .config as {symbol: value}; "# CONFIG_X is not set" gives "n".
    Raises KernelBuildError if the file cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise KernelBuildError(f"cannot read {path}: {e.strerror or e}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE_SET.match(line) or _LINE_UNSET.match(line)
        if m:
            values[m.group(1)] = m.group(2) if m.re is _LINE_SET else "n"
    return values


def kconfig_symbols_defined(tree: Path, symbols: list[str]) -> set[str]:
    """Which of `symbols` some Kconfig file of `tree` defines."""
    wanted = set(symbols)
    found: set[str] = set()
    rx = re.compile(r"^\s*(?:menu)?config\s+(\w+)", re.M)
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("Documentation", "tools")]
        for name in filenames:
            if name.startswith("Kconfig"):
                try:
                    text = Path(dirpath, name).read_text(errors="replace")
                except OSError:
                    continue
                found.update(wanted.intersection(rx.findall(text)))
    return found


@dataclass
class ConfigResult:
    """What `generate_config` produced."""
    config_path: Path
    build_dir: Path
    values: dict[str, str] = field(repr=False, default_factory=dict)
    requested: dict[str, str] = field(repr=False, default_factory=dict)

    def enabled(self) -> list[str]:
        return sorted(k for k, v in self.values.items() if v in ("y", "m"))


def check_config(values: dict[str, str], requested: dict[str, str],
                 forbidden: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(requested symbols that did not stick as "SYM (wanted y, got n)",
    forbidden symbols present)."""
    missing = []
    for sym, want in requested.items():
        got = values.get(sym, "n")
        if got != want and not (want.strip('"') == got.strip('"')):
            missing.append(f"{sym} (wanted {want}, got {got})")
    present = [s for s in forbidden if values.get(s, "n") in ("y", "m")]
    return missing, present


def generate_config(tree: Path, build_dir: Path, request: FragmentRequest | None = None) -> ConfigResult:
    """Writes <build_dir>/.config for `tree` fitted to pyvmm (see module doc).

    Raises ToolchainError, KernelBuildError (a step failed; names
    <build_dir>/config.log) or KernelConfigError (requested symbols that did
    not stick, e.g. unmet dependencies, or forbidden ones present)."""
    request = request or FragmentRequest()
    try:
        requested = request.symbols()
    except ValueError as e:
        raise KernelConfigError(str(e), [], []) from None
    require_tools(CONFIG_TOOLS)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create build directory {build_dir}: {e.strerror or e}") from None
    log_path = build_dir / CONFIG_LOG
    log_path.write_text(f"pyvmm kernel config: source {tree}, build {build_dir}\n")
    make = ["make", "-C", str(tree), f"O={build_dir}", "ARCH=x86_64"]
    config = build_dir / ".config"

    run_logged(make + ["tinyconfig"], log_path, "make tinyconfig")
    fragment = build_dir / FRAGMENT_NAME
    fragment.write_text(render(requested))
    # -m: merge only; temporary files land in the cwd, so run it in build_dir.
    run_logged(["sh", str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build_dir),
                str(config), str(fragment)], log_path, "merge_config.sh", cwd=build_dir)
    merged = build_dir / MERGED_NAME
    shutil.copyfile(config, merged)
    run_logged(make + [f"KCONFIG_ALLCONFIG={merged}", "allnoconfig"], log_path, "make allnoconfig")
    run_logged(make + ["olddefconfig"], log_path, "make olddefconfig")

    values = read_config(config)
    missing, present = check_config(values, requested, request.forbidden())
    if missing or present:
        parts = []
        if missing:
            unknown = {m.split()[0] for m in missing} - kconfig_symbols_defined(
                tree, [m.split()[0] for m in missing])
            notes = [m + (" [no such symbol]" if m.split()[0] in unknown else "") for m in missing]
            parts.append("did not stick (unmet dependencies or unknown): " + ", ".join(notes))
        if present:
            parts.append("forbidden but enabled: " + ", ".join(present))
        raise KernelConfigError(f"kernel config {config}: {'; '.join(parts)}; log: {log_path}",
                                missing, present)
    (build_dir / FITTED_STAMP).write_text(render(FITTED))
    log.info("%s: %d symbols enabled", config, sum(v in ("y", "m") for v in values.values()))
    return ConfigResult(config, build_dir, values, requested)


def fitted_fragment_changed(build_dir: Path) -> bool:
    """True when <build_dir> was configured by a pyvmm whose fitted fragment
    differs from this one's (or by one that did not record it)."""
    try:
        return (build_dir / FITTED_STAMP).read_text() != render(FITTED)
    except OSError:
        return True
