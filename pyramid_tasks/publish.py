"""After the commit: publish a batch through one producer, or run it eagerly.

Never raises into the committed transaction: a send that fails is logged at
ERROR, one line with the task name, id and cause (secrets masked), and its
traceback at DEBUG; eager failures wait for the code that owns the commit
(:func:`raise_eager_errors`).
"""

import functools
import logging
import sys
import traceback
import weakref
from collections import deque
from itertools import islice

from celery import Task, chain, signature
from celery.exceptions import CeleryError
from kombu.exceptions import BatchPublishError, OperationalError

from . import confirms, producers
from .masking import mask_secrets
from .wire import Wire

__all__ = [
    "EagerTaskFailed",
    "forget_eager_errors",
    "publish",
    "raise_eager_errors",
]

log = logging.getLogger(__name__)


def publish(app, sends, durable=False, on_sent=None):
    """Send a committed batch: eagerly in eager mode, else through one producer,
    pipelined where the transport allows it.  Returns the sends the broker
    took; ``on_sent(sends)``, if given, hears of most of them earlier, a
    chunk at a time, as each goes out (durable mode marks them meanwhile).

    Never raises: a committed transaction is not undone by a failed send.
    Each failure is logged at ERROR with the task name and id.  A broker that
    is down costs one run of Celery's publish retry policy for the whole
    batch; a frozen one (Redis) about one ``tasks.publish_timeout``, as a
    send that timed out is never retried, plus at most one more waiting for
    a free connection of the pool.
    """
    capture = getattr(app.pyramid_registry, "pyramid_tasks_capture", None)
    if capture is not None:
        for send in sends:
            capture.record(
                send.task, send.args, send.kwargs, send.options, send.task_id
            )
        return sends
    if app.conf.task_always_eager:
        _run_eagerly(app, sends)
        return sends
    unsent = deque(sends)  # neither sent nor reported yet, in order
    uncertain = set()  # id()s of sends the broker may have received
    failed = set()  # id()s of sends reported
    report = _log_pending if durable else _log_unsent
    timeout = app.pyramid_registry.pyramid_tasks_settings.publish_timeout
    try:
        with producers.acquire(app) as producer:
            connection_errors = producer.connection.connection_errors
            wire = Wire(app, producer)
            # One task has nothing to share: no pipeline, Celery's own send.
            pipelined = producer.supports_batch_publish and len(sends) > 1
            confirming = producers.confirmed(app) and _Confirming(
                producer, unsent, uncertain, failed, report, durable, timeout, wire
            )
            while unsent:
                chunk = list(islice(unsent, _BATCH_SIZE))
                if confirming:
                    confirming.send(chunk)
                    continue
                if pipelined and _pipeline(producer, chunk, uncertain, durable, wire):
                    for _ in chunk:
                        unsent.popleft()
                    if on_sent is not None:
                        on_sent(chunk)
                    continue
                for send in chunk:
                    try:
                        _apply(send, producer, durable, wire)
                    except Exception as exc:
                        if _timed_out(exc):  # the command may have been written
                            uncertain.add(id(send))
                        if _broker_down(exc, connection_errors):
                            raise
                        failed.add(id(send))
                        report([send], exc, uncertain)  # this message only
                    unsent.popleft()
    except Exception as exc:
        # The broker is unreachable (after Celery's publish retry policy) or
        # does not answer: the rest would each wait as long, so they are
        # reported, not tried.
        failed.update(id(send) for send in unsent)
        report(unsent, exc, uncertain)
    return [send for send in sends if id(send) not in failed]


# Sends per pipeline: bounds what one failed pipeline sends again.
_BATCH_SIZE = 1000


def _apply(send, producer, durable=False, wire=None):
    # The message apply_async would send, built by ``wire`` where it can,
    # else Celery's own apply_async: the task's own ran at the call, with tm=.
    # Celery merges ``retry_policy`` into task_publish_retry_policy; ours only
    # adds the errback that ends the retries at a timeout.  Durable mode
    # never retries: the relay does, never the committing request.
    options = send.options
    policy = options.get("retry_policy")
    if policy or durable:
        options = {k: v for k, v in options.items() if k != "retry_policy"}
    if durable:
        options["retry"] = False
    elif policy:
        default = send.task.app.conf.task_publish_retry_policy
        errback = policy.get("errback") or default.get("errback")
        policy = {**policy, "errback": _NoRetryAfterTimeout(errback)}
    else:
        policy = _default_policy(send.task.app)
    if wire is not None and wire.publish(send, options, policy):
        return
    Task.apply_async(
        send.task,
        send.args,
        send.kwargs,
        task_id=send.task_id,
        producer=producer,
        retry_policy=policy,
        **options,
    )


