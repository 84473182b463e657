"""Small parts of durable mode, in-process: the JSON columns, the model's
repr, a relay never started, and the task API outside a tracked run."""

import functools
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import select

from pyramid_tasks import PyramidTask
from pyramid_tasks.jobs import Job, metadata
from pyramid_tasks.jobs.model import loaded, stored, utcnow
from pyramid_tasks.jobs.relay import Relay


def observe(self, other=None):
    """Report what the task API gives in this run (and on another task)."""
    target = self if other is None else self.app.tasks[other]
    target.set_progress(1, 2, "half")  # nothing to record: not a tracked run
    return {
        "job": target.job,
        "cancel_requested": target.cancel_requested(),
    }


def app_with(settings, *includes):
    config = Configurator(settings=settings)
    config.include("demo_app.models")
    config.include("pyramid_tasks")
    for name in includes:
        config.include(name)
    config.add_task(observe, bind=True, base=PyramidTask, name="observe")
    config.add_task(observe, bind=True, base=PyramidTask, name="other")
    config.commit()
    return config.registry


def test_json_columns_keep_celery_types_and_nulls(database_url, pg_schema):
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{pg_schema}"'))
    engine = engine.execution_options(schema_translate_map={None: pg_schema})
    metadata.create_all(engine)
    when = datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)
    key = uuid.uuid4()
    job_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            Job.__table__.insert(),
            [
                stored(
                    {
                        "id": job_id,
                        "name": "t",
                        "state": "pending",
                        "created_at": utcnow(),
                        "args": [when, key, Decimal("1.5")],
                        "kwargs": None,
                        "options": {"eta": when},
                    }
                )
            ],
        )
    with engine.connect() as connection:
        row = loaded(connection.execute(select(Job.__table__)).one()._asdict())
        raw = connection.execute(
            select(sqlalchemy.cast(Job.__table__.c.args, sqlalchemy.Text))
        ).scalar()
    assert row["args"] == [when, key, Decimal("1.5")]
    assert (row["kwargs"], row["options"]) == (None, {"eta": when})
    assert row["created_at"].tzinfo is not None
    assert '"__type__": "datetime"' in raw  # plain JSON in the database
    job = Job(id=job_id, name="t", state="pending")
    assert repr(job) == f"<Job t[{job_id}] pending>"
    engine.dispose()


@pytest.mark.parametrize(
    "value",
    [
        [1, "a", None, True, 1.5, float("inf")],  # copied
        {"a": [1, {"b": (2, 3)}]},  # copied, the tuple a list
        {1: "key not text"},  # kombu's JSON: the key becomes "1"
        functools.reduce(lambda inner, _: [inner], range(25), "deep"),  # deep
        [datetime(2026, 1, 1, tzinfo=UTC), Decimal("2.50")],  # kombu's type markers
        {"flat": 1, "text": "x", "none": None},  # copied
        {"when": datetime(2026, 1, 1, tzinfo=UTC)},  # kombu's, in a dict
    ],
)
def test_stored_json_is_kombus_json_and_back(value):
    """The columns hold what kombu's JSON gives back, whether the value is
    copied (plain) or sent through it."""
    from kombu.utils import json as kombu_json

    row = stored({"args": value, "name": "n"})
    assert repr(row["args"]) == repr(json.loads(kombu_json.dumps(value)))
    assert row["name"] == "n"


def test_the_task_api_outside_a_tracked_run(database_url, pg_schema):
    """Called directly, eagerly without durable mode, or on another task:
    no job, never cancelled, progress ignored."""
    settings = {
        "sqlalchemy.url": database_url,
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
    }
    plain = app_with(settings).celery_app
    assert plain.tasks["observe"].apply().get() == {
        "job": None,
        "cancel_requested": False,
    }
    durable = app_with(settings, "pyramid_tasks.jobs").celery_app
    task = durable.tasks["observe"]
    assert task() == {"job": None, "cancel_requested": False}  # called directly
    # A tracked eager run asking about another task gets nothing of its own.
    assert task.apply(("other",)).get() == {"job": None, "cancel_requested": False}
    Relay(durable).stop()  # never started: nothing to stop


