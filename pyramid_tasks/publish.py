"""After the commit: publish a batch through one producer, or run it eagerly.

Never raises into the committed transaction: a send that fails is logged at
ERROR with the task name and id (secrets masked); eager failures wait for the
code that owns the commit (:func:`raise_eager_errors`).
"""

import logging
import sys
import traceback
import weakref
from collections import deque
from itertools import islice

from celery import Task
from kombu.exceptions import BatchPublishError, OperationalError

from .masking import mask_secrets

__all__ = [
    "EagerTaskFailed",
    "forget_eager_errors",
    "publish",
    "raise_eager_errors",
]

log = logging.getLogger(__name__)


def publish(app, sends):
    """Send a committed batch: eagerly in eager mode, else through one producer,
    pipelined where the transport allows it.

    Never raises: a committed transaction is not undone by a failed send.
    Each failure is logged at ERROR with the task name and id.
    """
    capture = getattr(app.pyramid_registry, "pyramid_tasks_capture", None)
    if capture is not None:
        for send in sends:
            capture.record(
                send.task, send.args, send.kwargs, send.options, send.task_id
            )
        return
    if app.conf.task_always_eager:
        _run_eagerly(app, sends)
        return
    unsent = _Unsent(sends)
    if len(sends) == 1:  # nothing to share: Celery's own path
        unsent.send(None, sends[0], fatal=())
        return
    try:
        with app.producer_or_acquire() as producer:
            fatal = (OperationalError, *producer.connection.connection_errors)
            while unsent.sends:
                chunk = list(islice(unsent.sends, _BATCH_SIZE))
                try:
                    # Where the transport allows (Redis), the chunk's pushes
                    # go out in one pipeline when the block ends.
                    with producer.batch(max_size=sys.maxsize):
                        for send in chunk:
                            unsent.send(producer, send, fatal)
                except BatchPublishError as exc:
                    # Some pushes of the pipeline may have landed: send the
                    # chunk again one at a time, at least once, never lost.
                    log.warning(
                        "Sending %d committed tasks again one at a time: %s",
                        len(chunk),
                        mask_secrets(exc.__cause__ or exc),
                    )
                    for send in chunk:
                        unsent.send(producer, send, fatal)
                        unsent.sends.popleft()
                else:
                    for _ in chunk:
                        unsent.sends.popleft()
    except Exception as exc:
        # The broker is unreachable (after Celery's publish retry policy):
        # the rest would each wait as long, so they are reported, not tried.
        unsent.report(exc)


# Sends per pipeline: bounds what one failed pipeline sends again.
_BATCH_SIZE = 1000


class _Unsent:
    """The sends of a batch not yet known to be sent or reported, in order."""

    def __init__(self, sends):
        self.sends = deque(sends)
        self._refused = set()  # id()s of sends already reported

    def send(self, producer, send, fatal):
        if id(send) in self._refused:
            return
        try:
            # Celery's own apply_async: the task's ran at the call, with tm=.
            Task.apply_async(
                send.task,
                send.args,
                send.kwargs,
                task_id=send.task_id,
                producer=producer,
                **send.options,
            )
        except fatal:
            raise
        except Exception as exc:  # this message only: a router, an encoder
            self._refused.add(id(send))
            _log_unsent(send, exc)

    def report(self, exc):
        for send in self.sends:
            if id(send) not in self._refused:
                _log_unsent(send, exc)


def _log_unsent(send, exc):
    # The traceback goes in as masked text: exc_info would print the raw
    # exception, broker password included.
    trace = mask_secrets("".join(traceback.format_exception(exc)))
    log.error(
        "Task %s[%s] was committed but could not be sent: %s\n%s",
        send.task.name,
        send.task_id,
        mask_secrets(exc),
        trace,
    )


# Eager tasks run from an after-commit hook, whose exceptions ``transaction``
# swallows; with task_eager_propagates they wait here for raise_eager_errors().
_eager_errors = weakref.WeakKeyDictionary()


def _run_eagerly(app, sends):
    failures = []
    for send in sends:
        try:
            send.task.apply(
                send.args,
                send.kwargs,
                task_id=send.task_id,
                link=send.options.get("link"),
                link_error=send.options.get("link_error"),
            )
        except Exception as exc:
            # Only with task_eager_propagates, where Celery does not log it.
            log.error(
                "Eager task %s[%s] failed after the commit",
                send.task.name,
                send.task_id,
                exc_info=exc,
            )
            failures.append((send, exc))
    if failures:
        # Replaces what an earlier commit left unraised (pshell, scripts).
        _eager_errors[getattr(sends[0].tm, "manager", sends[0].tm)] = failures


class EagerTaskFailed(Exception):
    """An eager task sent on commit failed (``task_eager_propagates``).

    Chained from the task's exception.  A type of its own, so pyramid_retry
    never re-runs the view whose transaction already committed.
    """


def forget_eager_errors(tm):
    """Drop what an earlier commit of ``tm`` left unraised (pshell, scripts)."""
    _eager_errors.pop(getattr(tm, "manager", tm), None)


def raise_eager_errors(tm):
    """Raise :class:`EagerTaskFailed` for the first eager task of ``tm``'s
    last commit that failed."""
    failures = _eager_errors.pop(getattr(tm, "manager", tm), None)
    if failures:
        send, exc = failures[0]
        raise EagerTaskFailed(
            f"Eager task {send.task.name}[{send.task_id}] failed after the "
            f"commit: {exc!r}"
        ) from exc
