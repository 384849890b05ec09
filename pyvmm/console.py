"""The terminal side of the guest's serial port.

`Console.write` is the UART's output sink.  `Console.start` reads the
host's stdin on the machine's event loop (loop.py) and feeds the bytes to
the UART:

* stdin is a TTY: the terminal is put in raw mode (restored by `close()`,
  when the reader stops, and at interpreter exit) and QEMU's escape keys
  apply — Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A h prints
  help.  Ctrl-C and everything else go to the guest untouched.
* stdin is not a TTY (pipe, file, /dev/null): bytes are forwarded as they
  come and reading stops at end of file; no escapes, no raw mode.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import BinaryIO, Callable, NamedTuple

from .loop import EventLoop

log = logging.getLogger(__name__)

CTRL_A = 0x01
READ_CHUNK = 4096

HELP_TEXT = (
    b"\r\n"
    b"C-a h    print this help\r\n"
    b"C-a x    exit pyvmm\r\n"
    b"C-a C-a  send C-a to the guest\r\n"
)


class EscapeResult(NamedTuple):
    to_guest: bytes
    quit: bool
    show_help: bool


class EscapeFilter:
    """Turns keyboard input into bytes for the guest plus escape actions.

    State (a pending Ctrl-A) carries over between `feed` calls, so an escape
    split across two reads still works.  After Ctrl-A x the rest of the
    input is discarded."""

    def __init__(self, escape: int = CTRL_A):
        self.escape = escape
        self.pending = False

    def feed(self, data: bytes) -> EscapeResult:
        out = bytearray()
        show_help = False
        for b in data:
            if not self.pending:
                if b == self.escape:
                    self.pending = True
                else:
                    out.append(b)
                continue
            self.pending = False
            if b in (ord("x"), ord("X")):
                return EscapeResult(bytes(out), True, show_help)
            if b == self.escape:
                out.append(self.escape)
            elif b in (ord("h"), ord("H"), ord("?")):
                show_help = True
            else:
                out += bytes((self.escape, b))  # not an escape: pass both on
        return EscapeResult(bytes(out), False, show_help)


class Console:
    """Host terminal for one serial port. Raises nothing on construction."""

    def __init__(self, stdin_fd: int = 0, stdout: BinaryIO | None = None):
        self.stdin_fd = stdin_fd
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self._out_lock = threading.Lock()
        self._loop: EventLoop | None = None
        self._own_loop = False
        self._feed: Callable[[bytes], None] | None = None
        self._on_quit: Callable[[], None] | None = None
        self._escapes: EscapeFilter | None = None
        self._saved_termios: list | None = None
        self._ended = threading.Event()
        self._reading = False
        self.is_tty = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._output_broken = False

    def __repr__(self) -> str:
        return f"Console(fd={self.stdin_fd}, tty={self.is_tty}, {'running' if self.running else 'stopped'})"

    # --- output -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Guest output to the terminal; flushed at once. Errors writing
        (closed pipe) are logged once and then ignored."""
        with self._out_lock:
            try:
                self.stdout.write(data)
                self.stdout.flush()
                self.bytes_out += len(data)
            except (OSError, ValueError) as e:
                if not self._output_broken:
                    log.warning("console output failed: %s", e)
                self._output_broken = True

    # --- input --------------------------------------------------------------

    def start(self, feed: Callable[[bytes], None], on_quit: Callable[[], None],
              loop: EventLoop | None = None) -> None:
        """Reads stdin on `loop` (the machine's event loop; a loop of the
        console's own when None). `feed` gets the bytes for the guest;
        `on_quit` is called once on Ctrl-A x (TTY only). Both run on the
        loop's thread, under its lock."""
        if self._feed is not None:
            return
        self._feed, self._on_quit = feed, on_quit
        try:
            self.is_tty = os.isatty(self.stdin_fd)
        except OSError:
            self.is_tty = False
        if self.is_tty:
            self._enter_raw()
            self._escapes = EscapeFilter()
        self.attach(loop)

    def attach(self, loop: EventLoop | None) -> None:
        """Moves stdin to `loop` (a reboot brings a new machine with its own
        loop; the terminal and the escape state stay)."""
        self._detach()
        if loop is None:
            loop, self._own_loop = EventLoop(name="pyvmm-console"), True
            loop.start()
        else:
            self._own_loop = False
        self._loop = loop
        if not self._ended.is_set():
            try:
                loop.add_reader(self.stdin_fd, self._on_readable)
                self._reading = True
            except PermissionError:     # a regular file: always readable, epoll refuses it
                self._reading = True
                loop.call_soon_threadsafe(self._drain_file)
            except (OSError, ValueError) as e:
                log.debug("console input unavailable: %s", e)
                self._end()

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._reading:
            loop.remove_reader(self.stdin_fd)
            self._reading = False
        if self._own_loop:
            loop.close()

    def close(self) -> None:
        """Stops reading and restores the terminal. Idempotent."""
        self._detach()
        self._ended.set()
        self._restore_terminal()

    @property
    def running(self) -> bool:
        return self._reading

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for reading to end (EOF, quit or close)."""
        if self._feed is None:
            return True
        return self._ended.wait(timeout)

    def _end(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.stdin_fd)     # False for a drained file: nothing to remove
        self._reading = False
        self._restore_terminal()
        self._ended.set()

    def _drain_file(self) -> None:
        """stdin is a regular file: one chunk per loop turn until its end."""
        if self._reading and self._loop is not None:
            self._on_readable()
            if self._reading and self._loop is not None:
                self._loop.call_soon_threadsafe(self._drain_file)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.stdin_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("console input ended: %s", e)
            self._end()
            return
        if not data:
            log.debug("console input: end of file")
            self._end()
            return
        self.bytes_in += len(data)
        if self._escapes is None:
            self._feed(data)
            return
        result = self._escapes.feed(data)
        if result.to_guest:
            self._feed(result.to_guest)
        if result.show_help:
            self.write(HELP_TEXT)
        if result.quit:
            self._end()
            self._on_quit()

    # --- terminal mode ------------------------------------------------------

    def _enter_raw(self) -> None:
        import termios
        import tty

        try:
            self._saved_termios = termios.tcgetattr(self.stdin_fd)
            tty.setraw(self.stdin_fd, termios.TCSANOW)
            # Keep output post-processing so host log lines still start at
            # column 0; the guest sends CR LF itself.
            mode = termios.tcgetattr(self.stdin_fd)
            mode[1] |= termios.OPOST | termios.ONLCR
            termios.tcsetattr(self.stdin_fd, termios.TCSANOW, mode)
        except termios.error as e:
            log.warning("cannot put the terminal in raw mode: %s", e)
            self._saved_termios = None
            return
        atexit.register(self._restore_terminal)

    def _restore_terminal(self) -> None:
        saved, self._saved_termios = self._saved_termios, None
        if saved is None:
            return
        import termios

        try:
            termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, saved)
        except termios.error as e:
            log.warning("cannot restore the terminal: %s", e)
