"""Capture tasks in application tests instead of sending them.

.. code-block:: python

    config.include("pyramid_tasks.testing")  # or pyramid.includes in the INI

Scheduling still honours the transaction (abort and savepoint rollback drop,
commit records), nothing reaches a broker, and nothing runs until the test
asks.  With the pyramid-cookiecutter-starter's fixtures, whose ``tm`` is begun
and doomed and never commits, what a view schedules with ``tm=request.tm``
waits in :meth:`TaskCapture.pending`, and runs inside the test's transaction
with :meth:`TaskCapture.run_pending` or :meth:`CapturedTask.run`.
"""

from dataclasses import dataclass

from .datamanager import (
    _ACTIVE,
    _DOOMED,
    NoActiveTransaction,
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
        applied...), never ``tm``: ``{}`` for ``delay()``.
    ``task_id``
        The id of the ``AsyncResult`` that ``apply_async`` or ``delay``
        returned, the id the message would carry.
    """

    task: object
    args: tuple
    kwargs: dict
    options: dict
    task_id: str

    @property
    def name(self):
        return self.task.name

    def run(self, tm=None, **request_attributes):
        """Run it now, in-process; return its result (its exception propagates).

        Without ``tm`` it runs as a worker would: in a request and transaction
        of its own, which see committed rows only.

        With ``tm``, a manager with an open transaction (the cookiecutter's
        doomed ``tm`` fixture), it runs inside that transaction: the task's
        ``request.tm`` is ``tm`` and ``request_attributes`` are set on its
        request, so ``run(tm=tm, dbsession=dbsession)`` shares the test's
        session and sees the test's uncommitted rows.  A transactional task's
        body, and each ``retryable`` call on ``request.tm``, runs once, without
        begin, commit or retries: the test's transaction is rolled back at the
        test's end.  Tasks it schedules with ``tm=request.tm`` wait in
        ``capture.pending(tm)``.  A body that begins a transaction itself
        (``with request.tm:``) raises ``AlreadyInTransaction`` with an
        explicit manager such as the cookiecutter's.
        """
        if tm is None:
            if request_attributes:
                raise TypeError(
                    f"{self.name}.run({', '.join(request_attributes)}=...): "
                    "request attributes need tm=, the transaction they belong to"
                )
            return self._apply()
        _check_open(tm, f"{self.name}.run(tm=...)")
        with joining(tm, request_attributes):
            return self._apply()

    def _apply(self):
        return self.task.apply(
            self.args, self.kwargs, task_id=self.task_id, throw=True
        ).result


class TaskCapture:
    """The tasks of an app that included ``pyramid_tasks.testing``.

    ``sent`` lists, oldest first, the tasks sent at once (without ``tm=``) and
    those scheduled with ``tm=`` whose transaction committed.  It lives as
    long as the app: with an app fixture shared by several tests, call
    :meth:`clear` where a test starts.
    """

    def __init__(self):
        self.sent = []

    def record(self, task, args, kwargs, options, task_id):
        self.sent.append(CapturedTask(task, args, kwargs, options, task_id))

    def pending(self, tm):
        """Tasks scheduled with ``tm=tm`` in its open transaction, not yet sent.

        With a doomed test transaction, which never commits, this is where the
        tasks a view scheduled are found.
        """
        return [_captured(send) for send in pending_sends(tm)]

    def run_pending(self, tm, **request_attributes):
        """Run the tasks pending in ``tm`` inside its open transaction, and the
        tasks they schedule there, until none is left; return their results.

        Each runs as :meth:`CapturedTask.run` ``(tm=tm, **request_attributes)``
        and leaves the pending list (a commit would not send it).  The first
        exception propagates; the tasks taken with it but not yet run are
        dropped.
        """
        _check_open(tm, "capture.run_pending(tm)")
        results = []
        while sends := take_pending_sends(tm):
            for send in sends:
                results.append(_captured(send).run(tm, **request_attributes))
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
    return CapturedTask(send.task, send.args, send.kwargs, send.options, send.task_id)


def _check_open(tm, call):
    txn = current_transaction(tm)
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
    config.include("pyramid_tasks")
    config.registry.pyramid_tasks_capture = TaskCapture()
