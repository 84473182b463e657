"""``request.enqueue``: CKAN's ``enqueue`` on the commit of ``request.tm``."""

import inspect

from celery import Task

from .config import _task_name
from .decorator import TaskHandle, TaskNotRegistered
from .task_classes import ScheduleOnCommitTask

__all__ = ["enqueue"]

_ACCEPTED = (
    "a task (a @task function, config.add_task's function or a Celery task) "
    "or the name of a registered task"
)


def enqueue(
    request, func_or_task, args=None, kwargs=None, title=None, queue=None, **options
):
    """Send a task when ``request.tm`` commits; return its ``AsyncResult``.

    The shape of CKAN's ``ckan.lib.jobs.enqueue``: ``func_or_task`` is a task
    (what ``@task`` returns, a function given to ``config.add_task``, a Celery
    task) or the name of a task registered on this app; ``title=`` is the
    job's title (it needs ``pyramid_tasks.jobs``); ``queue=`` and the other
    ``options`` are ``apply_async``'s.  Whatever the task's base class, it is
    sent on the commit of ``request.tm`` (none on abort), as
    ``apply_async(..., tm=request.tm)`` sends it.
    """
    task = _task(request, func_or_task)
    # Celery's own error for args=5 names a functools.partial, not the call.
    for name, value, kind, expected in (
        ("args", args, list | tuple, "a list or tuple"),
        ("kwargs", kwargs, dict, "a dict"),
    ):
        if value is not None and not isinstance(value, kind):
            raise TypeError(
                f"request.enqueue({task.name!r}, {name}={value!r:.80}): "
                f"expected {expected} of the task's arguments"
            )
    tm = getattr(request, "tm", None)
    if tm is None:
        raise TypeError(
            f"request.enqueue({task.name}) sends on the commit of request.tm, "
            "and this request has none: include pyramid_tm."
        )
    if title is not None:
        options["title"] = title
    if queue is not None:
        options["queue"] = queue
    if isinstance(task, ScheduleOnCommitTask):
        return task.apply_async(args, kwargs, tm=tm, **options)
    # A class that sends at once without tm: the on-commit send all the same.
    return ScheduleOnCommitTask.apply_async(task, args, kwargs, tm=tm, **options)


def _task(request, given):
    """The task of this app that ``given`` names, or a clear error."""
    app = request.registry.celery_app
    if isinstance(given, str):
        name = given
    elif isinstance(given, TaskHandle):
        name = _task_name(given)  # without resolving it on another app
    elif isinstance(given, Task):
        name = given.name
    elif inspect.isfunction(given):
        found = [
            task
            for task in app.tasks.values()
            # On the class: an instance binds the function of bind=True.
            if getattr(type(task), "__wrapped__", None) is given
        ]
        if not found:
            raise TypeError(
                f"request.enqueue({given!r}): that function is not a registered "
                "task; declare it with @task (and scan) or config.add_task(), "
                f"or give {_ACCEPTED}."
            )
        return found[0]
    else:
        raise TypeError(
            f"request.enqueue() got {given!r} ({type(given).__name__}); "
            f"expected {_ACCEPTED}."
        )
    task = app.tasks.get(name)
    if task is None:
        raise TaskNotRegistered(
            f"request.enqueue({name!r}): no task of that name is registered on "
            "this app's Celery app: check the name and that its module is scanned."
        )
    return task
