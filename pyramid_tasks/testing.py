"""Capture tasks in application tests instead of sending them.

.. code-block:: python

    config.include("pyramid_tasks.testing")  # or pyramid.includes in the INI

Scheduling still honours the transaction (abort and savepoint rollback drop,
commit records), nothing reaches a broker, and nothing runs until the test
asks.  With the pyramid-cookiecutter-starter's fixtures, whose ``tm`` is begun
and doomed and never commits, what a view schedules with ``tm=request.tm``
waits in :meth:`TaskCapture.pending`, and runs inside the test's transaction
and session with :meth:`TaskCapture.run_pending` or :meth:`CapturedTask.run`
(``run_pending(tm, dbsession=dbsession)``).
"""

from dataclasses import dataclass, field

from zope.sqlalchemy.datamanager import SessionDataManager

from .datamanager import (
    _ACTIVE,
    _DOOMED,
    NoActiveTransaction,
    Send,
    current_transaction,
    pending_sends,
    take_pending_sends,
)
from .task_classes import joining

__all__ = ["CapturedTask", "TaskCapture", "get_task_capture", "includeme"]


@dataclass
class CapturedTask:
    """One task the app sent or scheduled: what its message would carry.

    ``task``
        The Celery task, ``registry.celery_app.tasks[name]``; ``name`` is
        its name.
    ``args``
        The positional arguments, a tuple, as the worker would get them: they
        went through the task's serializer at the call (with JSON, a tuple
        inside comes back as a list).
    ``kwargs``
        The keyword arguments, a dict, likewise.
    ``options``
        The other keyword arguments of ``apply_async`` (``countdown``,
        ``eta``, ``priority``, ``queue`` with ``tasks.queue_prefix``
        applied...), never ``tm``, ``title`` or ``unique_key`` (job row
        columns): ``{}`` for ``delay()``.
    ``task_id``
        The id of the ``AsyncResult`` that ``apply_async`` or ``delay``
        returned, the id the message would carry.
    """

    task: object
    args: tuple
    kwargs: dict
    options: dict
    task_id: str

    # Where it was listed: its Send in a transaction's pending list, or the
    # capture's ``sent`` list.  Running it takes it off that list.
    _origin: object = field(default_factory=list, repr=False, compare=False)

    @property
    def name(self):
        return self.task.name

    def run(self, tm=None, *, dbsession=None, request_attributes=None):
        """Run it now, in-process; return its result (its exception propagates).

        It leaves the list it came from first, as a broker delivers a message
        once: a task of ``capture.pending(tm)`` is no longer pending (neither
        :meth:`TaskCapture.run_pending` nor the commit runs or sends it
        again), a task of ``capture.sent`` leaves ``sent``.  Calling ``run()``
        again on the same object runs it again.

        Without ``tm`` it runs as a worker would: in a request and transaction
        of its own, which see committed rows only.

        With ``tm``, a manager with an open transaction (the cookiecutter's
        doomed ``tm`` fixture), it runs inside that transaction: the task's
        ``request.tm`` is ``tm``.  Give ``dbsession=`` too (the cookiecutter's
        ``dbsession`` fixture), so that ``request.dbsession`` is the test's
        session and sees the test's uncommitted rows: without it the task
        would get a second session on a second connection, which sees none of
        them and can wait forever on the rows they lock, so that is refused
        while a SQLAlchemy session is joined to ``tm``'s transaction.  Other
        attributes to set on the task's request go in the mapping
        ``request_attributes``.  A transactional task's body, and each
        ``retryable`` call on ``request.tm``, runs once, without begin, commit
        or retries: the test's transaction is rolled back at the test's end.
        Tasks it schedules with ``tm=request.tm`` wait in
        ``capture.pending(tm)``.  A body that begins a transaction itself
        (``with request.tm:``) raises ``AlreadyInTransaction`` with an
        explicit manager such as the cookiecutter's.
        """
        attributes = _request_attributes(
            f"{self.name}.run", tm, dbsession, request_attributes
        )
        if tm is not None:
            _check_open(tm, f"{self.name}.run(tm=...)")
            _check_session(tm, attributes, f"{self.name}.run(tm=...)")
        self._leave_list()
        if tm is None:
            return self._apply()
        with joining(tm, attributes):
            return self._apply()

    def _leave_list(self):
        origin = self._origin
        if isinstance(origin, Send):
            origin.taken = True
        else:
            origin[:] = [captured for captured in origin if captured is not self]

    def _apply(self):
        return self.task.apply(
            self.args, self.kwargs, task_id=self.task_id, throw=True
        ).result


