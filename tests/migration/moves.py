"""Driving a live migration between two `pyvmm run` processes from a test:
wait for the destination to listen, then `migrate` over the source's QMP
socket until it completes (the source is then told to quit)."""

from __future__ import annotations

import time

from pyvmm.api.client import QmpClient

from ..guest_session import GuestSession

MIGRATE_S = 600.0


def wait_stderr(g: GuestSession, text: str, timeout: float = 120.0) -> None:
    """Waits until `text` is in g's stderr (e.g. "waiting for an incoming migration")."""
    deadline = time.monotonic() + timeout
    while text not in g.errors:
        assert g.proc.poll() is None and time.monotonic() < deadline, g.errors[-2000:]
        time.sleep(0.1)


def migrate(qsock: str, uri: str) -> dict:
    """Migrates the VM behind QMP socket `qsock` to `uri`; returns query-migrate's last answer."""
    qmp = QmpClient(qsock)
    try:
        qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + MIGRATE_S
        while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert info["status"] == "completed", info
        assert qmp.execute("query-status")["status"] == "postmigrate"
        qmp.execute("quit")
    finally:
        qmp.close()
    return info