def _default_policy(app):
    """``{"errback": ...}`` wrapping the app's publish retry policy's own
    errback; made once per app (reading Celery's conf costs microseconds)."""
    try:
        return app.pyramid_publish_policy
    except AttributeError:
        errback = app.conf.task_publish_retry_policy.get("errback")
        app.pyramid_publish_policy = {"errback": _NoRetryAfterTimeout(errback)}
        return app.pyramid_publish_policy


class _NoRetryAfterTimeout:
    """The ``errback`` of Celery's publish retry policy: kombu calls it
    before each reconnection.  A timed-out write may have reached the broker,
    so sending it again could deliver the task twice: a timeout ends the
    retries (the error is raised); other errors go to the policy's own
    errback, if any."""

    def __init__(self, errback):
        self.errback = errback

    def __call__(self, exc, interval):
        if _timed_out(exc):
            raise exc
        if self.errback is not None:
            self.errback(exc, interval)


def _pipeline(producer, chunk, uncertain, durable=False, wire=None):
    """Send ``chunk`` in one pipeline; False if it must go one at a time.

    Nothing leaves before the pipeline runs, at the end of the block: an
    error while filling it (a router, a declare) sends nothing, and the chunk
    goes one at a time, where each error has its own answer; but a broker
    that is down after the retry policy raises, not to run the policy again.
    A pipeline that fails may have delivered part of the chunk: sent again,
    those arrive twice; none is lost.  One that timed out was written and not
    answered: it raises, since sending again would wait as long.
    """
    connection_errors = producer.connection.connection_errors
    try:
        with producer.batch(max_size=sys.maxsize):
            for send in chunk:
                _apply(send, producer, durable, wire)
    except BatchPublishError as exc:
        uncertain.update(id(send) for send in chunk)
        if _timed_out(exc):
            raise
        reason = exc.__cause__ or exc
    except Exception as exc:
        if _broker_down(exc, connection_errors):
            raise
        reason = exc
    else:
        return True
    log.warning(
        "Sending %d committed tasks one at a time, not in one pipeline: %s",
        len(chunk),
        _one_line(reason),
    )
    return False


class _Confirming:
    """RabbitMQ's path of :func:`publish`: each chunk under publisher
    confirms, all its messages published before one wait for their answers.

    An acked message is sent; a nacked one was refused, reported as any
    failed send.  Messages unanswered within ``tasks.publish_timeout`` may
    have been delivered: reported so, and the rest are not tried (each would
    wait as long).  After any other error (one while publishing, or the
    broker closing the channel on a message, an exchange that does not
    exist) the messages not answered go again one at a time, so a bad
    message costs only itself; those that may have been delivered already
    may arrive twice, none is lost.  A broker that is down raises.
    """

    def __init__(
        self, producer, unsent, uncertain, failed, report, durable, timeout, wire
    ):
        self.producer, self.wire = producer, wire
        self.unsent, self.uncertain, self.failed = unsent, uncertain, failed
        self.report, self.durable, self.timeout = report, durable, timeout
        self.acked = set()  # id()s of sends

    def send(self, chunk):
        try:
            for send in self._batch(chunk, alone=len(chunk) == 1):
                self._batch([send], alone=True)
        finally:
            # Answered sends leave ``unsent``; the others stay, in order.
            for _ in chunk:
                self.unsent.popleft()
            done = self.acked | self.failed
            self.unsent.extendleft(reversed([s for s in chunk if id(s) not in done]))

    def _batch(self, sends, alone=False):
        """Publish ``sends``, wait once; those to send again, one at a time."""
        batch = confirms.Batch(self.producer, self.timeout)
        connection_errors = self.producer.connection.connection_errors
        error = None
        try:
            try:
                with batch:
                    for send in sends:
                        apply = functools.partial(
                            _apply, send, self.producer, self.durable, self.wire
                        )
                        batch.publish(send, apply)
            except Exception as exc:
                if _broker_down(exc, connection_errors):
                    raise
                error = exc
            reason = batch.wait()
        except Exception:
            self.uncertain.update(id(send) for send in batch.unconfirmed())
            raise
        finally:
            self.acked |= batch.acked
        refused = [send for send in sends if id(send) in batch.nacked]
        if refused:
            self.failed.update(map(id, refused))
            nack = confirms.Refused("the broker refused it (basic.nack)")
            self.report(refused, nack, self.uncertain)
        unanswered = batch.unconfirmed()
        if isinstance(reason, TimeoutError):
            self.uncertain.update(map(id, unanswered))
            # Nor would it answer the channel's close when the pool drops
            # the connection: it goes without the handshake.
            self.producer.connection.collect()
            raise reason
        answered = batch.acked | batch.nacked
        again = [send for send in sends if id(send) not in answered]
        if alone:
            if again:  # its own error: the broker closed the channel on it
                self.failed.update(map(id, again))
                self.report(again, error or reason, self.uncertain)
            return []
        published = set(map(id, batch.published))
        if again:
            maybe = [send for send in again if id(send) in published]
            self.uncertain.update(map(id, maybe))
            log.warning(
                "Sending %d committed tasks again one at a time (%s); %d of "
                "them may have been delivered already and may arrive twice.",
                len(again),
                _one_line(error or reason),
                len(maybe),
            )
        return again


