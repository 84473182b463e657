"""Worker side of durable mode: each run of a job recorded in its row.

A run is marked ``started`` (attempt + 1, a heartbeat) and a job that
already succeeded or was cancelled is not run.  A transactional task locks
its job inside its own transaction before the body and writes ``succeeded``
in that transaction, so its effects and its mark commit together and a
second delivery of the message changes nothing.  Other classes record the
outcome after the body.  A delivery that changes nothing ends in Celery's
``Ignore``: acknowledged, no result, no callback.

The ``started`` mark comes first, in a statement of its own, except for a
transactional run with ``acks_late`` and ``reject_on_worker_lost`` on
PostgreSQL (the durable default): there the mark guards nothing (the broker
delivers the message again if the worker dies, and the lock fences the
effects), so the run reads its job's state and attempts with its lock and
the heartbeat thread writes ``started`` only for a run still going
:data:`START_MARK_DELAY` seconds later.  A run that ends first writes the
start with its outcome, in one statement.
"""

import logging
import math
import os
import sqlite3
import threading
import time

from celery.exceptions import Ignore, Reject, Retry
from kombu.utils import json as kombu_json
from pyramid.exceptions import ConfigurationError
from sqlalchemy.exc import DBAPIError, OperationalError
from zope.sqlalchemy import mark_changed

from ..options import TITLE_HEADER, WORKSPACE_HEADER
from . import log as joblog
from .events import JobFailed, JobStarted, JobSucceeded
from .model import CANCELLED, FAILED, RUNNABLE, STARTED, SUCCEEDED, utcnow
from .store import one_line
from .workflow import WORKFLOW_HEADER, follow_step

__all__ = ["JobCancelled", "JobRun", "durable_task_options"]

log = logging.getLogger(__name__)

# The message header counting the sends of a job the database was down for.
_SENDS_HEADER = "pyramid_tasks_unreachable_sends"

# Seconds between two progress writes of one run (the last one always goes).
PROGRESS_INTERVAL = 0.5
# Seconds between two reads of the job's state by cancel_requested().
CANCEL_CHECK_INTERVAL = 1.0
# Seconds a deferred run goes before the heartbeat thread marks it started.
START_MARK_DELAY = 0.5


