"""Pyramid events sent by worker processes."""

__all__ = ["WorkerProcessInit"]


class WorkerProcessInit:
    """Sent in each new worker child process (prefork), after its fork.

    Subscribe to do per-process set-up; inherited SQLAlchemy connection pools
    have already been disposed.  ``event.registry`` is the app's registry and
    ``event.celery_app`` its Celery app.

    .. code-block:: python

        import random

        from pyramid.events import subscriber
        from pyramid_tasks import WorkerProcessInit

        @subscriber(WorkerProcessInit)
        def reseed(event):
            random.seed()
    """

    def __init__(self, celery_app, registry):
        self.celery_app = celery_app
        self.registry = registry