def _broker_down(exc, connection_errors):
    """Whether ``exc`` is the broker connection failing, not this message.

    kombu re-raises both connection and channel errors (a Redis WRONGTYPE on
    one queue) as ``OperationalError``; its cause tells them apart.  Redis
    counts any ``KeyError`` among its connection errors, Celery's
    ``QueueNotFound`` (one message's unknown queue) too: Celery's errors are
    the message's.
    """
    if isinstance(exc, OperationalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, CeleryError):
        return False
    return isinstance(exc, (OperationalError, *connection_errors))


def _timed_out(exc):
    """Whether a socket timed out anywhere in ``exc``'s chain: a command may
    have been written and not answered, so the broker may have it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TimeoutError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line(exc):
    """``Type: message`` of the root kombu error, masked, on one line."""
    if isinstance(exc, (OperationalError, BatchPublishError)) and exc.__cause__:
        exc = exc.__cause__
    return " ".join(mask_secrets(f"{type(exc).__name__}: {exc}").split())


def _log_unsent(sends, exc, uncertain):
    """One ERROR line a task; the traceback once, at DEBUG, masked (exc_info
    would print the raw exception, broker password included)."""
    cause = _one_line(exc)
    for send in sends:
        if id(send) in uncertain:
            template = (
                "Task %s[%s] was committed and may have been delivered, "
                "but the broker did not confirm it: %s"
            )
        else:
            template = "Task %s[%s] was committed but could not be sent: %s"
        log.error(template, send.task.name, send.task_id, cause)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "Why %d committed task(s) were not sent:\n%s",
            len(sends),
            mask_secrets("".join(traceback.format_exception(exc))).rstrip(),
        )


def _log_pending(sends, exc, uncertain):
    """Durable mode: one WARNING line a job; the relay sends it later."""
    cause = _one_line(exc)
    for send in sends:
        log.warning(
            "Job %s[%s] is committed; the broker did not %s it (%s): the relay "
            "will send it.",
            send.task.name,
            send.task_id,
            "confirm" if id(send) in uncertain else "take",
            cause,
        )


# Eager tasks run from an after-commit hook, whose exceptions ``transaction``
# swallows; with task_eager_propagates they wait here for raise_eager_errors().
_eager_errors = weakref.WeakKeyDictionary()


def _run_eagerly(app, sends):
    failures = []
    for send in sends:
        options = {
            key: send.options[key]
            for key in ("link", "link_error", "headers")
            if key in send.options
        }
        try:
            rest = send.options.get("chain")
            if rest:
                # The rest of a chain, as a worker would send it after this
                # step (its list holds the next step last).
                first = send.task.signature(
                    send.args, send.kwargs, task_id=send.task_id, **options
                )
                steps = [signature(step, app=app) for step in reversed(rest)]
                chain(first, *steps).apply()
            else:
                send.task.apply(send.args, send.kwargs, task_id=send.task_id, **options)
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
