"""The task classes: each adds one thing to the one before."""

import functools
import threading
from contextlib import contextmanager

from celery import Task
from celery.exceptions import Ignore
from celery.utils.threads import LocalStack
from transaction.interfaces import AlreadyInTransaction, NoTransaction

from .datamanager import Send, active_transaction, schedule, snapshot
from .ids import uuid4
from .options import TITLE_HEADER, WORKSPACE_HEADER, job_options, warn_far_eta
from .publish import publish, raise_eager_errors
from .request import close_request, make_request
from .retry import in_transaction, lent_transaction, run_attempts

__all__ = [
    "PyramidTask",
    "RetryableTransactionTask",
    "ScheduleOnCommitTask",
    "TransactionalTask",
]


class _Execution:
    """One run of a task body; builds its request on first use.

    ``join`` is ``(tm, attributes)`` when the run joins a transaction it does
    not own (:func:`joining`): the request gets that ``tm`` and those
    attributes, and closing it leaves the transaction open.
    """

    __slots__ = ("attempt", "job", "join", "request", "task")

    def __init__(self, task, attempt=1, join=None, job=None):
        self.task = task
        self.attempt = attempt
        self.join = join
        self.job = job  # the JobRun in durable mode
        self.request = None

    def get_request(self):
        if self.request is None:
            registry = self.task.app.pyramid_registry
            settings = registry.pyramid_tasks_settings
            tm, attributes = self.join or (None, {})
            self.request = make_request(registry, settings.site_url, tm)
            self.request.transaction_attempt = self.attempt
            for name, value in attributes.items():
                setattr(self.request, name, value)
        return self.request

    def close(self):
        if self.request is not None:
            close_request(self.request, self.task.name, owns_tm=self.join is None)


# A task object is shared by every thread/greenlet of a worker, so the current
# execution lives on a per-thread stack (Celery's own LocalStack, the kind it
# keeps ``self.request`` on), never on ``self``.
_executions = LocalStack()

# Set by joining(): taken by the next execution started on this thread and by
# no other, so a task the body calls directly gets a transaction of its own.
_next_join = threading.local()


_NO_TRANSACTION = (
    "task {}: request.tm is an explicit transaction manager with no transaction: "
    "wrap the database work in `with request.tm:` or use base=TransactionalTask "
    "/ RetryableTransactionTask"
)
_ALREADY_IN_TRANSACTION = (
    "task {}: the body of a TransactionalTask already runs inside request.tm; "
    "remove `with request.tm:` (or use base=PyramidTask to manage transactions "
    "yourself)"
)


def _raise_hint(error, execution, message):
    """Raise ``error``'s class again with ``message``, chained, if this
    execution's ``request.tm`` raised ``error``.

    ``transaction`` raises ``NoTransaction`` and ``AlreadyInTransaction``
    without a message; the same class keeps every ``except`` working.  Only
    the manager's own frame counts: an error of another manager, or
    ``retryable``'s own, already worded one, is left as it is.
    """
    request = execution.request
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    if request is not None and traceback.tb_frame.f_locals.get("self") is request.tm:
        raise type(error)(message.format(execution.task.name)) from error


@contextmanager
def joining(tm, attributes):
    """Run the next task execution on this thread inside ``tm``'s open transaction.

    Its request's ``tm`` is ``tm`` and ``attributes`` are set on it
    (``dbsession=...``); transactional task bodies and ``retryable`` calls on
    ``tm`` run in that transaction without begin, commit or retries
    (:func:`~pyramid_tasks.retry.lent_transaction`).  Used by
    :mod:`pyramid_tasks.testing`.
    """
    _next_join.value = (tm, attributes)
    try:
        with lent_transaction(tm):
            yield
    finally:
        _next_join.value = None


