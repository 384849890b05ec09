"""One whole-VM snapshot round trip (issue 19), for a Linux guest some
other test boots anyway with a qcow2 drive and a QMP socket: the guest
writes a file in RAM (/tmp) and is saved with snapshot-save while it
runs; it then changes that file and writes a file to the mounted qcow2
disk; snapshot-load brings it back, and its shell answers with the saved
RAM file and without the disk file written after the save."""

from __future__ import annotations

import json
import time

from .linux_pauses import QmpLine

JOB_TIMEOUT_S = 600.0


class QmpArgs(QmpLine):
    """QmpLine with arguments and the job layer."""

    def run(self, command: str, **arguments):
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\r\n")
        while True:
            reply = self._next()
            if "event" in reply:
                continue
            assert "error" not in reply, f"{command}: {reply['error']}"
            return reply["return"]

    def job(self, command: str, job_id: str, **arguments) -> dict:
        """Runs a job to its end; returns its query-jobs entry (dismissed)."""
        self.run(command, **{"job-id": job_id, **arguments})
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            info = {j["id"]: j for j in self.run("query-jobs")}[job_id]
            if info["status"] == "concluded":
                self.run("job-dismiss", id=job_id)
                return info
            assert time.monotonic() < deadline, info
            time.sleep(0.1)


def check_snapshot_round_trip(g, qmp_path: str, drive: str, mount: str, timeout: float = 600) -> None:
    """On GuestSession `g` at its shell, with the qcow2 drive `drive`
    (its id=) mounted at `mount` in the guest."""
    qmp = QmpArgs(qmp_path)
    where_drive = {"vmstate": drive, "devices": [drive]}
    try:
        sent = g.send("echo SNAP-BEFORE > /tmp/snap.txt && sync && echo READY-1\n")
        g.expect(r"\nREADY-1\r?\n", timeout, after=sent)
        saved = qmp.job("snapshot-save", "linux-save", tag="linux", **where_drive)
        assert "error" not in saved, saved
        sent = g.send(f"echo SNAP-AFTER > /tmp/snap.txt && echo x > {mount}/after.txt && sync && echo READY-2\n")
        g.expect(r"\nREADY-2\r?\n", timeout, after=sent)
        loaded = qmp.job("snapshot-load", "linux-load", tag="linux", **where_drive)
        assert "error" not in loaded, loaded
        assert qmp.run("query-status")["status"] == "running"
        sent = g.send(f"cat /tmp/snap.txt; ls {mount}/after.txt 2>&1 | grep -c 'No such'; echo READY-3\n")
        m = g.expect(r"\n(SNAP-\w+)\r?\n(\d+)\r?\nREADY-3", timeout, after=sent)
        assert (m.group(1), m.group(2)) == ("SNAP-BEFORE", "1"), m.group(0)
    finally:
        qmp.close()
