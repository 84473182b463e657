"""A job's workspace: ``apply_async(..., workspace={...})`` stores a JSON
object on the row; ``self.workspace`` reads it in a run and saves what the
run changed, with the run's transaction for the transactional classes, in a
short transaction of its own for the others.

Eager mode on PostgreSQL and on SQLite (the runs go through the worker-side
code a delivered message goes through); a real worker in
``tests/test_jobs_workflow_e2e.py``.
"""

import logging
from decimal import Decimal

import pytest
from pyramid.config import Configurator
from pyramid.scripting import prepare
from sqlalchemy import select

from pyramid_tasks import (
    PyramidTask,
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
)
from pyramid_tasks.jobs import Job, metadata
from pyramid_tasks.jobs.service import BadParameter, JobService


def visit(self, key, fail=False):
    """Count a visit in the workspace; fail after, if asked."""
    workspace = self.workspace
    workspace["visits"] = workspace.get("visits", 0) + 1
    workspace.setdefault("keys", []).append(key)
    if fail:
        raise ValueError(f"{key} failed")
    return dict(workspace)


def outside(self):
    return self.workspace


def eager_app(request, tmp_path, setup, database="sqlite"):
    """A durable app in eager mode on ``database`` (the demo's models),
    ``setup(config)`` adding its tasks; its registry.  Closed at the test's
    end."""
    if database == "postgresql":
        database_url = request.getfixturevalue("database_url")
        schema = request.getfixturevalue("pg_schema")
        settings = {"sqlalchemy.url": database_url, "demo.schema": schema}
    else:
        settings = {"sqlalchemy.url": f"sqlite:///{tmp_path}/jobs.sqlite"}
    settings.update(
        {
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "demo.create_tables": "true",
        }
    )
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks.jobs")
        setup(config)
    registry = config.registry
    engine = registry["dbsession_factory"].kw["bind"]
    metadata.create_all(engine)
    request.addfinalizer(registry.celery_app.close)
    request.addfinalizer(engine.dispose)
    return registry


def add_visits(config):
    for base in (RetryableTransactionTask, TransactionalTask, ScheduleOnCommitTask):
        config.add_task(visit, bind=True, base=base, name=f"visit_{base.__name__}")
    config.add_task(outside, bind=True, base=ScheduleOnCommitTask, name="outside")


@pytest.fixture(params=["postgresql", "sqlite"])
def app(request, tmp_path):
    return eager_app(request, tmp_path, add_visits, request.param)


def send(registry, name, *args, **options):
    """``name`` scheduled on a committed transaction; its id."""
    env = prepare(registry=registry)
    request = env["request"]
    try:
        with request.tm:
            task = registry.celery_app.tasks[name]
            return task.apply_async(args, tm=request.tm, **options).id
    finally:
        env["closer"]()


def row(registry, job_id):
    engine = registry["dbsession_factory"].kw["bind"]
    with engine.connect() as connection:
        query = select(Job.state, Job.workspace).where(Job.id == job_id)
        return connection.execute(query).one()


def sql_null(registry, job_id):
    engine = registry["dbsession_factory"].kw["bind"]
    with engine.connect() as connection:
        query = select(Job.id).where(Job.id == job_id, Job.workspace.is_(None))
        return connection.scalar(query) == job_id


@pytest.mark.parametrize("base", ["RetryableTransactionTask", "ScheduleOnCommitTask"])
def test_a_run_reads_the_workspace_and_saves_its_changes(app, base):
    given = {"user_id": 42, "keys": ["a"]}
    job_id = send(app, f"visit_{base}", "b", workspace=given)
    assert given == {"user_id": 42, "keys": ["a"]}  # the caller's is not changed
    assert row(app, job_id) == (
        "succeeded",
        {"user_id": 42, "keys": ["a", "b"], "visits": 1},
    )


def test_a_job_without_a_workspace_has_null_and_an_empty_one_in_its_run(app):
    job_id = send(app, "visit_TransactionalTask", "a")
    # The run made one: saved with its transaction.
    assert row(app, job_id) == ("succeeded", {"visits": 1, "keys": ["a"]})
    untouched = send(app, "outside")
    assert sql_null(app, untouched)


def test_a_failed_transactional_run_saves_nothing_another_saves_what_it_did(app):
    transactional = send(app, "visit_TransactionalTask", "a", True, workspace={})
    plain = send(app, "visit_ScheduleOnCommitTask", "a", True, workspace={})
    assert row(app, transactional) == ("failed", {})  # rolled back with the run
    assert row(app, plain) == ("failed", {"visits": 1, "keys": ["a"]})