class PyramidTask(Task):
    """A Celery task that runs like a Pyramid view.

    ``self.get_request()`` returns the request of this execution, built from
    the app's registry with its request factory and request methods (so
    ``request.dbsession`` works), ``tasks.site_url`` applied and ``request.tm``
    a new explicit transaction manager.  When the execution ends, success or
    failure, finished callbacks run and the threadlocals are popped.
    """

    def __call__(self, *args, **kwargs):
        run = self._job_run()
        if run is None:
            return self._call(args, kwargs, None)
        with run:  # records the job's run in its row
            return self._call(args, kwargs, run)

    def _call(self, args, kwargs, job):
        with self._execution(job=job) as execution:
            return self._run_body(execution, args, kwargs)

    def _job_run(self):
        """A :class:`~pyramid_tasks.jobs.worker.JobRun` in durable mode, for a
        delivered message (not a direct call, nor a task run by
        :mod:`pyramid_tasks.testing`)."""
        registry = self.app.pyramid_registry
        jobs = getattr(registry, "pyramid_tasks_jobs", None)
        if (
            jobs is None
            or getattr(_next_join, "value", None) is not None
            # pyramid_tasks.testing runs captured tasks as often as asked.
            or getattr(registry, "pyramid_tasks_capture", None) is not None
        ):
            return None
        request = self.request
        if request.called_directly:
            return None
        from .jobs.worker import JobRun

        return JobRun(jobs, self, isinstance(self, TransactionalTask))

    def _current_job(self):
        execution = _executions.top
        if execution is None or execution.task is not self:
            return None
        return execution.job

    @property
    def job(self):
        """The job row of this run, as a dict (durable mode), else None."""
        run = self._current_job()
        return None if run is None else run.row()

    @property
    def workspace(self):
        """The job's workspace (``apply_async(workspace={...})``): a dict to
        read and change in place (durable mode), else None.

        Read at first use; changes are saved with the run's own transaction
        for the transactional classes (so a run that fails or is retried
        saves nothing), in a short transaction of their own when the run ends
        for the other classes.
        """
        run = self._current_job()
        return None if run is None else run.workspace()

    def set_progress(self, current, total=None, message=None):
        """Record the run's progress: ``current`` of ``total`` (or a
        percentage), and a message; throttled, visible while it runs.  Does
        nothing outside durable mode."""
        run = self._current_job()
        if run is not None:
            run.set_progress(current, total, message)

    def cancel_requested(self):
        """Whether an operator cancelled this job while it runs (checked at
        most once a second): return early when it is.  Always False outside
        durable mode."""
        run = self._current_job()
        return run is not None and run.cancel_requested()

    @contextmanager
    def _execution(self, attempt=1, job=None):
        join, _next_join.value = getattr(_next_join, "value", None), None
        execution = _Execution(self, attempt, join, job)
        _executions.push(execution)
        try:
            yield execution
        finally:
            _executions.pop()
            execution.close()

    def _run_body(self, execution, args, kwargs):
        # try costs nothing until the body raises: the hint is made only then.
        try:
            return self._call_body(args, kwargs)
        except NoTransaction as error:
            _raise_hint(error, execution, _NO_TRANSACTION)
            raise

    def _call_body(self, args, kwargs):
        return super().__call__(*args, **kwargs)

    def get_request(self):
        """The Pyramid request of the current execution (the same every call)."""
        execution = _executions.top
        if execution is None or execution.task is not self:
            raise RuntimeError(
                f"{self.name}.get_request() is only available while the task "
                "runs (in its body, on a worker, eagerly or called directly)."
            )
        return execution.get_request()

    def apply_async(self, args=None, kwargs=None, task_id=None, **options):
        if "tm" in options:
            # Sending at once what the caller meant to send on commit would
            # break the promise silently; Celery would also try to put the
            # manager in the message.
            raise TypeError(
                f"{self.name} cannot send on commit: its base class sends at "
                "once. Declare it with base=ScheduleOnCommitTask (or a "
                "transactional task class) to use apply_async(..., tm=...)."
            )
        registry = self.app.pyramid_registry
        jobs = getattr(registry, "pyramid_tasks_jobs", None)
        title, unique_key, workspace = job_options(self, jobs, options)
        _prefix_queue(registry, options)
        warn_far_eta(self, options)
        if unique_key is not None:
            return self._send_unique(
                jobs, args, kwargs, task_id, options, title, unique_key, workspace
            )
        capture = getattr(registry, "pyramid_tasks_capture", None)
        if capture is not None:  # pyramid_tasks.testing is included
            task_id = task_id or uuid4()
            args, kwargs = snapshot(self, args, kwargs, options)
            capture.record(self, args, kwargs, options, task_id)
            return self.AsyncResult(task_id)
        sent = options
        if title is not None or workspace is not None:
            # For the worker that makes the row, if it does.
            headers = dict(options.get("headers") or {})
            for header, value in ((TITLE_HEADER, title), (WORKSPACE_HEADER, workspace)):
                if value is not None:
                    headers[header] = value
            sent = {**options, "headers": headers}
        result = super().apply_async(args, kwargs, task_id, **sent)
        # Sent from a running task (retry(), a canvas in the body), the job's
        # row is made by the worker that starts it: writing it here could
        # wait for the lock of the sender's own transaction.
        if jobs is not None and _executions.top is None:
            jobs.record_sent(self, result.id, args, kwargs, options, title, workspace)
        return result

    def _send_unique(
        self, jobs, args, kwargs, task_id, options, title, unique_key, workspace
    ):
        """``apply_async(unique_key=...)`` without ``tm``: the row is committed
        first, in a short transaction of its own, then sent as on a commit
        (a send the broker refuses waits for the relay); or the unfinished
        job holding the key is returned."""
        if self.typing:
            self.__header__(*(args or ()), **(kwargs or {}))
        args, kwargs = snapshot(self, args, kwargs, options)
        options.pop("producer", None)
        options.pop("connection", None)
        send = Send(self, args, kwargs, options, task_id or uuid4(), None)
        send.title, send.unique_key, send.workspace = title, unique_key, workspace
        send.json = jobs.check(send)
        existing = jobs.claim(send)
        if existing is not None:
            return self.AsyncResult(existing)
        registry = self.app.pyramid_registry
        if self.app.conf.task_always_eager and not hasattr(
            registry, "pyramid_tasks_capture"
        ):
            # Run here, as Celery runs it: its error reaches the caller.
            return super().apply_async(args, kwargs, send.task_id, **options)
        jobs.publish(self.app, [send])
        return self.AsyncResult(send.task_id)


