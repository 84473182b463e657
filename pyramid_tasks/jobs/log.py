"""One INFO line per step of a job's life, each step on a logger of its own.

``pyramid_tasks.jobs.scheduled``, ``.published``, ``.started``,
``.succeeded``, ``.failed``, ``.retried`` and ``.cancelled``: the INI's
``[logger_...]`` sections turn them on or off together (``qualname =
pyramid_tasks.jobs``) or one by one.  Every line names the job the same way
(its task name, id, queue and title)::

    Job myapp.tasks.receipt[3f2c...] succeeded in 0.214 s: queue mail, title 'No 12'

A line is formatted only when its logger is enabled for INFO, and a batch
(the jobs of one commit) asks once.
"""

import logging
import time

from ..masking import mask_secrets

__all__ = [
    "CANCELLED",
    "FAILED",
    "PUBLISHED",
    "RETRIED",
    "SCHEDULED",
    "STARTED",
    "STEPS",
    "SUCCEEDED",
    "batch",
    "committed",
    "enabled",
    "error",
    "keep_rows",
    "line",
    "run",
]

SCHEDULED = "scheduled"
PUBLISHED = "published"
STARTED = "started"
SUCCEEDED = "succeeded"
FAILED = "failed"
RETRIED = "retried"
CANCELLED = "cancelled"
STEPS = (SCHEDULED, PUBLISHED, STARTED, SUCCEEDED, FAILED, RETRIED, CANCELLED)

_loggers = {step: logging.getLogger(f"pyramid_tasks.jobs.{step}") for step in STEPS}


def enabled(step):
    """Whether ``step``'s lines are logged (INFO on its logger)."""
    return _loggers[step].isEnabledFor(logging.INFO)


def line(step, job_id, name, queue, title, detail=None):
    """The line of one job: ``Job NAME[ID] STEP DETAIL: queue Q, title T``."""
    logger = _loggers[step]
    if logger.isEnabledFor(logging.INFO):
        _emit(logger, step, job_id, name, queue, title, detail)


def error(exc):
    """``(Class: message)`` of ``exc`` on one line (500 characters at
    most), secrets masked."""
    text = " ".join(mask_secrets(f"{type(exc).__name__}: {exc}").split())
    return f"({text[:500]})"


def _emit(logger, step, job_id, name, queue, title, detail=None):
    what = f"{step} {detail}" if detail else step
    if title is None:
        logger.info("Job %s[%s] %s: queue %s", name, job_id, what, queue)
    else:
        logger.info(
            "Job %s[%s] %s: queue %s, title %r", name, job_id, what, queue, title
        )


# -- the web side: the jobs of one commit ------------------------------------


def keep_rows(sends, rows):
    """Keep each send's row for its lines after the commit; only when they
    are logged (10,000 sends cost nothing otherwise)."""
    if enabled(SCHEDULED) or enabled(PUBLISHED):
        for send, row in zip(sends, rows, strict=True):
            send.row = row


def batch(step, rows):
    """The lines of ``rows`` (mappings with ``id``, ``name``, ``queue`` and
    ``title``), the logger asked once."""
    logger = _loggers[step]
    if logger.isEnabledFor(logging.INFO):
        for row in rows:
            _emit(logger, step, row["id"], row["name"], row["queue"], row["title"])


def committed(step, sends):
    """The lines of committed ``sends``, the logger asked once: from their
    rows (:func:`keep_rows`), else from their task and options."""
    logger = _loggers[step]
    if logger.isEnabledFor(logging.INFO):
        for send in sends:
            row = getattr(send, "row", None) or _row(send)
            _emit(logger, step, row["id"], row["name"], row["queue"], row["title"])


def _row(send):
    queue = send.options.get("queue")
    return {
        "id": send.task_id,
        "name": send.task.name,
        "queue": getattr(queue, "name", queue),
        "title": getattr(send, "title", None),
    }


# -- the worker side: a run (pyramid_tasks.jobs.worker.JobRun) ---------------


def run(step, job_run, exc=None):
    """The line of ``job_run``: its attempt when it starts, its duration
    when it succeeds, ``exc`` when it failed, Celery's ``Retry`` ``exc``
    when it was retried."""
    logger = _loggers[step]
    if not logger.isEnabledFor(logging.INFO):
        return
    if step == STARTED:
        detail = f"(attempt {job_run.attempt})"
    elif step == SUCCEEDED:
        detail = f"in {time.monotonic() - job_run.began:.3f} s"
    elif step == RETRIED:
        cause = "" if exc.exc is None else f" {error(exc.exc)}"
        detail = f"{exc.humanize()}{cause}"
    else:
        detail = error(exc)
    queue = (job_run.request.delivery_info or {}).get("routing_key")
    _emit(logger, step, job_run.id, job_run.task.name, queue, job_run.title, detail)
