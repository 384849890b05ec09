"""FT pieces without a guest: the log's records and checks, output commit,
the split-brain lock, and the CLI's one-line refusals."""

from __future__ import annotations

import io

import pytest

from pyvmm.cli.main import main
from pyvmm.config import DriveConfig, VmConfig
from pyvmm.errors import ConfigError
from pyvmm.ft import log as L
from pyvmm.ft.commit import HOLD, REPLAY, OutputCommit
from pyvmm.ft.failover import ALONE, FtLock, default_lock_path
from pyvmm.ft.setup import check_same_guest, ft_config, guest_fields


def _read(data: bytes):
    return io.BytesIO(data).read


def test_records_round_trip():
    ev = L.Event((12345, 12399), L.SERIAL_RX, "serial0", b"hi\0there")
    stream = L.header() + L.event(ev) + L.progress((5, 6), 77) + L.end((8, 9)) + L.ack((5, 6), 4)
    read = _read(stream)
    L.read_header(read)
    kind, payload = L.read_record(read)
    assert kind == L.EVENT and L.parse_event(payload) == ev
    kind, payload = L.read_record(read)
    assert kind == L.PROGRESS and L.parse_progress(payload) == ((5, 6), 77)
    kind, payload = L.read_record(read)
    assert kind == L.END and L.parse_end(payload) == (8, 9)
    kind, payload = L.read_record(read)
    assert kind == L.ACK and L.parse_ack(payload) == ((5, 6), 4)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b"X" + b[1:], "bad magic"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC"),
    (lambda b: b[:12] + bytes([99]) + b[13:], "unknown record type"),
    (lambda b: b[:13] + b"\x7f\xff\xff\xff" + b[17:], "over its limit"),
])
def test_a_bad_log_is_one_error(mangle, message):
    stream = mangle(L.header() + L.progress((1, 2), 3))
    read = _read(stream)
    with pytest.raises(L.LogError, match=message):
        L.read_header(read)
        L.read_record(read)


def test_primary_output_waits_for_the_ack():
    out = []
    commit = OutputCommit(lambda off, data: out.append((off, data)), HOLD)
    commit.pos = (10, 10)
    commit.output(b"ab")
    commit.pos = (20, 20)
    commit.output(b"cd")
    assert out == []
    commit.acknowledged((15, 15))
    assert out == [(0, b"ab")]
    commit.acknowledged((20, 20))
    assert out == [(0, b"ab"), (2, b"cd")] and commit.released == 4


def test_backup_writes_only_what_the_primary_may_not_have():
    out = []
    commit = OutputCommit(lambda off, data: out.append((off, data)), REPLAY)
    commit.output(b"abc")
    commit.output(b"def")
    commit.trim(4)                      # the primary let "abcd" out
    assert out == []
    commit.go_live()
    assert out == [(4, b"ef")]
    commit.output(b"g")
    assert out[-1] == (6, b"g")


def test_lock_lets_one_member_live(tmp_path):
    path = str(tmp_path / "disk.img.ftlock")
    primary, backup = FtLock(path), FtLock(path)
    assert primary.try_acquire()
    assert not backup.acquire(wait_s=0.1)       # the primary is alive (cut off): no second live VM
    primary.mark(ALONE)                          # it ran on without its backup
    primary.release()                            # what its death does
    assert backup.acquire(wait_s=0.1)
    assert backup.text() == ALONE                # so the backup's log is stale: it must not go live
    backup.release()


def test_lock_default_path(tmp_path):
    cfg = VmConfig(engine="bt", drives=[DriveConfig(file=str(tmp_path / "d.img"))])
    assert default_lock_path(cfg, "unix:/x") == str(tmp_path / "d.img.ftlock")
    assert default_lock_path(VmConfig(), "unix:/run/ft.sock") == "/run/ft.sock.ftlock"


def test_ft_config_and_guest_check():
    with pytest.raises(ConfigError, match="--engine bt"):
        ft_config(VmConfig(engine="hw"))
    cfg = ft_config(VmConfig(engine="bt", debug_exit=(0xF4, 1)))
    assert cfg.deterministic and cfg.no_reboot
    check_same_guest(guest_fields(cfg), guest_fields(cfg))
    with pytest.raises(ConfigError, match="mem_mib differs"):
        check_same_guest(guest_fields(cfg), guest_fields(ft_config(VmConfig(engine="bt", mem_mib=64,
                                                                             debug_exit=(0xF4, 1)))))


def test_cli_refusals(tmp_path, capsys):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 64)
    assert main(["run", "--ft", "primary", "--engine", "bt", "--kernel", str(kernel)]) != 0
    assert "--ft needs --ft-channel" in capsys.readouterr().err
    assert main(["run", "--ft", "backup", "--ft-channel", "unix:/nonexistent/dir/s", "--engine", "hw",
                 "--kernel", str(kernel)]) != 0
    err = capsys.readouterr().err
    assert "--ft needs --engine bt" in err and "Traceback" not in err