def _prefix_queue(registry, options):
    queue = options.get("queue")
    if isinstance(queue, str):
        options["queue"] = registry.pyramid_tasks_settings.queue_name(queue)


class ScheduleOnCommitTask(PyramidTask):
    """``apply_async(..., tm=request.tm)`` sends the task when ``tm`` commits.

    It returns the :class:`~celery.result.AsyncResult` at once; the arguments
    are serialized at the call.  Abort, doom, a failed commit or a rolled-back
    savepoint send nothing.  Without ``tm`` the task is sent at once, so
    ``retry()``, beat and canvas work unchanged.
    """

    def apply_async(self, args=None, kwargs=None, task_id=None, tm=None, **options):
        if tm is None:
            return super().apply_async(args, kwargs, task_id, **options)
        registry = self.app.pyramid_registry
        jobs = getattr(registry, "pyramid_tasks_jobs", None)
        title, unique_key, workspace = job_options(self, jobs, options)
        if self.typing:  # what Celery's apply_async checks, now, not after commit
            self.__header__(*(args or ()), **(kwargs or {}))
        task_id = task_id or uuid4()
        args, kwargs = snapshot(self, args, kwargs, options)
        # The options are final now: publish() gives them to Celery as they
        # are, with a producer of its own (a canvas passes the one it holds
        # during this call, released long before the commit).
        _prefix_queue(registry, options)
        warn_far_eta(self, options)
        options.pop("producer", None)
        options.pop("connection", None)
        send = Send(self, args, kwargs, options, task_id, tm)
        if jobs is None:
            schedule(tm, send, functools.partial(publish, self.app))
            return self.AsyncResult(task_id)
        send.title, send.unique_key, send.workspace = title, unique_key, workspace
        send.json = jobs.check(send)
        if unique_key is not None:
            # Written now, in the transaction: the unique index holds the key
            # for it until it commits or aborts.
            existing = jobs.write_unique(active_transaction(tm, self.name), send)
            if existing is not None:
                return self.AsyncResult(existing)
        schedule(tm, send, functools.partial(jobs.publish, self.app), jobs)
        jobs.created(send)
        return self.AsyncResult(task_id)


class TransactionalTask(ScheduleOnCommitTask):
    """The body runs inside ``request.tm``: begin, body, commit.

    The commit is part of the task: if it fails, the task fails.  Tasks the
    body schedules with ``tm=request.tm`` go out only when it succeeds.
    """

    def _run_body(self, execution, args, kwargs):
        tm = execution.get_request().tm
        result = in_transaction(
            tm, lambda: self._run_body_in_tm(execution, args, kwargs)
        )
        raise_eager_errors(tm)
        return result

    def _run_body_in_tm(self, execution, args, kwargs):
        # The body of a transactional task, run inside request.tm's transaction.
        # In durable mode the job is locked first and marked succeeded in the
        # same transaction: a second delivery finds it done.
        job = execution.job
        if job is not None and not job.lock(execution.get_request()):
            raise Ignore()  # done or cancelled: nothing to do, no callbacks
        try:
            result = self._call_body(args, kwargs)
        except AlreadyInTransaction as error:
            _raise_hint(error, execution, _ALREADY_IN_TRANSACTION)
            raise
        if job is not None:
            job.succeed_in(execution.request)
        return result


class RetryableTransactionTask(TransactionalTask):
    """A transactional task re-run on serialization failures and deadlocks.

    A retryable error in the body or at commit (SQLSTATE 40001, 40P01, or
    ``transaction``'s ``TransientError``; never 40003) aborts and runs the body
    again in a new request and transaction, up to ``tasks.retry.attempts``
    times with exponential backoff and full jitter.  Exhaustion raises
    :class:`pyramid_tasks.RetryAttemptsExhausted`.  The attempt number is
    ``request.transaction_attempt``.
    """

    def _call(self, args, kwargs, job):
        def attempt(number):
            with self._execution(number, job) as execution:
                tm = execution.get_request().tm
                result = in_transaction(
                    tm,
                    lambda: self._run_body_in_tm(execution, args, kwargs),
                    retry=True,
                )
                raise_eager_errors(tm)
                return result

        policy = self.app.pyramid_registry.pyramid_tasks_retry_policy
        return run_attempts(policy, attempt, self.name)
