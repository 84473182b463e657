"""Celery as a first-class part of Pyramid apps."""

from pyramid.tweens import INGRESS

from .config import add_periodic_task, add_task, declare, get_celery_app
from .datamanager import EagerTaskFailed, NoActiveTransaction
from .decorator import TaskNotRegistered, task
from .events import WorkerProcessInit
from .retry import RetryAttemptsExhausted, retryable
from .task import (
    PyramidTask,
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
)

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


def includeme(config):
    """Declare the directives, ``request.celery_app`` and the deferred Celery app.

    Nothing is built here: the Celery app is made from the settings when the
    configuration is committed, as ``registry.celery_app``.
    """
    config.add_directive("add_task", add_task)
    config.add_directive("add_periodic_task", add_periodic_task)
    config.add_directive("get_celery_app", get_celery_app, action_wrap=False)
    config.add_request_method(
        lambda request: request.registry.celery_app, "celery_app", reify=True
    )
    config.add_tween("pyramid_tasks.tween.eager_errors_tween_factory", under=INGRESS)
    declare(config)