def test_a_workspace_holds_what_celerys_json_holds(app):
    job_id = send(
        app, "visit_ScheduleOnCommitTask", "a", workspace={"price": Decimal("1.5")}
    )
    state, workspace = row(app, job_id)
    assert state == "succeeded"
    # Kept as Celery's serializer writes it; the run read a Decimal.
    assert workspace["price"] == {"__type__": "decimal", "__value__": "1.5"}
    assert workspace["visits"] == 1


@pytest.mark.parametrize(
    ("workspace", "error"),
    [
        ([1, 2], "expected a dict with text keys"),
        ({1: "a"}, "expected a dict with text keys"),
        ({"a": object()}, "a workspace is kept as JSON"),
    ],
)
def test_a_workspace_that_is_no_json_object_is_refused_at_the_call(
    app, workspace, error
):
    with pytest.raises(ValueError, match=error) as raised:
        send(app, "visit_ScheduleOnCommitTask", "a", workspace=workspace)
    assert "visit_ScheduleOnCommitTask.apply_async(workspace=" in str(raised.value)


def test_a_workspace_needs_the_job_table():
    config = Configurator(settings={"celery.broker_url": "memory://"})
    config.include("pyramid_tasks")
    config.add_task(outside, bind=True, base=PyramidTask, name="outside")
    config.commit()
    task = config.registry.celery_app.tasks["outside"]
    with pytest.raises(TypeError, match=r"outside.apply_async\(workspace=...\) needs"):
        task.apply_async(workspace={"a": 1})
    config.registry.celery_app.close()


def test_outside_durable_mode_there_is_no_workspace():
    config = Configurator(settings={"celery.task_always_eager": "true"})
    config.include("pyramid_tasks")
    config.add_task(outside, bind=True, base=PyramidTask, name="outside")
    config.commit()
    assert config.registry.celery_app.tasks["outside"].delay().get() is None
    config.registry.celery_app.close()


def thousand(registry):
    """1,000 job rows: user_id 0 to 9 and kind "a" or "b" in their
    workspaces, every tenth job without one; the ids by user and kind."""
    jobs = registry.pyramid_tasks_jobs
    task = registry.celery_app.tasks["outside"]
    rows, ids = [], {}
    for n in range(1000):
        workspace = None
        if n % 10 != 9:
            workspace = {"user_id": n % 9, "kind": "ab"[n % 2], "tags": ["x"]}
            ids.setdefault((n % 9, "ab"[n % 2]), set()).add(f"job-{n}")
        rows.append(
            jobs.row(task, f"job-{n}", (), {}, {}, "queued", workspace=workspace)
        )
    engine = registry["dbsession_factory"].kw["bind"]
    with engine.begin() as connection:
        jobs.store.insert(connection, rows)
    return ids


def test_the_workspace_filter_finds_exactly_the_matching_jobs_among_1000(app):
    ids = thousand(app)
    service = JobService.from_registry(app)

    def found(workspace):
        return {job["id"] for job in service.list(workspace=workspace, limit=1000)}

    user_7 = ids[(7, "a")] | ids[(7, "b")]
    assert len(user_7) == 100
    assert found({"user_id": 7}) == user_7
    assert found(["user_id=7"]) == user_7  # the value read as JSON: 7
    assert found("user_id=7") == user_7
    assert found(["user_id=7", "kind=a"]) == ids[(7, "a")]
    assert len(ids[(7, "a")]) == 55
    assert found(['kind="b"', "user_id=3"]) == ids[(3, "b")]
    assert found({"tags": ["x"], "user_id": 0}) == ids[(0, "a")] | ids[(0, "b")]
    assert found(['user_id="7"']) == set()  # text, not the number
    assert found({"user_id": 10}) == set()
    assert found({"tags": None}) == set()  # a list, not JSON null
    page = service.list(workspace={"user_id": 7}, limit=10)
    assert [job["workspace"]["user_id"] for job in page] == [7] * 10


@pytest.mark.parametrize("bad", ["user_id", "=7", ["user_id=1", "x"], {}, [], {1: 2}])
def test_a_bad_workspace_filter_names_itself(app, bad):
    service = JobService.from_registry(app)
    with pytest.raises(BadParameter, match="bad workspace") as raised:
        service.list(workspace=bad)
    assert raised.value.name == "workspace"


def test_a_workspace_that_cannot_be_saved_is_logged_and_the_run_stands(
    app, monkeypatch, caplog
):
    store = app.pyramid_tasks_jobs.store

    def refused(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(store, "save_workspace", refused)
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        job_id = send(app, "visit_ScheduleOnCommitTask", "a", workspace={})
    assert f"[{job_id}]: its workspace was not saved: the database went away" in (
        caplog.text
    )
    assert row(app, job_id) == ("succeeded", {})
