"""Background jobs as QEMU's job layer shows them to QMP clients (QEMU >= 6.0
snapshot-save/-load/-delete run as jobs): `query-jobs`, `job-dismiss`, and a
JOB_STATUS_CHANGE event for every status a job passes through.

A job here is created, started and finished on a thread of its own, with
QEMU's status sequence for a job that needs a manual dismiss:

    created -> running -> waiting -> pending -> concluded   (success)
    created -> running -> aborting -> concluded              (failure; query-jobs gives "error")
    concluded --job-dismiss--> null                          (gone from query-jobs)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .commands import CommandError

if TYPE_CHECKING:
    from .commands import Target

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    type: str
    status: str = "created"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def info(self) -> dict:
        """The job as query-jobs lists it (QEMU's JobInfo)."""
        finished = self.status in ("pending", "concluded", "waiting") and self.error is None
        out = {"id": self.id, "type": self.type, "status": self.status,
               "current-progress": 1 if finished else 0, "total-progress": 1}
        if self.error is not None:
            out["error"] = self.error
        return out


def _jobs(t: "Target") -> dict[str, Job]:
    jobs = getattr(t, "jobs", None)
    if jobs is None:
        jobs = t.jobs = {}
    return jobs


def _move(t: "Target", job: Job, status: str) -> None:
    job.status = status
    t.emit("JOB_STATUS_CHANGE", {"status": status, "id": job.id})


def start_job(t: "Target", job_id: str, kind: str, work: Callable[[], None]) -> Job:
    """Registers a job, announces created and running (before the command's
    reply, as QEMU's job_create/job_start do), and runs `work` on its own
    thread under the target's lock, so run-state commands wait for it.
    `work` raises CommandError (or any VmmError) to fail the job.
    Raises CommandError when the id is in use."""
    jobs = _jobs(t)
    if not job_id:
        raise CommandError("Invalid job ID ''")
    if job_id in jobs:
        raise CommandError(f"Job ID '{job_id}' already in use")
    job = jobs[job_id] = Job(job_id, kind)
    _move(t, job, "created")
    _move(t, job, "running")

    def main() -> None:
        from ..errors import VmmError
        with t.lock:
            try:
                work()
            except VmmError as e:
                job.error = str(e)
            except Exception as e:          # a bug must fail the job, not kill the thread silently
                log.exception("job %s failed", job_id)
                job.error = f"internal error: {e}"
        if job.error is None:
            for status in ("waiting", "pending", "concluded"):
                _move(t, job, status)
        else:
            log.info("job %s (%s) failed: %s", job_id, kind, job.error)
            _move(t, job, "aborting")
            _move(t, job, "concluded")
        job.done.set()

    threading.Thread(target=main, name=f"pyvmm-job-{job_id}", daemon=True).start()
    return job


def query_jobs(t: "Target", args: dict) -> list[dict]:
    return [job.info() for job in list(_jobs(t).values())]


def job_dismiss(t: "Target", args: dict) -> dict:
    jobs = _jobs(t)
    job = jobs.get(args["id"])
    if job is None:
        raise CommandError("Job not found")
    if job.status != "concluded":
        raise CommandError(f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'dismiss'")
    del jobs[job.id]
    _move(t, job, "null")
    return {}
