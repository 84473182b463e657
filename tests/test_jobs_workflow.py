"""``workflow()`` in eager mode (the worker-side code a delivered message
goes through, in this process) on PostgreSQL and SQLite, and its refusals;
a real worker in ``tests/test_jobs_workflow_e2e.py``."""

import logging

import pytest
from pyramid.config import Configurator
from pyramid.scripting import prepare
from sqlalchemy import select

from pyramid_tasks import ScheduleOnCommitTask
from pyramid_tasks.jobs import (
    Job,
    JobCreated,
    JobStarted,
    JobSucceeded,
    workflow,
)
from pyramid_tasks.jobs.service import BadParameter, JobService

from .test_jobs_workspace import eager_app


def note(self, name):
    """Add ``name`` to the workspace's ``done``."""
    self.workspace.setdefault("done", []).append(name)
    return name


def add_note(config):
    config.add_task(note, bind=True, base=ScheduleOnCommitTask, name="note")


@pytest.fixture(params=["postgresql", "sqlite"])
def app(request, tmp_path):
    return eager_app(request, tmp_path, add_note, request.param)


def rows(registry):
    engine = registry["dbsession_factory"].kw["bind"]
    columns = (Job.id, Job.name, Job.state, Job.parent_id, Job.workspace)
    with engine.connect() as connection:
        found = connection.execute(select(*columns).order_by(Job.created_at)).all()
    return [tuple(row) for row in found]


def test_a_workflow_sent_without_tm_writes_its_row_first(app):
    note = app.celery_app.tasks["note"]
    result = workflow(
        note.si("a"), note.si("b"), title="Two", workspace={"n": 1}
    ).apply_async()
    found = rows(app)
    assert found[0] == (
        result.id,
        "pyramid_tasks.workflow",
        "succeeded",
        None,
        {"n": 1, "done": ["a", "b"]},
    )
    assert [(r[1], r[2], r[3]) for r in found[1:]] == [
        ("note", "succeeded", result.id),
        ("note", "succeeded", result.id),
    ]


def test_a_workflow_of_one_step_on_commit(app):
    note = app.celery_app.tasks["note"]
    env = prepare(registry=app)
    try:
        tm = env["request"].tm
        with tm:
            env["request"].dbsession.execute(select(1))  # the view's session joins
            workflow_id = workflow(note.si("only")).apply_async(tm=tm).id
    finally:
        env["closer"]()
    found = rows(app)
    assert [(r[0], r[2], r[4]) for r in found[:1]] == [
        (workflow_id, "succeeded", {"done": ["only"]})
    ]
    assert [(r[2], r[3]) for r in found[1:]] == [("succeeded", workflow_id)]
    # Nothing failed: nothing to resume.
    with pytest.raises(BadParameter, match="is succeeded: only a failed"):
        JobService.from_registry(app).retry([workflow_id])


def test_a_workflow_without_a_failed_step_is_not_retried(app):
    note = app.celery_app.tasks["note"]
    workflow_id = workflow(note.si("a")).apply_async().id
    engine = app["dbsession_factory"].kw["bind"]
    with engine.begin() as connection:  # failed, its steps not (a crash)
        connection.execute(
            Job.__table__.update().where(Job.id == workflow_id).values(state="failed")
        )
    with pytest.raises(BadParameter, match="has no failed, cancelled or dead step"):
        JobService.from_registry(app).retry([workflow_id])


def test_a_workflow_needs_steps_the_job_table_and_a_json_workspace(app):
    note = app.celery_app.tasks["note"]
    with pytest.raises(ValueError, match="needs at least one step"):
        workflow()
    with pytest.raises(ValueError, match=r"workflow\(workspace="):
        workflow(note.si("a"), workspace=["no"]).apply_async()
    config = Configurator(settings={"celery.broker_url": "memory://"})
    config.include("pyramid_tasks")
    config.add_task(note, bind=True, base=ScheduleOnCommitTask, name="note")
    config.commit()
    bare = config.registry.celery_app.tasks["note"]
    with pytest.raises(TypeError, match=r"workflow\(\) needs the job table"):
        workflow(bare.si("a")).apply_async()
    config.registry.celery_app.close()


def test_a_workflow_row_gone_is_logged_and_the_step_stands(app, caplog):
    """A step whose workflow's row cannot be written (here: the table's
    workflow row dropped under it) is logged; its own row stands."""
    note = app.celery_app.tasks["note"]
    store = app.pyramid_tasks_jobs.store
    original = store.workflow_step

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    store.workflow_step = broken
    try:
        with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
            workflow_id = workflow(note.si("a")).apply_async().id
    finally:
        store.workflow_step = original
    assert f"its workflow {workflow_id} was not updated" in caplog.text
    assert [r[2] for r in rows(app)] == ["queued", "succeeded"]


def test_a_workflow_of_three_steps_on_commit_runs_them_all_eagerly(app):
    """The rest of a chain sent on commit runs in eager mode too (each step
    as a worker would send it after the one before)."""
    note = app.celery_app.tasks["note"]
    env = prepare(registry=app)
    try:
        tm = env["request"].tm
        with tm:
            steps = (note.si("a"), note.si("b"), note.si("c"))
            workflow_id = workflow(*steps, workspace={}).apply_async(tm=tm).id
    finally:
        env["closer"]()
    found = rows(app)
    assert found[0][1:3] == ("pyramid_tasks.workflow", "succeeded")
    assert found[0][4] == {"done": ["a", "b", "c"]}
    assert [(r[2], r[3]) for r in found[1:]] == [("succeeded", workflow_id)] * 3


def test_the_events_carry_the_workspace(request, tmp_path):
    """django-db-queue's hooks see the job's workspace: JobCreated the one
    given, the others the one stored after the run (a step's: the
    workflow's)."""
    seen = []

    def setup(config):
        add_note(config)
        for event in (JobCreated, JobStarted, JobSucceeded):
            config.add_subscriber(
                lambda e: seen.append((type(e).__name__, e.workspace)), event
            )

    registry = eager_app(request, tmp_path, setup)
    env = prepare(registry=registry)
    try:
        tm = env["request"].tm
        with tm:
            task = registry.celery_app.tasks["note"]
            task.apply_async(("solo",), tm=tm, workspace={"user_id": 7})
            workflow(task.si("a"), workspace={"user_id": 8}).apply_async(tm=tm)
    finally:
        env["closer"]()
    assert seen == [
        ("JobCreated", {"user_id": 7}),
        ("JobCreated", None),  # a step: the workspace is the workflow's row's
        ("JobStarted", {"user_id": 7}),
        ("JobSucceeded", {"user_id": 7, "done": ["solo"]}),
        ("JobStarted", {"user_id": 8}),
        ("JobSucceeded", {"user_id": 8, "done": ["a"]}),
    ]
