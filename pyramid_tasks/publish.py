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
    if len(sends) == 1:  # nothing to share: Celery's own path
        try:
            _apply(sends[0], producer=None)
        except Exception as exc:
            _log_unsent(sends[0], exc)
        return
    unsent = deque(sends)  # neither sent nor reported yet, in order
    uncertain = set()  # id()s of sends a failed pipeline may have delivered
    try:
        with app.producer_or_acquire() as producer:
            connection_errors = producer.connection.connection_errors
            pipelined = producer.supports_batch_publish
            while unsent:
                chunk = list(islice(unsent, _BATCH_SIZE))
                if pipelined and _pipeline(producer, chunk, uncertain):
                    for _ in chunk:
                        unsent.popleft()
                    continue
                for send in chunk:
                    try:
                        _apply(send, producer)
                    except Exception as exc:
                        if _broker_down(exc, connection_errors):
                            raise
                        _log_unsent(send, exc)  # this message only
                    unsent.popleft()
    except Exception as exc:
        # The broker is unreachable (after Celery's publish retry policy):
        # the rest would each wait as long, so they are reported, not tried.
        for send in unsent:
            _log_unsent(send, exc, id(send) in uncertain)


# Sends per pipeline: bounds what one failed pipeline sends again.
_BATCH_SIZE = 1000


def _apply(send, producer):
    # Celery's own apply_async: the task's own ran at the call, with tm=.
    Task.apply_async(
        send.task,
        send.args,
        send.kwargs,
        task_id=send.task_id,
        producer=producer,
        **send.options,
    )


def _pipeline(producer, chunk, uncertain):
    """Send ``chunk`` in one pipeline; False if it must go one at a time.

    Nothing leaves before the pipeline runs, at the end of the block: an
    error while filling it (a router, a declare, the broker) sends nothing,
    and the chunk goes one at a time, where each error has its own answer.
    A pipeline that fails may have delivered part of the chunk: sent again,
    those arrive twice; none is lost.
    """
    try:
        with producer.batch(max_size=sys.maxsize):
            for send in chunk:
                _apply(send, producer)
    except BatchPublishError as exc:
        uncertain.update(id(send) for send in chunk)
        reason = exc.__cause__ or exc
    except Exception as exc:
        reason = exc
    else:
        return True
    log.warning(
        "Sending %d committed tasks one at a time, not in one pipeline: %s",
        len(chunk),
        mask_secrets(reason),
    )
    return False


def _broker_down(exc, connection_errors):
    """Whether ``exc`` is the broker connection failing, not this message.

    kombu re-raises both connection and channel errors (a Redis WRONGTYPE on
    one queue) as ``OperationalError``; its cause tells them apart.
    """
    if isinstance(exc, OperationalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, (OperationalError, *connection_errors))


def _log_unsent(send, exc, uncertain=False):
    # The traceback goes in as masked text: exc_info would print the raw
    # exception, broker password included.
    trace = mask_secrets("".join(traceback.format_exception(exc)))
    log.error(
        "Task %s[%s] was committed but could not be sent%s: %s\n%s",
        send.task.name,
        send.task_id,
        " again (a failed pipeline may have delivered it)" if uncertain else "",
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
