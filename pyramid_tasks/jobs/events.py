"""Pyramid events of a job's life: django-db-queue's hooks, with a request.

Subscribe with ``config.add_subscriber(handler, JobFailed)`` or
``@subscriber(JobFailed)``.  A subscriber that raises is logged and changes
nothing: the job, its state and the other subscribers go on.
"""

__all__ = ["JobCreated", "JobEvent", "JobFailed", "JobStarted", "JobSucceeded"]


class JobEvent:
    """``event.request`` is a Pyramid request of the app (its ``tm`` and
    ``dbsession`` work), ``event.job_id`` and ``event.task_name`` name the
    job, ``event.task`` is the Celery task, ``event.workspace`` the job's
    workspace (a workflow's step: the workflow's) as stored, a dict or
    None: given, for ``JobCreated``; as the run saved it, after it."""

    def __init__(self, request, task, job_id, workspace=None):
        self.request = request
        self.task = task
        self.task_name = task.name
        self.job_id = job_id
        self.workspace = workspace


class JobCreated(JobEvent):
    """Web side: ``apply_async(..., tm=...)`` added a job to the open
    transaction.  ``event.request`` is the current request (its ``tm`` is the
    transaction's manager), or one made for the event outside requests;
    work done with it commits or aborts with the job."""


class JobStarted(JobEvent):
    """Worker side: the job's run begins (before the body).  The request is
    made for the event; use ``with event.request.tm:`` for database work."""


class JobSucceeded(JobEvent):
    """Worker side: the job succeeded (for transactional tasks, after its
    transaction committed)."""


class JobFailed(JobEvent):
    """Worker side: the job failed and its error is recorded;
    ``event.exception`` is the exception."""

    def __init__(self, request, task, job_id, exception=None, workspace=None):
        super().__init__(request, task, job_id, workspace)
        self.exception = exception
