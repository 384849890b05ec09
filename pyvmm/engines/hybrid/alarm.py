"""Interrupting a KVM_RUN in the hybrid engine's thread at a deadline.

The bt platform's timers (PIT, local APIC, RTC) are polled by the engine's
scheduler, not driven by host timers, so while a vCPU runs user code under
KVM nothing would end that KVM_RUN.  Before each run the engine arms a
POSIX timer aimed at its own thread (timer_create with SIGEV_THREAD_ID):
when the next timer deadline of the platform passes, the kernel sends that
thread the kick signal and KVM_RUN returns EINTR; bt then delivers the
interrupt.  A kernel timer, not a Python thread: waking a Python thread at
every KVM entry cost ~1 ms of GIL hand-over each time (measured).

A signal that lands just before KVM_RUN starts would be lost, so after its
first expiry the timer repeats every RETRY_S until disarmed.  Other threads
(an interrupt raised by a device thread, a stop request) call fire_now(),
which sets the vCPU's immediate_exit flag first — KVM_RUN then returns at
once even if it has not started yet — and signals the thread.

Raises EngineError when the timer cannot be created."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading

from ...errors import EngineError
from ..kvm import abi

KICK_SIGNAL = signal.SIGUSR1
CLOCK_MONOTONIC = 1
SIGEV_THREAD_ID = 4
RETRY_S = 0.001


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    ns = int(seconds * 1e9)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.timer_create.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p)]
_libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
_libc.timer_delete.argtypes = [ctypes.c_void_p]


class Alarm:
    def __init__(self):
        self._timer: ctypes.c_void_p | None = None
        self._target: int | None = None          # pthread ident of the engine's thread
        self._vcpu = None
        self._lock = threading.Lock()
        self._spec = _Itimerspec()
        self._off = _Itimerspec()
        self.fired = 0

    def start(self, target_ident: int) -> None:
        """Creates the timer aimed at the calling thread (the engine's)."""
        self._target = target_ident
        if self._timer is not None:
            return
        ev = _Sigevent(None, KICK_SIGNAL, SIGEV_THREAD_ID, threading.get_native_id())
        timer = ctypes.c_void_p()
        if _libc.timer_create(CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(timer)) != 0:
            raise EngineError(f"hybrid: timer_create: {os.strerror(ctypes.get_errno())}")
        self._timer = timer

    def stop(self) -> None:
        if self._timer is not None:
            _libc.timer_delete(self._timer)
            self._timer = None
        self._vcpu = None

    def arm(self, vcpu, delay_s: float) -> None:
        """Interrupts `vcpu`'s KVM_RUN after delay_s seconds (then every RETRY_S)."""
        self._vcpu = vcpu
        if self._timer is None:
            return
        spec = self._spec
        spec.value = _timespec(max(delay_s, 1e-6))
        spec.interval = _timespec(RETRY_S)
        _libc.timer_settime(self._timer, 0, ctypes.byref(spec), None)

    def disarm(self) -> None:
        with self._lock:
            self._vcpu = None
        if self._timer is not None:
            _libc.timer_settime(self._timer, 0, ctypes.byref(self._off), None)

    def fire_now(self) -> None:
        """Kicks the vCPU if it is (about to be) in KVM_RUN; any thread."""
        with self._lock:
            vcpu = self._vcpu
            if vcpu is None:
                return
            self.fired += 1
            vcpu.run_mm[abi.RUN_IMMEDIATE_EXIT] = 1
        if self._target is not None and self._target != threading.get_ident():
            try:
                signal.pthread_kill(self._target, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass
