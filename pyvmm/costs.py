"""Cost accounting: one report shape for every engine.

Each engine's `costs()` fills a `Costs`; `machine_report()` adds what the
machine knows (I/O and MMIO accesses by device from the buses, wall time)
and gives the dict that `--stats` prints and `--stats-json` writes under
"costs".  The same keys exist for every engine, zero where an engine has no
such event, so `pyvmm report` can put runs side by side:

- exits: events that left guest execution for the VMM, by reason (hw: KVM
  exit reasons; bt: exceptions, interrupts, self-modifying-code restarts);
- completions: instructions KVM could not run that pyvmm executed (hw);
- translations / invalidations / shadow_faults / interrupts (bt; interrupts
  under hw are injected by KVM's in-kernel irqchip and not seen here);
- time: guest_s (hw: inside KVM_RUN; bt: inside translated blocks, which
  includes the device emulation that blocks call), vmm_s (hw: the exit loop
  outside KVM_RUN; bt: translation, dispatch and scheduling), idle_s (bt:
  waiting for a timer with every vCPU halted), translate_s (bt).

Nothing here raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COUNTER_KEYS = ("instructions", "completions_total", "translations", "invalidations",
                "shadow_faults", "interrupts", "exceptions", "io_accesses", "mmio_accesses")
TIME_KEYS = ("guest_s", "vmm_s", "idle_s", "translate_s")


@dataclass
class Costs:
    """Counters and times of one engine run (see the module docstring)."""
    engine: str = "?"
    exits: dict[str, int] = field(default_factory=dict)
    completions: dict[str, int] = field(default_factory=dict)
    instructions: int = 0          # bt only: guest instructions retired
    translations: int = 0
    invalidations: int = 0
    shadow_faults: int = 0
    interrupts: int = 0
    exceptions: int = 0
    guest_s: float = 0.0
    vmm_s: float = 0.0
    idle_s: float = 0.0
    translate_s: float = 0.0

    def merge(self, other: "Costs") -> None:
        """Adds other's counts and times into this one (a hybrid run's parts)."""
        for name in ("exits", "completions"):
            mine = getattr(self, name)
            for k, v in getattr(other, name).items():
                mine[k] = mine.get(k, 0) + v
        for name in ("instructions", "translations", "invalidations", "shadow_faults", "interrupts",
                     "exceptions", "guest_s", "vmm_s", "idle_s", "translate_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _bus_total(bus_stats: dict) -> int:
    return sum(v["reads"] + v["writes"] for k, v in bus_stats.items() if k != "unmapped")


def machine_report(costs: Costs, io: dict, mmio: dict, wall_s: float) -> dict:
    """The "costs" section of a stats report: costs plus bus totals and times
    rounded to microseconds."""
    d = asdict(costs)
    out = {
        "engine": d.pop("engine"),
        "exits": d.pop("exits"),
        "total_exits": sum(costs.exits.values()),
        "completions": d.pop("completions"),
        "completions_total": sum(costs.completions.values()),
        "io_accesses": _bus_total(io),
        "mmio_accesses": _bus_total(mmio),
    }
    times = {k: round(d.pop(k), 6) for k in TIME_KEYS}
    times["wall_s"] = round(wall_s, 6)
    out.update(d)
    out["time"] = times
    return out


def io_by_device(io: dict) -> dict[str, int]:
    """{device: reads + writes} from a bus's stats, busiest first, idle ones left out."""
    rows = {k: v["reads"] + v["writes"] for k, v in io.items()}
    return {k: n for k, n in sorted(rows.items(), key=lambda kv: -kv[1]) if n}
