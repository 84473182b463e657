"""Celery as a first-class part of Pyramid apps.

The public names are imported on first use (PEP 562), so that importing the
package, as the ``tasks-celery`` script does, loads neither Celery's app
machinery nor Pyramid: gevent and eventlet pools must patch first.
"""

import importlib

__all__ = [
    "EagerTaskFailed",
    "NoActiveTransaction",
    "PyramidTask",
    "RetryAttemptsExhausted",
    "RetryableTransactionTask",
    "ScheduleOnCommitTask",
    "TaskNotRegistered",
    "TransactionalTask",
    "WorkerProcessInit",
    "includeme",
    "retryable",
    "task",
]

_EXPORTS = {
    "EagerTaskFailed": "publish",
    "NoActiveTransaction": "datamanager",
    "PyramidTask": "task_classes",
    "RetryAttemptsExhausted": "retry",
    "RetryableTransactionTask": "task_classes",
    "ScheduleOnCommitTask": "task_classes",
    "TaskNotRegistered": "decorator",
    "TransactionalTask": "task_classes",
    "WorkerProcessInit": "events",
    "retryable": "retry",
    "task": "decorator",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyramid_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted([*globals(), *__all__])


def includeme(config):
    """Declare the directives, ``request.celery_app``, ``request.enqueue``
    and the deferred Celery app.

    Nothing is built here: the Celery app is made from the settings when the
    configuration is committed, as ``registry.celery_app``.
    """
    from pyramid.tweens import INGRESS

    from .config import add_periodic_task, add_task, declare, get_celery_app
    from .enqueue import enqueue

    config.add_directive("add_task", add_task)
    config.add_directive("add_periodic_task", add_periodic_task)
    config.add_directive("get_celery_app", get_celery_app, action_wrap=False)
    config.add_request_method(
        lambda request: request.registry.celery_app, "celery_app", reify=True
    )
    config.add_request_method(enqueue, "enqueue")
    config.add_tween("pyramid_tasks.tween.eager_errors_tween_factory", under=INGRESS)
    declare(config)
