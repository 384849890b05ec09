"""`pyvmm report a.json b.json ...`: runs side by side.

Reads the JSON reports that `pyvmm run --stats-json` writes (their "costs"
section, costs.py), prints one table with a column per run and, with
`--png`, draws a chart: where the time went (guest / VMM / idle) and the
event counts that explain it (exits, I/O, completions, translations,
invalidations, shadow faults, interrupts) on a log scale."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .costs import io_by_device
from .errors import ConfigError

log = logging.getLogger(__name__)

# (row label, path in the costs dict, format)
TIME_ROWS = (("wall s", ("time", "wall_s")), ("guest s", ("time", "guest_s")),
             ("vmm s", ("time", "vmm_s")), ("  of which translate s", ("time", "translate_s")),
             ("idle s", ("time", "idle_s")))
COUNT_ROWS = (("exits", ("total_exits",)), ("I/O port accesses", ("io_accesses",)),
              ("MMIO accesses", ("mmio_accesses",)), ("completions", ("completions_total",)),
              ("translations", ("translations",)), ("invalidations", ("invalidations",)),
              ("shadow faults", ("shadow_faults",)), ("interrupts", ("interrupts",)),
              ("exceptions", ("exceptions",)), ("instructions (bt)", ("instructions",)))
CHART_COUNTS = ("total_exits", "io_accesses", "mmio_accesses", "completions_total", "translations",
                "invalidations", "shadow_faults", "interrupts")


@dataclass
class Run:
    """One report: its label (mode and file name) and the parsed document."""
    label: str
    doc: dict

    @property
    def costs(self) -> dict:
        return self.doc["costs"]

    def value(self, path: tuple[str, ...]):
        v = self.costs
        for key in path:
            if not isinstance(v, dict) or key not in v:
                return None
            v = v[key]
        return v


def load(path: str) -> Run:
    """Reads one --stats-json report. Raises ConfigError when it cannot be
    read or has no "costs" section (an older pyvmm wrote it)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("costs"), dict):
        raise ConfigError(f"{path}: no \"costs\" section (not a pyvmm --stats-json report, or an older one)")
    mode = doc.get("mode") or doc["costs"].get("engine", "?")
    stem = Path(path).stem
    return Run(mode if stem == mode else f"{mode}:{stem}", doc)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return f"{v:,}"


def table(runs: list[Run]) -> str:
    """The side-by-side text table: times, counters, exits by reason and the
    busiest devices, one column per run."""
    rows: list[tuple[str, list[str]]] = [("mode", [r.doc.get("mode") or r.costs.get("engine", "?") for r in runs])]
    rows += [(label, [_fmt(r.value(path)) for r in runs]) for label, path in TIME_ROWS]
    rows += [(label, [_fmt(r.value(path)) for r in runs]) for label, path in COUNT_ROWS]
    reasons = sorted({k for r in runs for k in r.costs.get("exits", {})})
    rows += [(f"exit: {k}", [_fmt(r.costs.get("exits", {}).get(k, 0)) for r in runs]) for k in reasons]
    kinds = sorted({k for r in runs for k in r.costs.get("completions", {})})
    rows += [(f"completion: {k}", [_fmt(r.costs.get("completions", {}).get(k, 0)) for r in runs]) for k in kinds]
    devices: dict[str, int] = {}
    for r in runs:
        for name, n in io_by_device(r.doc.get("io", {})).items():
            devices[name] = max(devices.get(name, 0), n)
    for name in sorted(devices, key=lambda d: -devices[d])[:8]:
        rows.append((f"io: {name}", [_fmt(io_by_device(r.doc.get("io", {})).get(name, 0)) for r in runs]))
    header = ("", [r.label for r in runs])
    width0 = max(len(label) for label, _ in [header, *rows])
    widths = [max(len(header[1][i]), *(len(cells[i]) for _, cells in rows)) for i in range(len(runs))]
    lines = []
    for label, cells in [header, *rows]:
        lines.append(f"{label:<{width0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def chart(runs: list[Run], out: str) -> None:
    """Writes a PNG: stacked time bars per run and event counts (log scale).

    Raises ConfigError when matplotlib is missing or the file cannot be written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--png needs matplotlib (pip install matplotlib)") from None
    labels = [r.label for r in runs]
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(6 + 2.2 * len(runs), 4.8))
    guest = [r.value(("time", "guest_s")) or 0.0 for r in runs]
    translate = [r.value(("time", "translate_s")) or 0.0 for r in runs]
    vmm = [max((r.value(("time", "vmm_s")) or 0.0) - t, 0.0) for r, t in zip(runs, translate)]
    idle = [r.value(("time", "idle_s")) or 0.0 for r in runs]
    bottom = [0.0] * len(runs)
    for part, name, color in ((guest, "guest", "#4c72b0"), (vmm, "VMM", "#dd8452"),
                              (translate, "translation", "#c44e52"), (idle, "idle", "#bbbbbb")):
        ax_t.bar(labels, part, bottom=bottom, label=name, color=color)
        bottom = [b + p for b, p in zip(bottom, part)]
    ax_t.set_ylabel("host seconds")
    ax_t.set_title("where the time went")
    ax_t.legend(fontsize=8)
    ax_t.tick_params(axis="x", labelrotation=20, labelsize=8)
    n = len(runs)
    bar_w = 0.8 / n
    xs = range(len(CHART_COUNTS))
    for i, r in enumerate(runs):
        vals = [max(r.value((k,)) or 0, 0) for k in CHART_COUNTS]
        ax_c.bar([x + i * bar_w - 0.4 + bar_w / 2 for x in xs], [v if v > 0 else 0 for v in vals],
                 width=bar_w, label=r.label)
    ax_c.set_yscale("symlog", linthresh=1)
    ax_c.set_xticks(list(xs))
    ax_c.set_xticklabels(["exits", "I/O", "MMIO", "completions", "translations", "invalidations",
                          "shadow faults", "interrupts"], rotation=35, ha="right", fontsize=8)
    ax_c.set_title("events (log scale)")
    ax_c.legend(fontsize=8)
    fig.suptitle("pyvmm: " + " vs ".join(labels), fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(out, format="png", dpi=100)
    except OSError as e:
        raise ConfigError(f"{out}: {e.strerror}") from None
    finally:
        plt.close(fig)


def main(paths: list[str], png: str | None = None) -> str:
    """Loads the reports, returns the table text and writes the chart if asked.
    Raises ConfigError for unreadable reports or an unwritable chart."""
    if not paths:
        raise ConfigError("report: give at least one --stats-json file")
    runs = [load(p) for p in paths]
    if png:
        chart(runs, png)
    return table(runs)
