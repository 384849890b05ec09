"""`--engine auto`: the decision for injected host and guest facts, guest
detection from real images, and the CLI printing its choice."""

from __future__ import annotations

import glob

import pytest

from pyvmm.autoselect import Decision, GuestFacts, HostFacts, decide, guest_facts
from pyvmm.cli.main import build_parser, config_from_args

LINUX, OTHER = GuestFacts(linux=True), GuestFacts(linux=False)


@pytest.mark.parametrize("guest", [LINUX, OTHER])
def test_no_kvm_means_bt(guest):
    d = decide(HostFacts(kvm_usable=False, hardware_assist=True, kernel_mode_emulated=False), guest)
    assert d.engine == "bt" and "/dev/kvm" in d.reason


@pytest.mark.parametrize("guest", [LINUX, OTHER])
def test_hardware_assist_means_hw(guest):
    d = decide(HostFacts(kvm_usable=True, hardware_assist=True, kernel_mode_emulated=False), guest)
    assert d.engine == "hw" and "hardware assist" in d.reason


def test_emulated_kernel_mode_linux_goes_hybrid():
    d = decide(HostFacts(kvm_usable=True, hardware_assist=False, kernel_mode_emulated=True), LINUX)
    assert d.engine == "hybrid" and "syscall" in d.reason


def test_emulated_kernel_mode_kernel_only_guest_goes_bt():
    d = decide(HostFacts(kvm_usable=True, hardware_assist=False, kernel_mode_emulated=True), OTHER)
    assert d.engine == "bt" and "kernel-mode" in d.reason


def test_decision_line_is_one_line():
    line = Decision("bt", "why").line()
    assert line == "pyvmm: engine auto -> bt: why" and "\n" not in line


def test_guest_facts_from_images(tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\xf4" * 64)
    assert guest_facts(str(raw)) == OTHER
    assert guest_facts(str(tmp_path / "missing")) == OTHER
    assert guest_facts(None) == OTHER
    fake = bytearray(0x400)
    fake[0x202:0x206] = b"HdrS"
    bz = tmp_path / "bz"
    bz.write_bytes(bytes(fake))
    assert guest_facts(str(bz)) == LINUX
    real = sorted(glob.glob("/boot/vmlinuz-*"))
    if real:
        assert guest_facts(real[-1]) == LINUX


def test_cli_auto_prints_its_choice(tmp_path, capsys):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\xf4" * 64)
    args = build_parser().parse_args(["run", "--engine", "auto", "--kernel", str(raw)])
    cfg = config_from_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyvmm: engine auto -> {cfg.engine}: ")
    assert cfg.engine in ("hw", "bt")          # a raw (non-Linux) image: never hybrid
