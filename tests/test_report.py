"""Cost accounting and `pyvmm report`: real --stats-json reports from small
assembled guests run under bt and hw, rendered to a table and a PNG."""

from __future__ import annotations

import json

import pytest

from pyvmm.cli.main import main as cli_main
from pyvmm.config import VmConfig
from pyvmm.costs import COUNTER_KEYS, TIME_KEYS
from pyvmm.errors import ConfigError
from pyvmm.report import load, table
from pyvmm.cli.exitcodes import exit_code
from pyvmm.runner import RunResult, collect_stats, write_stats_json

from .hostfacts import kvm_missing, require_from_setup
from .rawguest import build_guest, require_kvm, run_raw

# 2000 UART writes with a little arithmetic between them, then hlt.
WORKLOAD = """
    mov $2000, %ecx
    xor %ebx, %ebx
1:  mov $0x3f8, %dx
    mov %cl, %al
    and $0x3f, %al
    add $0x30, %al
    out %al, %dx
    imul $31, %ebx, %ebx
    add %ecx, %ebx
    dec %ecx
    jnz 1b
    hlt
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(tmp_path, engine: str) -> str:
    run = run_raw(build_guest(WORKLOAD, "long"), "long", engine=engine)
    assert len(run.output) == 2000
    stats = collect_stats(run.machine, 0.5)
    path = tmp_path / f"{engine}.json"
    write_stats_json(str(path), RunResult(run.status, stats), VmConfig(engine=engine), exit_code(run.status))
    return str(path)


def test_bt_report_has_the_common_shape(tmp_path):
    doc = json.loads(open(_report(tmp_path, "bt")).read())
    costs = doc["costs"]
    assert doc["mode"] == "bt" and costs["engine"] == "bt"
    for key in COUNTER_KEYS:
        assert isinstance(costs[key], int), key
    assert set(TIME_KEYS) <= set(costs["time"])
    assert costs["io_accesses"] == 2000
    assert costs["translations"] >= 2
    assert costs["instructions"] > 2000 * 9
    assert costs["time"]["guest_s"] > 0
    assert doc["io"]["serial0"]["writes"] == 2000


@pytest.mark.kvm
def test_hw_report_counts_exits_and_kvm_run_time(tmp_path):
    require_kvm()
    doc = json.loads(open(_report(tmp_path, "hw")).read())
    costs = doc["costs"]
    assert costs["engine"] == "hw"
    assert costs["exits"]["io"] == 2000 and costs["exits"]["hlt"] == 1
    assert costs["total_exits"] == 2001
    assert costs["io_accesses"] == 2000
    assert costs["time"]["guest_s"] > 0 and costs["time"]["vmm_s"] > 0
    for key in COUNTER_KEYS:
        assert isinstance(costs[key], int), key


def test_report_table_and_png_from_real_runs(tmp_path, capsys):
    reports = [_report(tmp_path, "bt")]
    if kvm_missing() is None:      # the chart compares modes: hw too where this host has KVM
        reports.append(_report(tmp_path, "hw"))
    require_from_setup(modules=["matplotlib"], package="matplotlib, a pyvmm dependency")
    png = tmp_path / "modes.png"
    assert cli_main(["report", *reports, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "translations" in out and "io: serial0" in out
    assert out.splitlines()[0].split()[0] == "bt"   # column label: the mode (file stem equals it)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_table_lines_up_runs():
    runs = [load_doc("bt", {"engine": "bt", "exits": {}, "translations": 5, "time": {"wall_s": 1.0}}),
            load_doc("hw", {"engine": "hw", "exits": {"io": 7}, "total_exits": 7, "time": {"wall_s": 2.0}})]
    lines = table(runs).splitlines()
    exit_io = next(line for line in lines if line.startswith("exit: io"))
    assert exit_io.split()[-2:] == ["0", "7"]
    assert next(line for line in lines if line.startswith("translations")).split()[-2:] == ["5", "-"]


def load_doc(label, costs):
    from pyvmm.report import Run
    return Run(label, {"mode": label, "costs": costs})


def test_report_refuses_a_file_without_costs(tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"engine": {}}))
    with pytest.raises(ConfigError, match="costs"):
        load(str(bad))
    assert cli_main(["report", str(bad)]) == 1