class JobCancelled(Exception):
    """The job stopped being runnable while its transactional body ran (an
    operator cancelled it, or another delivery finished it first): the
    body's transaction is rolled back.  ``state`` is the job's state."""

    def __init__(self, job_id, state):
        super().__init__(job_id, state)
        self.job_id = job_id
        self.state = state


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
    around the task call.  Entering it raises Celery's ``Ignore`` when the job
    must not run (it took effect already, or was cancelled): the message is
    acknowledged, and no result is stored and no callback sent."""

    __slots__ = (
        "attempt",
        "began",
        "deferred",
        "jobs",
        "last_cancel_check",
        "last_progress",
        "progress_unrecorded",
        "request",
        "seen",
        "session",
        "started_at",
        "task",
        "title",
        "took_effect",
        "transactional",
        "was_cancelled",
        "workspace_read",
        "workspace_value",
    )

    def __init__(self, jobs, task, transactional):
        self.jobs = jobs
        self.task = task
        self.request = task.request
        self.transactional = transactional
        self.attempt = None
        self.title = None
        self.began = None
        # A started mark this run owes (not landed yet): see the module's
        # docstring.  ``seen``: the attempts its lock read; ``started_at``.
        self.deferred = False
        self.seen = None
        self.started_at = None
        # False when this run's mark did not land: the lock found the job
        # done (another delivery) or cancelled, or it was cancelled meanwhile.
        self.took_effect = True
        self.last_progress = 0.0
        self.last_cancel_check = 0.0
        self.was_cancelled = False
        self.progress_unrecorded = False
        # The task's session (transactional: set by lock()); the workspace
        # as read (its JSON, to see a change) and as the body changes it.
        self.session = None
        self.workspace_read = None
        self.workspace_value = None

    @property
    def id(self):
        return self.request.id

    def __enter__(self):
        task = self.task
        if (
            self.transactional
            and task.acks_late
            and task.reject_on_worker_lost
            and self.jobs.store.dialect == "postgresql"
        ):
            self.deferred = True
            self.started_at = utcnow()
            self.began = time.monotonic()
        else:
            self._start()
            self._notify_started()
        _running.add(self)
        return self

    def _start(self):
        """The ``started`` mark, now; raises Celery's ``Ignore`` when the job
        must not run."""
        try:
            self.attempt, state, self.title = self.jobs.store.start(
                self._row(), acked=not self.task.acks_late
            )
        except Exception as exc:
            if not _database_unreachable(exc):
                raise
            # Nothing ran and nothing is recorded: acknowledging this message
            # would leave the job queued with no message to run it.
            self._send_again(exc)
        if self.attempt is None:
            log.info("Job %s[%s] is %s: not run.", self.task.name, self.id, state)
            self.took_effect = False
            raise Ignore()  # acknowledged, no result, no callbacks
        self.deferred = False
        joblog.run(joblog.STARTED, self)
        self.began = time.monotonic()

    def _row(self):
        """The job as its message describes it (a row to make if missing)."""
        request = self.request
        return {
            "id": request.id,
            "name": self.task.name,
            "args": list(request.args or ()),
            "kwargs": dict(request.kwargs or {}),
            "queue": (request.delivery_info or {}).get("routing_key"),
            # A workflow's step: the workflow's (else the task that sent it).
            "parent_id": (_header(request, WORKFLOW_HEADER) or {}).get("id")
            or request.parent_id,
            # apply_async(title=...) without tm=: a header (eager: in headers).
            "title": _header(request, TITLE_HEADER),
            "workspace": _header(request, WORKSPACE_HEADER),
            # What the relay needs to send it again (a lease expired).
            "options": _message_options(request),
        }

    def __exit__(self, exc_type, exc, tb):
        _running.discard(self)  # a deferred start landed, or never will
        store = self.jobs.store
        if not self.transactional:
            self._save_workspace()
        # The events follow the row: none when this run's mark did not land
        # (the job was cancelled meanwhile, or another delivery had it).
        # A mark that fails is logged: the body's outcome stands, and a job
        # left "started" is re-run when its lease expires (at least once).
        if exc is None:
            if not self.transactional:
                self.took_effect = self._marked(store.succeed)
            if self.took_effect:
                joblog.run(joblog.SUCCEEDED, self)
                self.jobs.notify(JobSucceeded, self)
                self._workflow_step(SUCCEEDED)
            return False
        if not isinstance(exc, Exception):
            # SystemExit or KeyboardInterrupt: the process is going away (a
            # terminate signal: the pool ending a child past its hard time
            # limit, a cold shutdown), not the job failing.  Its row is left
            # to the time limit's mark in the main process (which names the
            # limit: this mark raced it), a redelivery (acks_late) or its
            # lease; no JobFailed.
            log.warning(
                "Job %s[%s]: its run was interrupted %s; its row is left "
                "for the worker's main process, a redelivery or its lease.",
                self.task.name,
                self.id,
                joblog.error(exc),
            )
            return False
        if isinstance(exc, JobCancelled):
            if self.deferred and self.seen is not None:
                self._marked(store.record_attempt)
            log.info(
                "Job %s[%s] became %s while it ran: rolled back.",
                self.task.name,
                self.id,
                exc.state,
            )
            raise Ignore() from exc  # no result, no callbacks
        if isinstance(exc, Ignore | Reject):
            # A delivery the lock found done or cancelled (took_effect is
            # False) changes nothing.  Otherwise Celery's Ignore (raised by
            # self.replace(), which sends the replacement under the job's id)
            # or Reject is not a failure: the job waits in line again.
            if self.took_effect:
                self._marked(store.requeued)
            return False
        if isinstance(exc, Retry):
            self._marked(store.retrying, exc.exc)
            joblog.run(joblog.RETRIED, self, exc)  # sent again, row or not
            return False
        if self.transactional and _database_unreachable(exc):
            # The run's transaction lost its database: its effects rolled
            # back or, the COMMIT lost on its way back, committed with the
            # job's succeeded mark, which the next run finds.  Either way a
            # second run is safe; failing the job would lose it.
            self._marked(store.retrying, exc)
            self._send_again(exc)
        if self._marked(store.fail, exc):
            joblog.run(joblog.FAILED, self, exc)
            self.jobs.notify(JobFailed, self, exc)
            self._workflow_step(FAILED, exc)
        return False

    def _marked(self, mark, *args):
        """``mark(id, attempt, *args)``; False, logged, when it fails.  A
        deferred ``started`` mark that did not land is written with it (or
        first, on its own, by a run that never read its row)."""
        try:
            if self.deferred and self.seen is not None:
                return mark(self.id, None, *args, start=(self.seen, self.started_at))
            if self.deferred:
                self.attempt, _, self.title = self.jobs.store.start(
                    self._row(), acked=False
                )
                if self.attempt is None:
                    return False
                self.deferred = False
            return mark(self.id, self.attempt, *args)
        except Exception as exc:
            log.warning(
                "Job %s[%s]: its row was not updated (%s): %s",
                self.task.name,
                self.id,
                mark.__name__,
                one_line(exc),
            )
            return False

    def _send_again(self, exc):
        """Send this job's message again in a while and raise Celery's
        ``Retry``, which acknowledges this one.  Celery's ``retry()`` would
        count against the task's ``max_retries``; the database coming back
        is not the task's business."""
        request, settings = self.request, self.jobs.settings
        if request.is_eager:  # run in the caller, nothing queued: it sees why
            raise exc
        # Sends so far (a message header): the delay doubles, up to a lease.
        sends = getattr(request, _SENDS_HEADER, None) or 0
        delay = min(settings.lease, settings.relay_interval * 2**sends)
        log.warning(
            "Job %s[%s]: the database is unreachable (%s): sent again in %g s.",
            self.task.name,
            self.id,
            one_line(exc),
            delay,
        )
        signature = self.task.signature_from_request(
            request,
            countdown=delay,
            retries=request.retries,
            headers={**(request.headers or {}), _SENDS_HEADER: sends + 1},
        )
        signature.apply_async()
        raise Retry(exc=exc, when=delay) from exc

    # -- inside the task's transaction --------------------------------------

    def _session(self, request):
        name = self.jobs.settings.request_session
        if not hasattr(type(request), name) and name not in vars(request):
            raise ConfigurationError(
                f"Setting tasks.jobs.request_session = {name!r}: the request of "
                f"task {self.task.name} has no attribute {name!r}; name the "
                "request attribute of the session joined to request.tm (the "
                "cookiecutter's is dbsession)."
            )
        return getattr(request, name)

    def lock(self, request):
        """Lock the job in ``request.tm``'s transaction; False: do not run."""
        session = self.session = self._session(request)
        first = self.deferred and self.seen is None
        state, attempts, title = self.jobs.store.lock(
            session.connection(),
            self.id,
            # Another delivery holds the lock: started now, as before a
            # lock that may take long.
            waiting=self._start_now if first else None,
        )
        if first and self.deferred:
            if state is None:  # sent without a row: made by the start
                self._start_now()  # Celery's Ignore if made finished since
            elif state not in RUNNABLE:
                log.info("Job %s[%s] is %s: not run.", self.task.name, self.id, state)
                self.took_effect = False
                return False
            else:
                # Its attempt until the started mark says (a delivery that
                # starts meanwhile counts too).
                self.seen, self.attempt, self.title = attempts, attempts + 1, title
                joblog.run(joblog.STARTED, self)
                self._notify_started()
                _running.defer_start(self)
                return True
        if state in (SUCCEEDED, CANCELLED):
            log.info(
                "Job %s[%s] is %s: this delivery changes nothing.",
                self.task.name,
                self.id,
                state,
            )
            self.took_effect = False
            return False
        return True

    def _start_now(self):
        self._start()
        self._notify_started()

    def succeed_in(self, request):
        """Write ``succeeded`` in ``request.tm``'s transaction."""
        session = self._session(request)
        connection = session.connection()
        start = None
        if self.deferred and not _running.settle(self):
            start = (self.seen, self.started_at)
        if self._workspace_changed():
            self.jobs.store.save_workspace(
                self.workspace_id(), self.workspace_value, connection
            )
        if not self.jobs.store.succeed_in(connection, self.id, start):
            raise JobCancelled(self.id, self.jobs.store.state(self.id, connection))
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
        if self.deferred and not _running.settle(self, write=True):
            return  # the job is no longer runnable
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

    def _notify_started(self):
        self.jobs.notify(JobStarted, self)
        self._workflow_step(STARTED)

    def _workflow_step(self, outcome, exc=None):
        """A workflow's step: its outcome on the workflow's row too; a
        failure is logged (the step's own row stands)."""
        step = _header(self.request, WORKFLOW_HEADER)
        if step is not None:
            follow_step(self.jobs.store, step, outcome, self.task.name, self.id, exc)

    def workspace_id(self):
        """Whose workspace this run has: its workflow's, else its own."""
        step = _header(self.request, WORKFLOW_HEADER)
        return self.id if step is None else step["id"]

    def workspace(self):
        """The workspace, read at the first call: in the run's transaction for
        the transactional classes (the row is locked), else on its own."""
        if self.workspace_read is None:
            connection = None if self.session is None else self.session.connection()
            value = self.jobs.store.workspace(self.workspace_id(), connection)
            self.workspace_value = {} if value is None else value
            self.workspace_read = _dumps(self.workspace_value)  # read only: no write
        return self.workspace_value

    def _workspace_changed(self):
        return (
            self.workspace_read is not None
            and _dumps(self.workspace_value) != self.workspace_read
        )

    def _save_workspace(self):
        """A non-transactional run's workspace, saved if changed; a failure is
        logged (the run's outcome stands)."""
        if not self._workspace_changed():
            return
        try:
            self.jobs.store.save_workspace(self.workspace_id(), self.workspace_value)
        except Exception as exc:
            log.warning(
                "Job %s[%s]: its workspace was not saved: %s",
                self.task.name,
                self.id,
                one_line(exc),
            )