def test_a_wrong_request_session_is_named(database_url, pg_schema):
    from pyramid.exceptions import ConfigurationError

    from pyramid_tasks import TransactionalTask

    config = Configurator(
        settings={
            "sqlalchemy.url": database_url,
            "demo.schema": pg_schema,
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "tasks.jobs.request_session": "db_session",
        }
    )
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.add_task(answer, bind=True, base=TransactionalTask, name="tx")
    config.commit()
    task = config.registry.celery_app.tasks["tx"]
    result = task.apply()
    assert isinstance(result.result, ConfigurationError)
    # The run never read its row: started on its own first, then failed;
    # a job cancelled meanwhile stays as it is.
    jobs = config.registry.pyramid_tasks_jobs
    assert (
        jobs.store.get(result.id)["state"],
        jobs.store.get(result.id)["attempts"],
    ) == ("failed", 1)
    jobs.store.insert_missing([jobs.row(task, "gone", (), {}, {}, state="cancelled")])
    assert isinstance(task.apply(task_id="gone").result, ConfigurationError)
    assert (jobs.store.get("gone")["state"], jobs.store.get("gone")["attempts"]) == (
        "cancelled",
        0,
    )
    assert str(result.result) == (
        "Setting tasks.jobs.request_session = 'db_session': the request of "
        "task tx has no attribute 'db_session'; name the request attribute of "
        "the session joined to request.tm (the cookiecutter's is dbsession)."
    )


# -- Durable mode's answers to what a review found (eager, in-process) ------

RECORDED = []


def answer(self, value=1):
    return value


def record(self, value, key):
    RECORDED.append((key, value))


def ignoring(self, how):
    from celery.exceptions import Ignore, Reject

    raise Ignore() if how == "ignore" else Reject("no", requeue=False)


def deferred(self, how):
    """A transactional body whose started mark is left to the heartbeat
    thread; ``how`` it ends, and the row it saw."""
    from celery.exceptions import Ignore

    from .conftest import wait_for

    store = self.app.pyramid_registry.pyramid_tasks_jobs.store
    if how == "fails":
        raise ValueError("it fails")
    if how == "ignored":
        raise Ignore()
    if how == "cancelled":
        store.cancel([self.request.id])
        self.set_progress(1, 2)  # not runnable: nothing written
    if how == "progress":
        self.set_progress(1, 2, "half")  # marked started first
    if how.startswith("long"):
        wait_for(lambda: store.state(self.request.id) == "started", timeout=10)
    if how == "long, cancelled":
        store.cancel([self.request.id])
    if how in ("long", "progress"):
        return store.get(self.request.id)
    return how


def durable_app(settings, **extra):
    from pyramid_tasks import ScheduleOnCommitTask, TransactionalTask

    config = Configurator(settings={**settings, **extra})
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.add_task(answer, bind=True, base=TransactionalTask, name="answer")
    config.add_task(record, bind=True, base=PyramidTask, name="record")
    config.add_task(ignoring, bind=True, base=ScheduleOnCommitTask, name="ignoring")
    config.add_task(deferred, bind=True, base=TransactionalTask, name="deferred")
    config.commit()
    registry = config.registry
    return registry, registry.pyramid_tasks_jobs


def eager_settings(database_url, pg_schema):
    return {
        "sqlalchemy.url": database_url,
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
    }


def test_a_delivery_that_changes_nothing_sends_no_callback(database_url, pg_schema):
    """A second delivery of a job that succeeded, and a cancelled job: Celery's
    Ignore, so no result and no link/chain step with None."""
    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    app = registry.celery_app
    key = uuid.uuid4().hex
    link = app.tasks["record"].s(key)
    first = app.tasks["answer"].apply(task_id="job-1", link=link)
    again = app.tasks["answer"].apply(task_id="job-1", link=link)
    cancelled_id = "job-2"
    app.tasks["answer"].apply(task_id=cancelled_id)
    with jobs.store.engine.begin() as connection:
        connection.execute(
            Job.__table__.update()
            .where(Job.__table__.c.id == cancelled_id)
            .values(state="cancelled")
        )
    cancelled = app.tasks["answer"].apply(task_id=cancelled_id, link=link)
    runs = [r for r in RECORDED if r[0] == key]
    print(f"states {first.state, again.state, cancelled.state}, callbacks {runs}")
    assert (first.state, again.state, cancelled.state) == (
        "SUCCESS",
        "IGNORED",
        "IGNORED",
    )
    assert runs == [(key, 1)]  # the first delivery's only


def test_ignore_and_reject_put_the_job_back_in_line(database_url, pg_schema):
    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    app = registry.celery_app
    for how in ("ignore", "reject"):
        result = app.tasks["ignoring"].apply((how,), task_id=f"i-{how}")
        row = jobs.store.get(f"i-{how}")
        assert (row["state"], row["error"]) == ("queued", None), how
        assert result.state in ("IGNORED", "REJECTED", "FAILURE")


