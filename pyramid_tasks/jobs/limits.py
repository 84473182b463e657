"""Worker side of hard time limits (``tasks.default_time_limit``, Celery's
``task_time_limit`` or a task's ``time_limit``) in durable mode.

The prefork pool kills a child whose task ran past its hard limit: the run
never records its end, and its row would stay ``started`` until its lease
expired, then run again.  Celery reports the kill in the worker's main
process (``task_failure``, with ``TimeLimitExceeded``); there the job is
marked ``failed``, with an error naming the limit, and ``JobFailed`` sent.
"""

import logging
import threading
from types import SimpleNamespace

from celery import exceptions, signals

from . import log as joblog
from .events import JobFailed
from .model import FAILED, STARTED
from .store import one_line
from .workflow import WORKFLOW_HEADER, follow_step

__all__ = ["TimeLimitExceeded", "install", "time_limit_exceeded"]

log = logging.getLogger(__name__)


class TimeLimitExceeded(exceptions.TimeLimitExceeded):
    """Celery's, with a message (billiard's shows its arguments' repr)."""

    def __str__(self):
        return self.args[0]


def install(app):
    """Mark ``failed`` the jobs of ``app`` killed at their hard time limit."""

    def on_failure(sender=None, task_id=None, exception=None, **kwargs):
        if isinstance(exception, exceptions.TimeLimitExceeded) and sender.app is app:
            # Off the pool's thread: on SQLite the child, alive until just
            # after this signal, holds the database's write lock.
            threading.Thread(
                target=time_limit_exceeded,
                args=(app, sender, task_id, exception),
                name="pyramid_tasks-time-limit",
                daemon=True,
            ).start()

    signals.task_failure.connect(on_failure, weak=False)
    return on_failure


def time_limit_exceeded(app, task, job_id, exc):
    """Mark the ``started`` job ``job_id`` of ``task`` failed: its run was
    killed at its hard time limit.  True when this call marked it (Celery
    reports one kill twice, and a run that ended by itself marked its row)."""
    jobs = app.pyramid_registry.pyramid_tasks_jobs
    error = TimeLimitExceeded(_reason(app.pyramid_registry, exc))
    try:
        row = jobs.store.get(job_id)
        # fail() names the attempt read here: a newer run is never failed.
        if (
            row is None
            or row["state"] != STARTED
            or not jobs.store.fail(job_id, row["attempts"], error)
        ):
            return False
    except Exception as failure:
        log.warning(
            "Job %s[%s] was killed at its hard time limit; its row was not "
            "updated (its lease brings it back): %s",
            task.name,
            job_id,
            one_line(failure),
        )
        return False
    joblog.line(
        joblog.FAILED,
        job_id,
        task.name,
        row["queue"],
        row["title"],
        joblog.error(error),
    )
    # A workflow's step: the workflow fails with it.
    step = ((row["options"] or {}).get("headers") or {}).get(WORKFLOW_HEADER)
    if step is not None:
        follow_step(jobs.store, step, FAILED, task.name, job_id, error)
    owner = job_id if step is None else step["id"]  # whose workspace it has
    killed = SimpleNamespace(task=task, id=job_id, workspace_id=lambda: owner)
    jobs.notify(JobFailed, killed, error)
    return True


def _reason(registry, exc):
    seconds = exc.args[0] if exc.args else None
    if not isinstance(seconds, int | float):
        return "killed at its hard time limit"
    default = registry.pyramid_tasks_settings.default_time_limit
    setting = " (tasks.default_time_limit)" if seconds == default else ""
    return f"killed at its hard time limit of {seconds:g} s{setting}"
