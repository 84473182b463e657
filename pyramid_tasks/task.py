"""The task classes: each adds one thing to the one before."""

from celery import Task
from celery.utils.threads import LocalStack

from .request import close_request, make_request

__all__ = ["PyramidTask"]


class _Execution:
    """One run of a task body; builds its request on first use."""

    __slots__ = ("request", "task")

    def __init__(self, task):
        self.task = task
        self.request = None

    def get_request(self):
        if self.request is None:
            app = self.task.app
            settings = app.pyramid_registry.pyramid_tasks_settings
            self.request = make_request(app.pyramid_registry, settings.site_url)
        return self.request

    def close(self):
        if self.request is not None:
            close_request(self.request, self.task.name)


# A task object is shared by every thread/greenlet of a worker, so the current
# execution lives on a per-thread stack (Celery's own LocalStack, the kind it
# keeps ``self.request`` on), never on ``self``.
_executions = LocalStack()


class PyramidTask(Task):
    """A Celery task that runs like a Pyramid view.

    ``self.get_request()`` returns the request of this execution, built from
    the app's registry with its request factory and request methods (so
    ``request.dbsession`` works), ``tasks.site_url`` applied and ``request.tm``
    a new explicit transaction manager.  When the execution ends, success or
    failure, finished callbacks run and the threadlocals are popped.
    """

    def __call__(self, *args, **kwargs):
        execution = _Execution(self)
        _executions.push(execution)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _executions.pop()
            execution.close()

    def get_request(self):
        """The Pyramid request of the current execution (the same every call)."""
        execution = _executions.top
        if execution is None or execution.task is not self:
            raise RuntimeError(
                f"{self.name}.get_request() is only available while the task "
                "runs (in its body, on a worker, eagerly or called directly)."
            )
        return execution.get_request()
