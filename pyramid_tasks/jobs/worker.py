"""Worker side of durable mode: each run of a job recorded in its row.

Every run is marked ``started`` (attempt + 1, a heartbeat) in a short
transaction first.  A job that already succeeded or was cancelled is not run.
A transactional task then locks its job inside its own transaction before the
body and writes ``succeeded`` in that transaction, so its effects and its mark
commit together and a second delivery of the message changes nothing.  Other
classes record the outcome in a short transaction after the body.
"""

import logging
import os
import threading
import time

from celery.exceptions import Retry
from zope.sqlalchemy import mark_changed

from .events import JobFailed, JobStarted, JobSucceeded
from .model import CANCELLED, SUCCEEDED

__all__ = ["JobCancelled", "JobRun", "durable_task_options"]

log = logging.getLogger(__name__)

# Seconds between two progress writes of one run (the last one always goes).
PROGRESS_INTERVAL = 0.5
# Seconds between two reads of the job's state by cancel_requested().
CANCEL_CHECK_INTERVAL = 1.0


class JobCancelled(Exception):
    """The job was cancelled while its transactional body ran: rolled back."""


def durable_task_options(base, options):
    """Durable mode's defaults for a task declared with ``options``.

    The transactional classes get the settings that redeliver a message
    whose worker died (``acks_late``, ``reject_on_worker_lost``): the job's
    lock makes a second delivery harmless.
    """
    from ..task_classes import TransactionalTask

    if isinstance(base, type) and issubclass(base, TransactionalTask):
        options.setdefault("acks_late", True)
        options.setdefault("reject_on_worker_lost", True)
    return options


class JobRun:
    """One delivery of a job's message to this worker: a context manager
    around the task call.  ``skip`` is true when the body must not run."""

    __slots__ = (
        "attempt",
        "done_before",
        "jobs",
        "last_cancel_check",
        "last_progress",
        "progress_unrecorded",
        "request",
        "skip",
        "task",
        "transactional",
        "was_cancelled",
    )

    def __init__(self, jobs, task, transactional):
        self.jobs = jobs
        self.task = task
        self.request = task.request
        self.transactional = transactional
        self.attempt = None
        self.skip = False
        self.last_progress = 0.0
        self.last_cancel_check = 0.0
        self.was_cancelled = False
        # The lock found the job finished by another delivery, or cancelled.
        self.done_before = False
        self.progress_unrecorded = False

    @property
    def id(self):
        return self.request.id

    def __enter__(self):
        request = self.request
        row = {
            "id": request.id,
            "name": self.task.name,
            "args": list(request.args or ()),
            "kwargs": dict(request.kwargs or {}),
            "queue": (request.delivery_info or {}).get("routing_key"),
            "parent_id": request.parent_id,
        }
        self.attempt, state = self.jobs.store.start(row)
        if self.attempt is None:
            self.skip = True
            log.info("Job %s[%s] is %s: not run.", self.task.name, self.id, state)
            return self
        _running.add(self)
        self.jobs.notify(JobStarted, self)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.skip:
            return False
        _running.discard(self)
        store = self.jobs.store
        if exc is None:
            if not self.transactional:
                store.succeed(self.id, self.attempt)
            if not self.done_before:
                self.jobs.notify(JobSucceeded, self)
            return False
        if isinstance(exc, JobCancelled):
            log.info(
                "Job %s[%s] was cancelled while it ran: rolled back.",
                self.task.name,
                self.id,
            )
            return True  # the task returns None
        if isinstance(exc, Retry):
            store.retrying(self.id, self.attempt, exc.exc)
            return False
        store.fail(self.id, self.attempt, exc)
        self.jobs.notify(JobFailed, self, exc)
        return False

    # -- inside the task's transaction --------------------------------------

    def _session(self, request):
        return getattr(request, self.jobs.settings.request_session)

    def lock(self, request):
        """Lock the job in ``request.tm``'s transaction; False: do not run."""
        session = self._session(request)
        state = self.jobs.store.lock(session.connection(), self.id)
        if state in (SUCCEEDED, CANCELLED):
            log.info(
                "Job %s[%s] is %s: this delivery changes nothing.",
                self.task.name,
                self.id,
                state,
            )
            self.done_before = True
            return False
        return True

    def succeed_in(self, request):
        """Write ``succeeded`` in ``request.tm``'s transaction."""
        session = self._session(request)
        if not self.jobs.store.succeed_in(session.connection(), self.id):
            raise JobCancelled(self.id)
        mark_changed(session)

    # -- from the body ------------------------------------------------------

    def set_progress(self, current, total=None, message=None):
        if self.transactional and self.jobs.store.dialect == "sqlite":
            # SQLite has one writer: the task's own transaction holds the
            # lock until the body ends, so the write could only wait for it
            # and fail the task with "database is locked".
            if not self.progress_unrecorded:
                self.progress_unrecorded = True
                log.warning(
                    "Job %s[%s]: progress is not recorded on SQLite while a "
                    "transactional task holds the database.",
                    self.task.name,
                    self.id,
                )
            return
        progress = round(100 * current / total) if total else round(current)
        progress = max(0, min(100, progress))
        now = time.monotonic()
        if progress < 100 and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        self.jobs.store.set_progress(self.id, self.attempt, progress, message)

    def cancel_requested(self):
        if self.was_cancelled:
            return True
        now = time.monotonic()
        if now - self.last_cancel_check >= CANCEL_CHECK_INTERVAL:
            self.last_cancel_check = now
            self.was_cancelled = self.jobs.store.state(self.id) == CANCELLED
        return self.was_cancelled

    def row(self):
        return self.jobs.store.get(self.id)


class _Running:
    """The runs of this process, and the thread renewing their leases."""

    def __init__(self):
        self.runs = set()
        self.lock = threading.Lock()
        self.pid = None
        self.thread = None

    def add(self, run):
        with self.lock:
            self.runs.add(run)
            if self.pid != os.getpid():  # first run, or a forked child's
                self.pid = os.getpid()
                self.thread = threading.Thread(
                    target=self._beat,
                    args=(run.jobs,),
                    name="pyramid_tasks-heartbeat",
                    daemon=True,
                )
                self.thread.start()

    def discard(self, run):
        with self.lock:
            self.runs.discard(run)

    def _beat(self, jobs):
        interval = jobs.settings.lease / 3
        while True:
            time.sleep(interval)
            with self.lock:
                ids = [run.id for run in self.runs]
            try:
                jobs.store.heartbeat(ids)
            except Exception as exc:
                log.warning("Job heartbeat failed: %s", " ".join(str(exc).split()))


_running = _Running()
