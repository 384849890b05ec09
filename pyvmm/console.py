"""The terminal side of the guest's serial port.

`Console.write` is the UART's output sink.  `Console.start` runs a daemon
thread that reads the host's stdin and feeds the bytes to the UART:

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
import select
import sys
import threading
from typing import BinaryIO, Callable, NamedTuple

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
    """Host terminal for one serial port. Raises nothing on construction;
    `start` raises OSError only if the wake-up pipe cannot be made."""

    def __init__(self, stdin_fd: int = 0, stdout: BinaryIO | None = None):
        self.stdin_fd = stdin_fd
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self._out_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._saved_termios: list | None = None
        self._stopping = threading.Event()
        self.is_tty = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._output_broken = False

    def __repr__(self) -> str:
        state = "running" if self._thread and self._thread.is_alive() else "stopped"
        return f"Console(fd={self.stdin_fd}, tty={self.is_tty}, {state})"

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

    def start(self, feed: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        """Starts the stdin reader thread. `feed` gets the bytes for the guest;
        `on_quit` is called once on Ctrl-A x (TTY only)."""
        if self._thread is not None:
            return
        self._wake_r, self._wake_w = os.pipe()
        try:
            self.is_tty = os.isatty(self.stdin_fd)
        except OSError:
            self.is_tty = False
        if self.is_tty:
            self._enter_raw()
        self._thread = threading.Thread(target=self._run, args=(feed, on_quit),
                                        name="pyvmm-console", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops the reader thread and restores the terminal. Idempotent."""
        self._stopping.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._restore_terminal()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the reader thread to end (EOF, quit or close)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, feed: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        escapes = EscapeFilter() if self.is_tty else None
        try:
            while not self._stopping.is_set():
                try:
                    ready, _, _ = select.select([self.stdin_fd, self._wake_r], [], [])
                except (OSError, ValueError):
                    break
                if self._wake_r in ready or self._stopping.is_set():
                    break
                try:
                    data = os.read(self.stdin_fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as e:
                    log.debug("console input ended: %s", e)
                    break
                if not data:
                    log.debug("console input: end of file")
                    break
                self.bytes_in += len(data)
                if escapes is None:
                    feed(data)
                    continue
                result = escapes.feed(data)
                if result.to_guest:
                    feed(result.to_guest)
                if result.show_help:
                    self.write(HELP_TEXT)
                if result.quit:
                    self._restore_terminal()
                    on_quit()
                    break
        except Exception:  # a bug in feed(): never leave the terminal raw
            log.exception("console input thread failed")
        finally:
            self._restore_terminal()

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
