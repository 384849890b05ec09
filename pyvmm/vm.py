"""pyvmm's Python API: a VM as an object, for scripts that drive guests.

    from pyvmm import VM
    with VM(kernel="bzImage", engine="bt", mem=256, drives=["disk.qcow2"]) as vm:
        vm.start()
        vm.console.expect(r"login:", timeout=60)
        vm.pause()
        vm.snapshot("t1")                  # qcow2 internal snapshot; vm.restore("t1") goes back
        vm.save("vm.snap")                 # the whole VM in one file
        vm.resume()
        print(vm.qmp("query-status"))
    with VM.restore("vm.snap", engine="hybrid", kernel="bzImage", drives=["disk.qcow2"]) as vm:
        vm.start()                         # on from where save() was, under another engine

The VM runs as a `pyvmm run` child process with a QMP socket in a private
directory and its COM1 on the child's stdin/stdout, so one script can run
several VMs, a guest crash cannot take the script with it, and everything
goes through the same control plane a management tool uses. Errors are
VmmError subclasses with one-line messages (QmpError for a command the VM
refused)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .api.client import QmpClient, QmpConnectionError, QmpError
from .errors import StateError, VmmError

__all__ = ["VM", "Console", "QmpError", "VmmError"]

START_TIMEOUT_S = 60.0


class Console:
    """The guest's COM1: everything it printed, expect() and send()."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._out = bytearray()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name="pyvmm-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for chunk in iter(lambda: self._proc.stdout.read1(65536), b""):
            with self._cond:
                self._out += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    def mark(self) -> int:
        """Where the output ends now (for expect(after=))."""
        with self._cond:
            return len(self._out)

    def expect(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match:
        """Waits until the output from byte `after` on matches `pattern`.
        Raises VmmError on timeout or when the VM ended first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._out[after:].decode(errors="replace"))
                if m:
                    return m
                if time.monotonic() > deadline:
                    raise VmmError(f"console: {pattern!r} not seen in {timeout:g} s "
                                   f"(last output: {self._out[-200:].decode(errors='replace')!r})")
                if not self._thread.is_alive():
                    raise VmmError(f"console: {pattern!r} not seen before the VM ended "
                                   f"(exit {self._proc.poll()})")
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def join(self, timeout: float | None = None) -> None:
        """Waits for the reader to reach the end of the output (the VM ended)."""
        self._thread.join(timeout)

    def send(self, text: str | bytes) -> int:
        """Types `text` at the console; returns the mark before it."""
        where = self.mark()
        try:
            self._proc.stdin.write(text.encode() if isinstance(text, str) else text)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise VmmError("console: the VM has ended") from None
        return where


class _ClassOrInstanceMethod:
    """A method name with one meaning on the class and another on an
    instance: `VM.restore(path)` builds a VM, `vm.restore(...)` acts on one."""

    def __init__(self, on_class, on_instance):
        self._on_class = on_class          # a classmethod object
        self._on_instance = on_instance
        self.__doc__ = f"On the class: {on_class.__func__.__doc__}\n\nOn a VM: {on_instance.__doc__}"

    def __get__(self, obj, cls=None):
        if obj is None:
            return self._on_class.__get__(None, cls)
        return self._on_instance.__get__(obj, cls)


class VM:
    """One guest. Construct it, start() it, and stop() it (or use `with`)."""

    def __init__(self, kernel: str | None = None, *, initrd: str | None = None, append: str | None = None,
                 drives: list[str | dict] = (), nets: list[str] = (), engine: str = "auto", cpus: int = 1,
                 mem: int | str = 512, loadvm: str | None = None, extra_args: list[str] = (),
                 config: str | None = None):
        """drives: paths, or dicts of --drive keys (file, format, readonly, id).
        mem: MiB, or a QEMU-style size ("256M"). config: a JSON VM file
        instead of the other VM options (see from_config)."""
        args: list[str] = []
        if config is not None:
            args += ["--config", config]
        else:
            if kernel is not None:
                args += ["--kernel", str(kernel)]
            if initrd is not None:
                args += ["--initrd", str(initrd)]
            if append is not None:
                args += ["--append", append]
            args += ["--engine", engine, "--cpus", str(cpus), "--mem", str(mem)]
            for d in drives:
                args += ["--drive", _drive_spec(d)]
            for n in nets:
                args += ["--net", n]
        if loadvm is not None:
            args += ["--loadvm", loadvm]
        self.args = [*args, *extra_args]
        self.proc: subprocess.Popen | None = None
        self.console: Console | None = None
        self._qmp: QmpClient | None = None
        self._dir: str | None = None
        self._jobs = 0

    @classmethod
    def from_config(cls, path: str, **kw) -> "VM":
        """A VM described by a JSON file (`pyvmm run --print-config` writes one)."""
        return cls(config=path, **kw)

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else (f"exited {self.proc.returncode}"
                                                          if self.proc.poll() is not None else "running")
        return f"VM({' '.join(self.args)!r}, {state})"

    # -- life ------------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> "VM":
        """Starts the guest; returns once its QMP socket answers. Raises
        VmmError (with pyvmm's own message) when it does not come up."""
        if self.proc is not None:
            raise StateError("start: the VM was started already")
        self._dir = tempfile.mkdtemp(prefix="pyvmm-vm-")
        sock = os.path.join(self._dir, "qmp.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", *self.args,
                                      "--qmp", f"unix:{sock},server,wait=off"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr = bytearray()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        self.console = Console(self.proc)
        deadline = time.monotonic() + timeout
        while not os.path.exists(sock):
            if self.proc.poll() is not None:
                self._cleanup()
                raise VmmError(self._exit_message("did not start"))
            if time.monotonic() > deadline:
                self.kill()
                raise VmmError(f"the VM did not open its QMP socket in {timeout:g} s")
            time.sleep(0.02)
        try:
            self._qmp = QmpClient(sock, timeout=max(1.0, deadline - time.monotonic()))
        except QmpConnectionError:
            try:                                    # it ended on its way up: say why
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            self._cleanup()
            raise VmmError(self._exit_message("did not start")) from None
        return self

    def _pump_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._stderr += chunk

    def _exit_message(self, what: str) -> str:
        time.sleep(0.05)
        lines = bytes(self._stderr).decode(errors="replace").strip().splitlines()
        return f"the VM {what} (exit {self.proc.returncode}): {lines[-1] if lines else 'no message'}"

    @property
    def errors(self) -> str:
        """What pyvmm wrote to stderr so far."""
        return bytes(getattr(self, "_stderr", b"")).decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """Ends the VM (QMP quit; killed if it does not go) and returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.execute("quit")
            except VmmError:
                pass
        try:
            return self.wait(timeout)
        except VmmError:
            self.kill()
            return self.proc.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the guest to end by itself; its exit code. Raises VmmError on timeout."""
        if self.proc is None:
            raise StateError("wait: the VM was not started")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmmError(f"the VM is still running after {timeout:g} s") from None
        self._cleanup()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for stream in (self.proc.stdin,) if self.proc is not None else ():
            try:
                stream.close()
            except OSError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        elif self.proc is not None:
            self._cleanup()

    # -- control -----------------------------------------------------------------------------------
    def qmp(self, command: str, **arguments) -> Any:
        """Runs a QMP command (argument names with '-' as in QMP: pass
        them as **{"job-id": ...}). Raises QmpError."""
        if self._qmp is None:
            raise StateError(f"{command}: the VM is not running")
        return self._qmp.execute(command, arguments or None)

    @property
    def events(self) -> list[dict]:
        """The QMP events seen so far, oldest first."""
        return list(self._qmp.events) if self._qmp is not None else []

    def wait_event(self, name: str, timeout: float = 30.0, **match) -> dict:
        return self._qmp.wait_event(name, timeout, match=match or None)

    def hmp(self, line: str) -> str:
        return self.qmp("human-monitor-command", **{"command-line": line})

    def status(self) -> str:
        return self.qmp("query-status")["status"]

    def pause(self) -> None:
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    def _job(self, command: str, timeout: float, **arguments) -> None:
        self._jobs += 1
        job = f"pyvmm-api-{self._jobs}"
        since = len(self._qmp.events)
        self.qmp(command, **{"job-id": job, **arguments})
        self._qmp.wait_event("JOB_STATUS_CHANGE", timeout, since=since, match={"id": job, "status": "concluded"})
        info = next(j for j in self.qmp("query-jobs") if j["id"] == job)
        self.qmp("job-dismiss", id=job)
        if "error" in info:
            raise QmpError(command, "GenericError", info["error"])

    def _drives(self, drive: str | None, devices: list[str] | None) -> tuple[str, list[str]]:
        """The vmstate drive and the drives to snapshot (default: every writable one)."""
        if devices is None:
            devices = [b["device"] for b in self.qmp("query-block") if not b["inserted"]["ro"]]
        if not devices:
            raise VmmError("snapshot: the VM has no writable drive to keep it")
        return drive or devices[0], devices

    def snapshot(self, path: str | None = None, *, diff: bool = False, tag: str | None = None,
                 drive: str | None = None, devices: list[str] | None = None, timeout: float = 600.0):
        """vm.snapshot(path): saves the whole VM into snapshot file `path`,
        its writable qcow2 disks with it (an internal snapshot each, which
        loading the file reverts to); diff: only the pages written since
        the last save or load. Returns {"size", "runs", "kind"}.
        vm.snapshot(tag=T): QEMU's snapshot-save instead: the VM state into
        qcow2 drive `drive` (default the first writable one) and internal
        snapshot T on every drive in `devices`. Raises QmpError."""
        if (path is None) == (tag is None):
            raise TypeError("snapshot() takes a path or tag=..., not both")
        if path is not None:
            return self.save(path, diff=diff)
        drive, devices = self._drives(drive, devices)
        self._job("snapshot-save", timeout, tag=tag, vmstate=drive, devices=devices)
        return None

    def _restore_into(self, path: str | None = None, *, tag: str | None = None, drive: str | None = None,
                      devices: list[str] | None = None, timeout: float = 600.0) -> None:
        """vm.restore(path): the running or paused VM goes back to snapshot
        file `path` (vm.snapshot(path) wrote it), its qcow2 disks too.
        vm.restore(tag=T): back to the qcow2 internal snapshot T
        (snapshot-load). A paused VM stays paused. Raises QmpError."""
        if (path is None) == (tag is None):
            raise TypeError("restore() on a VM takes a path or tag=..., not both")
        if path is not None:
            self.load(path)
            return
        drive, devices = self._drives(drive, devices)
        self._job("snapshot-load", timeout, tag=tag, vmstate=drive, devices=devices)

    @classmethod
    def _restore_file(cls, path: str, engine: str | None = None, **kw) -> "VM":
        """VM.restore(path, engine=...): a VM, not yet started, that starts
        from snapshot file `path` (save() or `x-snapshot-file-save` wrote
        it) under `engine`, by default the one that saved it. cpus and mem
        default to the file's; the other keywords (kernel, drives, nets...)
        describe the machine that saved it, as for VM(). Raises VmmError
        (one line: a missing, truncated or corrupt file) before anything runs."""
        from .snapshot.file import read_header
        meta = read_header(str(path)).meta
        if kw.get("config") is None:
            kw.setdefault("cpus", meta.get("cpus", 1))
            kw.setdefault("mem", sum(size for _gpa, size in meta.get("ram", [])) >> 20 or 512)
            kw["engine"] = engine or meta.get("engine", "auto")
        elif engine is not None:
            raise VmmError("VM.restore: the engine of a config= VM is the config file's")
        return cls.from_snapshot(path, **kw)

    # VM.restore(path, engine=...) makes a VM from a snapshot file; on a VM,
    # vm.restore(path) or vm.restore(tag=...) takes it back in place.
    restore = _ClassOrInstanceMethod(_restore_file, _restore_into)

    def save(self, path: str, diff: bool = False) -> dict:
        """Saves the whole VM into snapshot file `path` (diff: only the pages
        written since the last save or load). Returns {"size", "runs", "kind"}.
        Raises QmpError."""
        return self.qmp("x-snapshot-file-save", path=str(path), type="diff" if diff else "full")

    def load(self, path: str) -> float:
        """Brings the running VM back to snapshot file `path`, its RAM mapped
        lazily; returns the milliseconds the load took inside the VMM.
        Raises QmpError."""
        return self.qmp("x-snapshot-file-load", path=str(path))["load-ms"]

    @classmethod
    def from_snapshot(cls, path: str, **kw) -> "VM":
        """A VM that starts from snapshot file `path` (`pyvmm run --restore`);
        kw describe the same machine as the one saved (engine may differ).
        VM.restore(path, engine=...) also takes cpus and mem from the file."""
        kw["extra_args"] = [*kw.get("extra_args", ()), "--restore", str(path)]
        return cls(**kw)

    def delete_snapshot(self, tag: str, devices: list[str] | None = None, timeout: float = 600.0) -> None:
        _, devices = self._drives(None, devices)
        self._job("snapshot-delete", timeout, tag=tag, devices=devices)


def _drive_spec(drive: str | dict) -> str:
    if isinstance(drive, str):
        return f"file={drive}"
    keys = []
    for key, value in drive.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        keys.append(f"{key}={value}")
    return ",".join(keys)
