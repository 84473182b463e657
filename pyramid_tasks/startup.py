"""What a worker and beat say when they start: time limits their pool will
not enforce, and banners that follow the INI's logging."""

import logging

from celery import bootsteps
from kombu.utils.imports import symbol_by_name

from .malformed import Consumer

__all__ = [
    "ConsumerCheck",
    "TimeLimitCheck",
    "follow_ini_logging",
    "unenforced_time_limits",
]

log = logging.getLogger(__name__)

# The limits each pool enforces, as read in celery/concurrency/*.py (Celery
# 5.7) and measured with a 2 s limit on a task that waits 5 s: prefork ends
# it at 2.1 s (hard: the child is killed; soft: SoftTimeLimitExceeded is
# raised in it); gevent raises a hard limit as gevent.Timeout at 2.0 s, at the
# task's next switch (its next I/O), and ignores soft limits; eventlet, threads
# and solo never look at either, so the task ran its 5 s.
_ENFORCED = {
    "celery.concurrency.prefork": ("prefork", {"time_limit", "soft_time_limit"}),
    "celery.concurrency.gevent": ("gevent", {"time_limit"}),
    "celery.concurrency.eventlet": ("eventlet", set()),
    "celery.concurrency.thread": ("threads", set()),
    "celery.concurrency.solo": ("solo", set()),
}
_SETTINGS = {
    "time_limit": "celery.task_time_limit (--time-limit)",
    "soft_time_limit": "celery.task_soft_time_limit (--soft-time-limit)",
}


def unenforced_time_limits(pool_cls, time_limit, soft_time_limit, app):
    """``(pool name, [limit, ...])``: the limits ``pool_cls`` will not enforce.

    ``time_limit`` and ``soft_time_limit`` are the worker's (the settings or
    the command line); then each task of ``app`` whose own limit is not the
    setting's (Celery copies the settings onto every task).  A pool this
    module does not know gives no limits: it cannot tell.
    """
    modules = [cls.__module__ for cls in pool_cls.__mro__]
    known = [_ENFORCED[module] for module in modules if module in _ENFORCED]
    if not known:
        return pool_cls.__name__, []
    name, enforced = known[0]
    limits = []
    worker_limits = {"time_limit": time_limit, "soft_time_limit": soft_time_limit}
    for kind, seconds in worker_limits.items():
        if seconds and kind not in enforced:
            limits.append(f"{_SETTINGS[kind]} = {seconds:g} s")
    tasks = {}  # (kind, seconds): the tasks with that limit of their own
    for task_name in sorted(app.tasks):
        task = app.tasks[task_name]
        for kind in ("time_limit", "soft_time_limit"):
            seconds = getattr(task, kind, None)
            own = seconds != app.conf[f"task_{kind}"]
            if seconds and own and kind not in enforced:
                tasks.setdefault((kind, seconds), []).append(task_name)
    for (kind, seconds), names in tasks.items():
        limits.append(f"{_tasks(names)} {kind} = {seconds:g} s")
    return name, limits


def _tasks(names):
    """``task a``, ``tasks a, b``, ``tasks a and 12 built-in tasks``: Celery's
    own (``celery.*``, given limits by ``task_annotations = {"*": ...}``)
    counted, not named."""
    ours = [name for name in names if not name.startswith("celery.")]
    builtin = len(names) - len(ours)
    words = ", ".join(ours)
    if builtin:
        counted = f"{builtin} built-in task" + ("s" if builtin > 1 else "")
        return f"tasks {words} and {counted}" if ours else counted
    return f"task {words}" if len(ours) == 1 else f"tasks {words}"


_ADVICE = {
    "gevent": (
        "gevent enforces hard limits only (at the task's next I/O): use "
        "-P prefork for soft limits, or a hard limit instead"
    ),
}
_DEFAULT_ADVICE = (
    "a task running past them is neither interrupted nor killed: use -P prefork "
    "(hard and soft limits) or -P gevent (hard limits, at the task's next I/O), "
    "or bound the task's own waits (socket and statement timeouts)"
)


class TimeLimitCheck(bootsteps.StartStopStep):
    """Worker bootstep: a WARNING at start for limits the pool will not enforce.

    Limits given per call (``apply_async(time_limit=...)``) cannot be seen
    at start and are not checked.
    """

    label = "time limit check"

    def start(self, worker):
        name, limits = unenforced_time_limits(
            worker.pool_cls,
            worker.time_limit,
            worker.soft_time_limit,
            worker.app,
        )
        if limits:
            log.warning(
                "Time limits are not enforced by this worker's pool (-P %s): %s; %s.",
                name,
                ", ".join(limits),
                _ADVICE.get(name, _DEFAULT_ADVICE),
            )


class ConsumerCheck(bootsteps.StartStopStep):
    """Worker bootstep: a WARNING at start when the app's own
    ``worker_consumer`` does not derive from
    :class:`pyramid_tasks.malformed.Consumer` (then a malformed message
    stops the worker again)."""

    label = "consumer check"

    def start(self, worker):
        consumer_cls = symbol_by_name(worker.consumer_cls)
        if not issubclass(consumer_cls, Consumer):
            log.warning(
                "Malformed messages are not set aside by this worker: its "
                "consumer %s.%s (celery.worker_consumer) does not derive from "
                "pyramid_tasks.malformed.Consumer, so a message Celery cannot "
                "read stops the worker (Unrecoverable error); derive it from "
                "pyramid_tasks.malformed.Consumer.",
                consumer_cls.__module__,
                consumer_cls.__qualname__,
            )


def follow_ini_logging(app):
    """Make the worker's and beat's banners show the INI's logging.

    Once the INI's ``[loggers]`` are applied ``--loglevel`` changes nothing,
    so the banners show the effective level of the ``celery`` logger instead:
    the worker lists its tasks (``[tasks]``) when it is INFO or lower, with
    Celery's built-in tasks at DEBUG; beat prints it after ``@%``.
    """
    for name in ("Worker", "Beat"):
        setattr(app, name, _at_ini_level(getattr(app, name)))


def _at_ini_level(program):
    class AtIniLevel(program):
        def __init__(self, *args, **kwargs):
            kwargs["loglevel"] = logging.getLogger("celery").getEffectiveLevel()
            super().__init__(*args, **kwargs)

    return AtIniLevel