def test_a_failing_mark_or_event_changes_nothing_of_the_run(
    database_url, pg_schema, caplog
):
    import logging

    from pyramid_tasks.jobs import JobStarted

    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    app = registry.celery_app

    def breaks_its_request(event):
        event.request.add_finished_callback(lambda request: 1 / 0)

    registry.registerHandler(breaks_its_request, (JobStarted,))
    jobs._listened.clear()

    def refused(job_id, attempt):
        raise sqlalchemy.exc.OperationalError("UPDATE", {}, RuntimeError("down\nx"))

    jobs.store.succeed = refused
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    result = app.tasks["record"].apply((5, "k"), task_id="r-1")
    assert (result.state, result.result) == ("SUCCESS", None)
    assert jobs.store.get("r-1")["state"] == "started"  # its lease re-runs it
    messages = [r.getMessage() for r in caplog.records]
    assert "Sending JobStarted for job record[r-1] failed; the job goes on." in (
        messages
    )
    assert "Job record[r-1]: its row was not updated (refused): down" in messages


def test_arguments_a_row_cannot_hold_are_refused_at_the_call(database_url, pg_schema):
    import transaction

    registry, _jobs = durable_app(
        eager_settings(database_url, pg_schema),
        **{
            "tasks.allow_pickle": "true",
            "celery.task_serializer": "pickle",
            "celery.accept_content": "pickle json",
        },
    )
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    with pytest.raises(TypeError) as info:
        registry.celery_app.tasks["answer"].apply_async(({1, 2},), tm=tm)
    tm.abort()
    assert str(info.value).startswith(
        "answer.apply_async(tm=...): durable mode keeps a job's arguments and "
        "options as JSON, and Object of type set is not JSON serializable"
    )


def test_a_job_sent_with_a_countdown_is_scheduled(database_url, pg_schema):
    settings = eager_settings(database_url, pg_schema)
    settings["celery.task_always_eager"] = "false"
    registry, jobs = durable_app(settings)
    job_id = registry.celery_app.tasks["record"].apply_async((1, "k"), countdown=60).id
    assert jobs.store.get(job_id)["state"] == "scheduled"
    registry.celery_app.close()


def test_on_sqlite_a_job_sent_at_once_gets_its_row_from_the_worker(tmp_path):
    registry, jobs = durable_app(
        {
            "sqlalchemy.url": f"sqlite:///{tmp_path}/app.sqlite",
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
        }
    )
    job_id = registry.celery_app.tasks["record"].delay(1, "k").id
    assert jobs.store.get(job_id) is None  # no second writer on SQLite
    registry.celery_app.close()


def test_one_line_takes_a_statement_errors_own_first_line():
    from pyramid_tasks.jobs.store import one_line

    error = sqlalchemy.exc.StatementError(
        "wrapped", "INSERT ...", {"secret": 1}, TypeError("bad value\nmore")
    )
    assert one_line(error) == "bad value"
    assert one_line(RuntimeError("")) == "RuntimeError"


def test_forked_children_and_ended_ones_keep_their_marks_apart():
    from celery import signals

    from pyramid_tasks.jobs.web import _marker

    before = _marker.condition
    signals.worker_process_shutdown.send(sender=None)  # flushes: nothing waits
    _marker.forget()  # what a forked child does first
    assert _marker.condition is not before
    assert (_marker.items, _marker.busy, _marker.pid) == ([], False, None)


def test_job_created_for_another_transaction_gets_a_request_of_its_own(
    database_url, pg_schema, caplog
):
    """The current request belongs to another manager: the event gets a
    request made for the job's transaction; its failing finished callback is
    logged, and the job still commits."""
    import logging

    import transaction
    from pyramid.request import Request
    from pyramid.threadlocal import manager

    from pyramid_tasks.jobs import JobCreated

    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    seen = []

    def created(event):
        seen.append(event.request)
        event.request.add_finished_callback(lambda request: 1 / 0)

    registry.registerHandler(created, (JobCreated,))
    jobs._listened.clear()
    other = Request.blank("/")
    other.tm = transaction.TransactionManager(explicit=True)
    tm = transaction.TransactionManager(explicit=True)
    caplog.set_level(logging.ERROR, "pyramid_tasks")
    manager.push({"registry": registry, "request": other})
    try:
        with tm:
            job_id = registry.celery_app.tasks["answer"].apply_async(tm=tm).id
    finally:
        manager.pop()
    [request] = seen
    assert request is not other and request.tm is tm
    assert jobs.store.get(job_id)["state"] == "succeeded"  # eager, after commit
    assert [r.getMessage() for r in caplog.records] == [
        f"Sending JobCreated for job answer[{job_id}] failed; the job goes on."
    ]


