"""Durable mode's INFO lines, one per step of a job's life, each on a logger
of its own (``pyramid_tasks.jobs.<step>``): their exact text, and that a
commit of many jobs formats none of them when INFO is off."""

import logging
import re
import uuid

import pytest
import transaction
from celery import exceptions
from celery.exceptions import Retry
from kombu import Queue
from pyramid.config import Configurator
from sqlalchemy import update

from pyramid_tasks import PyramidTask, TransactionalTask
from pyramid_tasks.datamanager import Send, pending_sends
from pyramid_tasks.jobs import Job, limits
from pyramid_tasks.jobs import log as joblog
from pyramid_tasks.jobs.worker import JobRun

from .test_jobs_store import insert_pending, jobs_app  # noqa: F401 - a fixture
from .test_jobs_units import eager_settings

STEP_LOGGERS = [f"pyramid_tasks.jobs.{step}" for step in joblog.STEPS]


def lines(caplog, step):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == f"pyramid_tasks.jobs.{step}" and r.levelno == logging.INFO
    ]


def test_a_commit_logs_its_jobs_scheduled_then_published(jobs_app, caplog):  # noqa: F811
    app, _engine, queue, _client = jobs_app
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        first = app.tasks["noop"].apply_async((1,), tm=tm).id
        second = app.tasks["noop"].apply_async((2,), tm=tm, queue="other").id
    assert app.pyramid_registry.pyramid_tasks_jobs.flush(10)
    assert lines(caplog, "scheduled") == [
        f"Job noop[{first}] scheduled: queue {queue}",
        f"Job noop[{second}] scheduled: queue other",
    ]
    assert lines(caplog, "published") == [
        f"Job noop[{first}] published: queue {queue}",
        f"Job noop[{second}] published: queue other",
    ]
    app.connection_for_write().default_channel.queue_purge("other")


def test_a_commit_asks_each_logger_twice_when_info_is_off(
    jobs_app,  # noqa: F811
    caplog,
    monkeypatch,
):
    """2,500 jobs on one commit (three of the publish's chunks of 1,000, the
    last one short), INFO off: no line, no row kept for one, and two
    questions to each logger for the whole batch."""
    app, _engine, _queue, _client = jobs_app
    caplog.set_level(logging.WARNING, "pyramid_tasks.jobs")
    asked = {"scheduled": 0, "published": 0}
    for step in asked:
        logger = logging.getLogger(f"pyramid_tasks.jobs.{step}")

        def counting(level, logger=logger, step=step):
            asked[step] += 1
            return logging.Logger.isEnabledFor(logger, level)

        monkeypatch.setattr(logger, "isEnabledFor", counting)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        for i in range(2_500):
            app.tasks["noop"].apply_async((i,), tm=tm)
        sends = pending_sends(tm)
    assert app.pyramid_registry.pyramid_tasks_jobs.flush(30)
    assert len(sends) == 2_500
    assert asked == {"scheduled": 2, "published": 2}
    assert not any(hasattr(send, "row") for send in sends)
    assert [r for r in caplog.records if r.name in STEP_LOGGERS] == []


def test_a_send_without_its_row_is_named_by_its_task_and_options(
    jobs_app,  # noqa: F811
    caplog,
):
    """INFO turned on between the commit's INSERT and its publish: the line
    is made from what the send knows."""
    app, _engine, _queue, _client = jobs_app
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    task = app.tasks["noop"]
    sends = [
        Send(task, (), {}, {"queue": "mail"}, "id-1", None),
        Send(task, (), {}, {"queue": Queue("reports")}, "id-2", None),
    ]
    joblog.committed(joblog.PUBLISHED, sends)
    assert lines(caplog, "published") == [
        "Job noop[id-1] published: queue mail",
        "Job noop[id-2] published: queue reports",
    ]


def test_cancelled_jobs_are_logged_by_the_store(jobs_app, caplog):  # noqa: F811
    app, engine, queue, _client = jobs_app
    jobs = app.pyramid_registry.pyramid_tasks_jobs
    ids = insert_pending(engine, count=2)
    with engine.begin() as connection:
        connection.execute(
            update(Job.__table__)
            .where(Job.__table__.c.id == ids[1])
            .values(title="Nightly report", queue=queue)
        )
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    assert sorted(jobs.store.cancel(ids)) == sorted(ids)
    assert sorted(lines(caplog, "cancelled")) == sorted(
        [
            f"Job noop[{ids[0]}] cancelled: queue None",
            f"Job noop[{ids[1]}] cancelled: queue {queue}, title 'Nightly report'",
        ]
    )
    assert jobs.store.cancel(ids) == []
    assert len(lines(caplog, "cancelled")) == 2


def ok(self):
    return 1


def boom(self):
    raise ValueError("it fails")


@pytest.fixture
def eager_jobs(database_url, pg_schema):
    """A durable app whose jobs run in-process (``task.apply()``)."""
    config = Configurator(settings=eager_settings(database_url, pg_schema))
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.add_task(ok, bind=True, base=TransactionalTask, name="ok")
    config.add_task(boom, bind=True, base=PyramidTask, name="boom")
    config.commit()
    registry = config.registry
    yield registry.celery_app, registry.pyramid_tasks_jobs
    registry.celery_app.close()


