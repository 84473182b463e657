"""Multi-step jobs: django-db-queue's workflows on Celery's own chain.

``workflow(step_a.s(...), step_b.s(), step_c.s(), title="Import",
workspace={"user_id": 42})`` is one job whose steps run one after another,
each a job of its own (its row's ``parent_id`` is the workflow's), sharing
the workflow's workspace (``self.workspace`` in each step).  It is sent as a
Celery chain, so a step runs only after the one before it succeeded; each
step's message carries :data:`WORKFLOW_HEADER` (the workflow's id, the
step's number and the number of steps), from which the worker keeps the
workflow's row in step:

- ``started`` when its first step starts, its progress the steps done;
- ``succeeded`` when its last step succeeds;
- ``failed`` when a step fails (its error names the step): the later steps
  never run, and ``jobs retry WORKFLOW_ID`` resumes at the failed step,
  whose message carries the rest of the chain.

The workflow's own row is never sent anywhere: its task name is
:data:`WORKFLOW_TASK`, and it has no heartbeat, so no relay sends it and no
lease finds it lost.
"""

import logging

from celery import chain

from ..datamanager import active_transaction
from ..ids import uuid4
from ..options import checked_workspace
from .model import QUEUED, stored, utcnow
from .store import one_line

__all__ = ["WORKFLOW_HEADER", "WORKFLOW_TASK", "Workflow", "follow_step", "workflow"]

log = logging.getLogger(__name__)

#: The task name on a workflow's own row.
WORKFLOW_TASK = "pyramid_tasks.workflow"
#: The header of each step's message: ``{"id", "step", "steps"}``.
WORKFLOW_HEADER = "pyramid_tasks_workflow"


def workflow(*steps, title=None, workspace=None):
    """A job made of ``steps`` (signatures: ``task.s(...)``), run in order.

    Send it with :meth:`Workflow.apply_async` (``tm=request.tm`` to send on
    commit, as a task).  ``title`` is the workflow row's title,
    ``workspace`` (a dict) the workspace its steps share.
    """
    return Workflow(steps, title=title, workspace=workspace)


class Workflow:
    """Steps to send as one job (see :func:`workflow`)."""

    def __init__(self, steps, title=None, workspace=None):
        if not steps:
            raise ValueError("workflow() needs at least one step")
        self.steps = list(steps)
        self.title = title
        self.workspace = workspace

    def apply_async(self, tm=None, **options):
        """Write the workflow's row and send its first step (on ``tm``'s
        commit when given, in the same transaction as the row); the
        workflow's :class:`~celery.result.AsyncResult`.  ``options`` go to
        the first step, as a chain's do."""
        first = self.steps[0]
        app = first.app
        registry = app.pyramid_registry
        jobs = getattr(registry, "pyramid_tasks_jobs", None)
        if jobs is None:
            raise TypeError(
                "workflow() needs the job table: include pyramid_tasks.jobs "
                "(config.include('pyramid_tasks.jobs') or pyramid.includes)."
            )
        workspace = None
        if self.workspace is not None:
            workspace = checked_workspace(self.workspace, "workflow")
        txn = None if tm is None else active_transaction(tm, WORKFLOW_TASK)
        workflow_id = uuid4()
        count = len(self.steps)
        steps = []
        for number, step in enumerate(self.steps, start=1):
            step = step.clone()
            marker = {"id": workflow_id, "step": number, "steps": count}
            headers = {**(step.options.get("headers") or {}), WORKFLOW_HEADER: marker}
            steps.append(step.set(headers=headers))
        row = {
            "id": workflow_id,
            "name": WORKFLOW_TASK,
            "title": self.title,
            "unique_key": None,
            "queue": None,
            "priority": None,
            "args": [],
            "kwargs": {"steps": [step.task for step in steps]},
            "options": {},
            "state": QUEUED,
            "attempts": 0,
            "publish_attempts": 0,
            "created_at": utcnow(),
            "eta": None,
            "parent_id": None,
            "workspace": workspace,
            "progress": 0,
            "progress_message": f"step 1 of {count}: {steps[0].task}",
        }
        jobs.write_now(stored(row), tm, txn)
        if tm is None:
            (chain(*steps) if count > 1 else steps[0]).apply_async(**options)
        else:
            # The first step on tm's commit, carrying the rest as a chain's
            # first message does (the next step last).  Not Celery's
            # chain.apply_async, which in eager mode runs the steps now,
            # inside the transaction.
            rest = list(reversed(steps[1:])) or None
            steps[0].apply_async(tm=tm, chain=rest, **options)
        return app.AsyncResult(workflow_id)


def follow_step(store, step, outcome, name, job_id, exc=None):
    """The workflow of a step (``step``: its message's :data:`WORKFLOW_HEADER`)
    after its run of job ``job_id`` (task ``name``) began or ended
    ``outcome``; a failure is logged, the step's own row stands."""
    try:
        store.workflow_step(step, outcome, name, exc)
    except Exception as failure:
        log.warning(
            "Job %s[%s]: its workflow %s was not updated: %s",
            name,
            job_id,
            step.get("id"),
            one_line(failure),
        )
