"""Celery as a first-class part of Pyramid apps."""

from .config import add_periodic_task, add_task, declare, get_celery_app
from .decorator import TaskNotRegistered, task
from .events import WorkerProcessInit
from .task import PyramidTask

__all__ = [
    "PyramidTask",
    "TaskNotRegistered",
    "WorkerProcessInit",
    "includeme",
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
    declare(config)