def test_a_run_logs_started_then_succeeded_or_failed(eager_jobs, caplog):
    app, jobs = eager_jobs
    ok_id, boom_id = (f"log-{uuid.uuid4().hex}" for _ in range(2))
    row = jobs.row(app.tasks["ok"], ok_id, (), {}, {}, state="queued")
    jobs.store.insert_missing([{**row, "title": "Nightly report"}])
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    assert app.tasks["ok"].apply(task_id=ok_id).get() == 1
    failed = app.tasks["boom"].apply(task_id=boom_id)
    assert failed.state == "FAILURE"
    assert lines(caplog, "started") == [
        f"Job ok[{ok_id}] started (attempt 1): queue None, title 'Nightly report'",
        f"Job boom[{boom_id}] started (attempt 1): queue None",
    ]
    [succeeded] = lines(caplog, "succeeded")
    assert re.fullmatch(
        rf"Job ok\[{ok_id}\] succeeded in \d+\.\d{{3}} s: queue None, "
        r"title 'Nightly report'",
        succeeded,
    ), succeeded
    assert lines(caplog, "failed") == [
        f"Job boom[{boom_id}] failed (ValueError: it fails): queue None"
    ]


def test_the_retried_line_names_the_delay_and_the_cause(eager_jobs, caplog):
    """A run whose body called ``self.retry()``, as ``JobRun`` reports it
    (a worker test sees the same line: tests/test_scheduling_options.py)."""
    app, jobs = eager_jobs
    task = app.tasks["ok"]
    task.push_request(id="log-retried", delivery_info={"routing_key": "mail"})
    try:
        run = JobRun(jobs, task, transactional=True)
    finally:
        task.pop_request()
    run.attempt, run.title = 2, "Nightly report"
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    joblog.run(joblog.RETRIED, run, Retry(exc=KeyError("first run"), when=5))
    joblog.run(joblog.RETRIED, run, Retry(when=5))
    assert lines(caplog, "retried") == [
        "Job ok[log-retried] retried in 5s (KeyError: 'first run'): queue mail, "
        "title 'Nightly report'",
        "Job ok[log-retried] retried in 5s: queue mail, title 'Nightly report'",
    ]


def test_a_step_turned_off_on_its_own_logs_nothing(eager_jobs, caplog):
    app, _jobs = eager_jobs
    # The second call sets caplog's handler to INFO too.
    caplog.set_level(logging.WARNING, "pyramid_tasks.jobs.started")
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    job_id = f"log-{uuid.uuid4().hex}"
    assert app.tasks["ok"].apply(task_id=job_id).get() == 1
    assert lines(caplog, "started") == []
    assert len(lines(caplog, "succeeded")) == 1
    joblog.line(joblog.STARTED, job_id, "ok", None, None)
    assert lines(caplog, "started") == []


def test_a_job_killed_at_its_time_limit_is_failed_once(eager_jobs, caplog):
    """What the worker's main process does when Celery reports the kill
    (twice, as it does): the row, the line, and an unknown or finished job."""
    app, jobs = eager_jobs
    task = app.tasks["ok"]
    job_id = f"limit-{uuid.uuid4().hex}"
    row = jobs.row(task, job_id, (), {}, {"queue": "reports"}, state="started")
    jobs.store.insert_missing([{**row, "attempts": 1}])
    caplog.set_level(logging.INFO, "pyramid_tasks.jobs")
    reported = exceptions.TimeLimitExceeded(2.5)
    assert limits.time_limit_exceeded(app, task, job_id, reported)
    assert not limits.time_limit_exceeded(app, task, job_id, reported)
    assert not limits.time_limit_exceeded(app, task, "no-such-job", reported)
    assert jobs.store.get(job_id)["error"] == (
        "TimeLimitExceeded: killed at its hard time limit of 2.5 s"
    )
    assert lines(caplog, "failed") == [
        f"Job ok[{job_id}] failed (TimeLimitExceeded: killed at its hard time "
        "limit of 2.5 s): queue reports"
    ]
    assert str(
        limits._reason(app.pyramid_registry, exceptions.TimeLimitExceeded())
    ) == ("killed at its hard time limit")


def test_a_kill_the_table_cannot_record_is_a_warning(eager_jobs, caplog):
    app, jobs = eager_jobs
    Job.__table__.drop(jobs.store.engine)
    caplog.set_level(logging.WARNING, "pyramid_tasks.jobs.limits")
    reported = exceptions.TimeLimitExceeded(2)
    assert not limits.time_limit_exceeded(app, app.tasks["ok"], "job-1", reported)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(
        "Job ok[job-1] was killed at its hard time limit; its row was not "
        "updated (its lease brings it back): relation "
    ), warning
    assert warning.endswith(f'{Job.__tablename__}" does not exist'), warning