class TaskCapture:
    """The tasks of an app that included ``pyramid_tasks.testing``.

    ``sent`` lists, oldest first, the tasks sent at once (without ``tm=``) and
    those scheduled with ``tm=`` whose transaction committed, until they run
    (:meth:`run_sent` or :meth:`CapturedTask.run`).  It lives as
    long as the app: with an app fixture shared by several tests, call
    :meth:`clear` where a test starts.
    """

    def __init__(self):
        self.sent = []

    def record(self, task, args, kwargs, options, task_id):
        captured = CapturedTask(task, args, kwargs, options, task_id, self.sent)
        self.sent.append(captured)

    def pending(self, tm):
        """Tasks scheduled with ``tm=tm`` in its open transaction, not yet run.

        With a doomed test transaction, which never commits, this is where the
        tasks a view scheduled are found.
        """
        return [_captured(send) for send in pending_sends(tm)]

    def run_pending(self, tm, *, dbsession=None, request_attributes=None):
        """Run the tasks pending in ``tm`` inside its open transaction, and the
        tasks they schedule there, until none is left; return their results.

        Each runs as :meth:`CapturedTask.run` ``(tm, dbsession=dbsession,
        request_attributes=request_attributes)`` and leaves the pending list
        (a commit would not send it).  The first exception propagates; the
        tasks taken with it but not yet run are dropped.
        """
        call = "capture.run_pending(tm)"
        attributes = _request_attributes(call, tm, dbsession, request_attributes)
        _check_open(tm, call)
        _check_session(tm, attributes, call)
        results = []
        while sends := take_pending_sends(tm):
            for send in sends:
                results.append(_captured(send).run(tm, request_attributes=attributes))
        return results

    def run_sent(self):
        """Run the sent tasks in order, and those they send, until none is left.

        Each runs as a worker would, in its own request and transaction.
        Returns their results.
        """
        results = []
        while self.sent:
            results.append(self.sent.pop(0).run())
        return results

    def clear(self):
        """Forget the sent tasks."""
        self.sent.clear()


def _captured(send):
    return CapturedTask(
        send.task, send.args, send.kwargs, send.options, send.task_id, send
    )


def _request_attributes(call, tm, dbsession, request_attributes):
    attributes = dict(request_attributes or {})
    if "tm" in attributes:
        raise TypeError(
            f"{call}(request_attributes={{'tm': ...}}): give the transaction "
            "manager as tm="
        )
    if dbsession is not None:
        if "dbsession" in attributes:
            raise TypeError(
                f"{call}(dbsession=..., request_attributes={{'dbsession': ...}}): "
                "the session is given twice"
            )
        attributes["dbsession"] = dbsession
    if attributes and tm is None:
        raise TypeError(
            f"{call}({', '.join(attributes)}=...): request attributes need "
            "tm=, the transaction they belong to"
        )
    return attributes


def _check_session(tm, attributes, call):
    # The task's own request.dbsession would be a second session, on a second
    # connection, in the same transaction as the test's: blind to the test's
    # uncommitted rows and blocked by their locks (on PostgreSQL, for ever).
    if "dbsession" in attributes:
        return
    joined = current_transaction(tm)._resources
    if any(isinstance(resource, SessionDataManager) for resource in joined):
        raise TypeError(
            f"{call} without dbsession=: a SQLAlchemy session (the test's "
            "dbsession) already works in tm's transaction, and the task's own "
            "request.dbsession would be a second one on a second connection, "
            "which cannot see the test's rows and can wait for ever on their "
            "locks. Pass dbsession=dbsession to share the test's session."
        )


def _check_open(tm, call):
    txn = None if tm is None else current_transaction(tm)
    if txn is None or txn.status not in (_ACTIVE, _DOOMED):
        raise NoActiveTransaction(
            f"{call} runs inside the open transaction of tm, but tm has none: "
            "begin it first (the cookiecutter's tm fixture is begun), or call "
            "run() without tm= to give the task a transaction of its own."
        )


def get_task_capture(registry):
    """The :class:`TaskCapture` of an app that included this module."""
    return registry.pyramid_tasks_capture


def includeme(config):
    """Capture, do not send, every task of this app (``apply_async``, ``delay``,
    on-commit sends and eager mode alike)."""
    # Set before the include: under an autocommit Configurator
    # (``pyramid.testing.setUp()``) the include builds the app at once, and
    # the capture is what spares it a broker.
    config.registry.pyramid_tasks_capture = TaskCapture()
    config.include("pyramid_tasks")