def _header(request, name):
    """A header of the message (eager: in ``headers``)."""
    return getattr(request, name, None) or (request.headers or {}).get(name)


def _dumps(workspace):
    return kombu_json.dumps(workspace, sort_keys=True)


def _message_options(request):
    """The options to publish a delivered message again with: its queue, and
    the canvas it carries (the rest of a chain, callbacks, errbacks)."""
    options = {}
    queue = (request.delivery_info or {}).get("routing_key")
    if queue:
        options["queue"] = queue
    for option, value in (
        ("chain", request.chain),
        ("link", request.callbacks),
        ("link_error", request.errbacks),
        ("expires", request.expires),
        ("root_id", request.root_id),
        ("parent_id", request.parent_id),
    ):
        if value:
            options[option] = value
    step = _header(request, WORKFLOW_HEADER)
    if step is not None:  # sent again (a retry, a lease), still a step
        options["headers"] = {WORKFLOW_HEADER: step}
    return options


def _database_unreachable(exc):
    """The database refused or lost the connection, or (SQLite) stayed
    locked by another writer past the busy timeout; not a statement's error:
    a connection SQLAlchemy invalidated, an OperationalError the server gave
    no SQLSTATE (psycopg's connection refused, timed out...), or SQLite's
    "database is locked".  Nothing of the run committed: it may run again."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        return "database is locked" in str(orig)
    code = getattr(orig, "sqlstate", getattr(orig, "pgcode", False))
    return isinstance(exc, OperationalError) and code is None


class _Running:
    """The runs of this process, and the thread renewing their leases and
    writing the ``started`` marks deferred runs owe (:meth:`defer_start`).

    A deferred mark is written by that thread, or dropped, before the run's
    outcome is written (:meth:`settle`): a run's marks land in order."""

    def __init__(self):
        self.runs = set()
        self.condition = threading.Condition()
        self.due = {}  # deferred run: when its started mark is due
        self.writing = set()  # deferred runs whose mark is being written
        # When the thread's wait ends: a run due later needs no wake-up.
        self.wake_at = math.inf
        self.pid = None
        self.thread = None

    def add(self, run):
        with self.condition:
            self.runs.add(run)
            if self.pid != os.getpid():  # first run, or a forked child's
                self.pid = os.getpid()
                self.thread = threading.Thread(
                    target=self._beat,
                    args=(run.jobs.settings.lease / 3,),
                    name="pyramid_tasks-heartbeat",
                    daemon=True,
                )
                self.thread.start()

    def defer_start(self, run):
        with self.condition:
            due = self.due[run] = time.monotonic() + START_MARK_DELAY
            # Each run is due later than those before it: the thread is woken
            # (a switch of threads per task otherwise) only when it would
            # sleep past this one, after an idle spell.
            if due < self.wake_at:
                self.condition.notify_all()

    def settle(self, run, write=False):
        """No deferred started mark of ``run`` is written after this: it
        landed (True), or is dropped, or with ``write`` written now."""
        with self.condition:
            claimed = self.due.pop(run, None) is not None and write
            if claimed:
                self.writing.add(run)
            else:
                self.condition.wait_for(lambda: run not in self.writing)
        if claimed:
            self._start(run)
        return not run.deferred

    def discard(self, run):
        self.settle(run)
        with self.condition:
            self.runs.discard(run)

    def _beat(self, interval):
        next_beat = time.monotonic() + interval
        while True:
            with self.condition:
                while True:
                    now = time.monotonic()
                    due = [run for run, at in self.due.items() if at <= now]
                    if due or now >= next_beat:
                        break
                    self.wake_at = min([next_beat, *self.due.values()])
                    self.condition.wait(self.wake_at - now)
                for run in due:
                    del self.due[run]
                    self.writing.add(run)
            for run in due:
                self._start(run)
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + interval

    def _start(self, run):
        """Write ``run``'s deferred started mark (it is in ``writing``)."""
        attempt = None
        try:
            attempt = run.jobs.store.start_late(run.id, run.seen, run.started_at)
        except Exception as exc:
            log.warning(
                "Job %s[%s]: its row was not marked started: %s",
                run.task.name,
                run.id,
                one_line(exc),
            )
        with self.condition:
            if attempt is not None:
                run.attempt, run.deferred = attempt, False
            self.writing.discard(run)
            self.condition.notify_all()

    def beat(self):
        """Renew the leases of the running jobs, one UPDATE per job store."""
        with self.condition:
            stores = {}
            for run in self.runs:
                # A deferred run's attempt matches once its started mark
                # landed (None before its lock, matching nothing).
                stores.setdefault(run.jobs.store, []).append((run.id, run.attempt))
        for store, ids in stores.items():
            try:
                store.heartbeat(ids)
            except Exception as exc:
                log.warning("Job heartbeat failed: %s", one_line(exc))


_running = _Running()
# A forked child runs jobs of its own, with a heartbeat thread of its own.
os.register_at_fork(after_in_child=_running.__init__)