def test_a_short_transactional_run_writes_its_row_once(database_url, pg_schema):
    """A transactional run with ``acks_late`` (durable mode's default) reads
    its job with its lock and leaves the started mark to the heartbeat
    thread: a run over before it is due writes the start with its outcome,
    in one UPDATE, and its row ends as if it had been marked started."""
    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    task = registry.celery_app.tasks["deferred"]
    store = jobs.store
    statements = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.split()[0])  # all of them the job's

    ends = {}
    for how in ("returns", "fails", "ignored"):
        job_id = f"short-{how}"
        store.insert_missing([jobs.row(task, job_id, (how,), {}, {}, state="queued")])
        sqlalchemy.event.listen(store.engine, "before_cursor_execute", seen)
        try:
            before = utcnow()
            result = task.apply((how,), task_id=job_id)
        finally:
            sqlalchemy.event.remove(store.engine, "before_cursor_execute", seen)
        ends[how] = (result.state, statements[:], store.get(job_id))
        statements.clear()
        row = ends[how][2]
        assert before <= row["started_at"] <= row["heartbeat_at"]
        assert (row["attempts"], row["worker"]) == (1, store.worker_name)
    print({how: (state, sql, row["state"]) for how, (state, sql, row) in ends.items()})
    result, sql, row = ends["returns"]
    # The lock with the row, and succeeded in the run's own transaction.
    assert (result, sql, row["state"], row["progress"]) == (
        "SUCCESS",
        ["SELECT", "UPDATE"],
        "succeeded",
        100,
    )
    assert row["finished_at"] >= row["started_at"]
    result, sql, row = ends["fails"]
    assert (result, sql, row["state"], row["error"]) == (
        "FAILURE",
        ["SELECT", "UPDATE"],
        "failed",
        "ValueError: it fails",
    )
    result, sql, row = ends["ignored"]
    assert (result, sql, row["state"], row["finished_at"]) == (
        "IGNORED",
        ["SELECT", "UPDATE"],
        "queued",
        None,
    )


def test_a_transactional_run_still_going_is_marked_started(
    database_url, pg_schema, monkeypatch
):
    """The heartbeat thread marks a run still going started (here at once);
    progress marks it first; a run cancelled before its mark is counted,
    and its job stays cancelled."""
    from pyramid_tasks.jobs import worker

    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    task = registry.celery_app.tasks["deferred"]
    store = jobs.store
    for how in ("long", "progress", "cancelled"):
        store.insert_missing([jobs.row(task, how, (how,), {}, {}, state="queued")])

    monkeypatch.setattr(worker, "START_MARK_DELAY", 0.0)
    result = task.apply(("long",), task_id="long")
    seen, row = result.result, store.get("long")
    assert (seen["state"], seen["attempts"], seen["progress"]) == ("started", 1, None)
    assert (row["state"], row["attempts"], row["progress"]) == ("succeeded", 1, 100)
    assert row["started_at"] == seen["started_at"]
    how = "long, cancelled"
    store.insert_missing([jobs.row(task, how, (how,), {}, {}, state="queued")])
    result = task.apply((how,), task_id=how)
    row = store.get(how)
    assert (result.state, row["state"], row["attempts"]) == ("IGNORED", "cancelled", 1)

    monkeypatch.setattr(worker, "START_MARK_DELAY", 60.0)
    seen = task.apply(("progress",), task_id="progress").result
    assert (seen["state"], seen["attempts"]) == ("started", 1)
    assert (seen["progress"], seen["progress_message"]) == (50, "half")
    assert store.get("progress")["state"] == "succeeded"

    result = task.apply(("cancelled",), task_id="cancelled")
    row = store.get("cancelled")
    assert (result.state, row["state"], row["attempts"]) == ("IGNORED", "cancelled", 1)
    assert (row["progress"], row["worker"]) == (None, store.worker_name)
    assert worker._running.due == {}


def test_a_run_marked_started_first_skips_a_finished_job(
    database_url, pg_schema, caplog
):
    """The classes that are marked started before the body: a finished job
    is not run, and a missing table is named."""
    import logging

    registry, jobs = durable_app(eager_settings(database_url, pg_schema))
    task = registry.celery_app.tasks["record"]
    jobs.store.insert_missing(
        [jobs.row(task, "done", (1, "k"), {}, {}, state="succeeded")]
    )
    caplog.set_level(logging.INFO, "pyramid_tasks")
    assert task.apply((1, "k"), task_id="done").state == "IGNORED"
    assert "Job record[done] is succeeded: not run." in caplog.text
    Job.__table__.drop(jobs.store.engine)
    result = task.apply((1, "k"), task_id="gone")
    assert "jobs init-db" in str(result.result)
