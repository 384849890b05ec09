"""The host console: escape keys as a pure filter, input from a pipe."""

import io
import os
import threading

import pytest

from pyvmm.console import HELP_TEXT, Console, EscapeFilter


def test_escape_plain_bytes_pass_through():
    f = EscapeFilter()
    r = f.feed(b"ls -l\r\x03")
    assert r.to_guest == b"ls -l\r\x03" and not r.quit and not r.show_help


def test_escape_quit():
    r = EscapeFilter().feed(b"abc\x01xdef")
    assert r.to_guest == b"abc" and r.quit


def test_escape_double_ctrl_a_sends_one():
    r = EscapeFilter().feed(b"\x01\x01z")
    assert r.to_guest == b"\x01z" and not r.quit


def test_escape_help_and_unknown():
    r = EscapeFilter().feed(b"\x01h\x01q")
    assert r.show_help and r.to_guest == b"\x01q" and not r.quit


def test_escape_split_across_reads():
    f = EscapeFilter()
    assert f.feed(b"a\x01").to_guest == b"a"
    r = f.feed(b"x")
    assert r.quit and r.to_guest == b""


def test_console_write_flushes():
    out = io.BytesIO()
    c = Console(stdin_fd=-1, stdout=out)
    c.write(b"hello\r\n")
    assert out.getvalue() == b"hello\r\n"


def _start(console):
    got = bytearray()
    fed = threading.Event()
    quits = []

    def feed(data):
        got.extend(data)
        fed.set()

    console.start(feed, lambda: quits.append(1))
    return got, fed, quits


def test_console_pipe_forwards_and_stops_at_eof():
    r, w = os.pipe()
    c = Console(stdin_fd=r, stdout=io.BytesIO())
    try:
        got, fed, quits = _start(c)
        assert not c.is_tty
        # No escapes on a pipe: Ctrl-A x goes to the guest as it is.
        os.write(w, b"echo hi\n\x01x")
        assert fed.wait(10)
        os.close(w)
        w = -1
        assert c.wait(10), "reader did not stop at EOF"
        assert bytes(got) == b"echo hi\n\x01x"
        assert quits == []
    finally:
        if w >= 0:
            os.close(w)
        c.close()
        os.close(r)


def test_console_close_stops_reader():
    r, w = os.pipe()
    c = Console(stdin_fd=r, stdout=io.BytesIO())
    try:
        _start(c)
        assert c.running
        c.close()
        assert not c.running
    finally:
        os.close(w)
        os.close(r)


def test_console_devnull_ends_at_once():
    fd = os.open(os.devnull, os.O_RDONLY)
    c = Console(stdin_fd=fd, stdout=io.BytesIO())
    try:
        got, _, _ = _start(c)
        assert c.wait(10)
        assert got == b""
    finally:
        c.close()
        os.close(fd)


def test_help_text_uses_crlf():
    assert b"\r\n" in HELP_TEXT and b"x" in HELP_TEXT


def test_console_tty_raw_mode_escape_and_restore():
    termios = pytest.importorskip("termios")
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    out = io.BytesIO()
    c = Console(stdin_fd=slave, stdout=out)
    try:
        got, fed, quits = _start(c)
        assert c.is_tty
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ISIG
        assert not raw[3] & termios.ECHO
        os.write(master, b"ab\x03\x01\x01\x01h")
        os.write(master, b"\x01x")
        assert c.wait(10), "Ctrl-A x did not stop the reader"
        assert quits == [1]
        assert bytes(got) == b"ab\x03\x01"
        assert HELP_TEXT in out.getvalue()
        assert termios.tcgetattr(slave) == before
    finally:
        c.close()
        os.close(master)
        os.close(slave)
