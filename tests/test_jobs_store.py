"""The job store, the relay's rounds and the heartbeat, on real PostgreSQL
and Redis, driven round by round (``Relay.run_once``), no worker thread."""

import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis
import sqlalchemy
import transaction
from celery import signals
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError, ConfigurationExecutionError
from sqlalchemy import select, text, update

from pyramid_tasks import (
    PyramidTask,
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
)
from pyramid_tasks.jobs import Job, metadata
from pyramid_tasks.jobs.model import utcnow
from pyramid_tasks.jobs.relay import Relay, RelayStep, install
from pyramid_tasks.jobs.store import JobTableMissing
from pyramid_tasks.jobs.worker import _Running

from .conftest import wait_for
from .test_jobs_kill import lock_waiters

_c = Job.__table__.c


def noop(self, *args):
    return args


@pytest.fixture
def jobs_app(database_url, pg_schema, redis_url):
    """A durable app on this test's schema and queue: ``(app, engine, queue)``."""
    queue = f"pyramid_tasks_jobs_{uuid.uuid4().hex[:10]}"
    settings = {
        "sqlalchemy.url": database_url,
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
        "celery.broker_url": redis_url,
        "celery.task_default_queue": queue,
        "tasks.jobs.relay_grace": "0",
        "tasks.jobs.publish_attempts": "2",
        "tasks.jobs.lease": "5s",
    }
    config = Configurator(settings=settings)
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.add_route("order", "/orders/{id}")
    config.add_task(noop, bind=True, base=ScheduleOnCommitTask, name="noop")
    config.add_task(noop, bind=True, base=PyramidTask, name="plain")
    config.add_task(noop, bind=True, base=RetryableTransactionTask, name="tx")
    config.add_task(
        noop, bind=True, base=TransactionalTask, name="tx_early", acks_late=False
    )
    config.commit()
    registry = config.registry
    engine = registry["dbsession_factory"].kw["bind"]
    metadata.create_all(engine)
    app = registry.celery_app
    client = redis.Redis.from_url(redis_url)
    yield app, engine, queue, client
    client.delete(queue)
    client.close()
    app.close()


def rows(engine):
    with engine.connect() as connection:
        return [r._asdict() for r in connection.execute(select(Job.__table__))]


def insert_pending(engine, name="noop", count=1, **extra):
    now = utcnow()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with engine.begin() as connection:
        connection.execute(
            Job.__table__.insert(),
            [
                {
                    "id": job_id,
                    "name": name,
                    "args": [i],
                    "kwargs": {},
                    "options": {},
                    "state": "pending",
                    "attempts": 0,
                    "publish_attempts": 0,
                    "created_at": now - timedelta(seconds=60),
                    **extra,
                }
                for i, job_id in enumerate(ids)
            ],
        )
    return ids


def test_the_relay_sends_pending_rows_once_and_marks_them_queued(jobs_app, caplog):
    app, engine, queue, client = jobs_app
    ids = insert_pending(engine, count=3)
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    assert Relay(app).run_once() == (0, 3, 0)
    assert {r["id"]: r["state"] for r in rows(engine)} == dict.fromkeys(ids, "queued")
    assert client.llen(queue) == 3
    assert Relay(app).run_once() == (0, 0, 0)  # nothing pending: nothing sent
    assert client.llen(queue) == 3
    sent_lines = [r for r in caplog.records if "the relay sent it" in r.getMessage()]
    assert len(sent_lines) == 3


def test_the_relay_keeps_an_eta_as_scheduled(jobs_app):
    app, engine, queue, client = jobs_app
    eta = utcnow() + timedelta(hours=1)
    insert_pending(engine, eta=eta, options={"countdown": 3600})
    assert Relay(app).run_once() == (0, 1, 0)
    (row,) = rows(engine)
    assert row["state"] == "scheduled"
    assert client.llen(queue) == 1


def test_a_row_of_an_unknown_task_backs_off_then_is_dead(jobs_app, caplog):
    app, engine, _queue, _client = jobs_app
    (job_id,) = insert_pending(engine, name="no.such.task")
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    assert Relay(app).run_once() == (0, 0, 0)
    (row,) = rows(engine)
    assert (row["state"], row["publish_attempts"]) == ("pending", 1)
    assert row["publish_after"] > utcnow()  # backed off
    assert Relay(app).run_once() == (0, 0, 0)  # not due yet
    with engine.begin() as connection:
        connection.execute(update(Job.__table__).values(publish_after=None))
    assert Relay(app).run_once() == (0, 0, 1)  # tasks.jobs.publish_attempts = 2
    (row,) = rows(engine)
    assert (row["state"], row["publish_attempts"]) == ("dead", 2)
    dead = [r for r in caplog.records if "is dead" in r.getMessage()]
    assert [r.levelname for r in dead] == ["ERROR"]
    assert job_id in dead[0].getMessage()


def test_an_expired_lease_is_requeued_unless_its_lock_is_held(jobs_app, caplog):
    app, engine, queue, client = jobs_app
    stale = utcnow() - timedelta(seconds=60)
    dead_id, alive_id = insert_pending(
        engine, count=2, state="started", heartbeat_at=stale, worker="w1"
    )
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    # A transactional run still inside its transaction holds the job's lock.
    with engine.connect() as holder, holder.begin():
        holder.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:id, 0))"),
            {"id": alive_id},
        )
        assert Relay(app).run_once() == (1, 1, 0)
    states = {r["id"]: r["state"] for r in rows(engine)}
    assert states == {dead_id: "queued", alive_id: "started"}
    assert client.llen(queue) == 1
    requeued = [r for r in caplog.records if "re-queued" in r.getMessage()]
    assert len(requeued) == 1 and dead_id in requeued[0].getMessage()


def test_a_failing_round_is_logged_and_the_loop_goes_on(jobs_app, caplog):
    app = jobs_app[0]
    relay = Relay(app)
    relay.settings = type(relay.settings)(relay_interval=0.01)
    rounds = []
    failed_twice = threading.Event()

    def failing_round():
        rounds.append(1)
        if len(rounds) >= 2:
            failed_twice.set()
        raise RuntimeError("database\nunreachable")

    relay.run_once = failing_round
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    relay.start()
    assert failed_twice.wait(10)
    relay.stop()
    assert not relay.thread.is_alive()
    lines = [
        r.getMessage() for r in caplog.records if "relay's round" in r.getMessage()
    ]
    assert lines and lines[0].endswith("database unreachable")


def test_the_beat_relay_and_the_relay_step_start_and_stop(jobs_app):
    app, engine, queue, client = jobs_app
    install(app)
    assert RelayStep in app.steps["worker"]

    class Process:
        pass

    beat = Process()
    beat.app = object()  # another app's beat: no relay here
    signals.beat_init.send(sender=beat)
    assert not hasattr(app, "pyramid_beat_relay")
    beat.app = app
    signals.beat_init.send(sender=beat)
    app.pyramid_beat_relay.stop()
    assert not app.pyramid_beat_relay.thread.is_alive()

    worker = Process()
    worker.app = app
    step = RelayStep(worker)
    step.stop(worker)  # never started: nothing to stop
    step.start(worker)
    insert_pending(engine)
    # The relay's thread sends the row within a few of its rounds.
    wait_for(lambda: client.llen(queue) == 1, timeout=10, message="the relay")
    step.stop(worker)
    assert not step.relay.thread.is_alive()


def test_heartbeats_renew_the_leases_of_running_jobs_only(jobs_app, caplog):
    app, engine, _queue, _client = jobs_app
    jobs = app.pyramid_registry.pyramid_tasks_jobs
    stale = utcnow() - timedelta(seconds=60)
    running_id, other_id = insert_pending(
        engine, count=2, state="started", heartbeat_at=stale
    )

    class Run:
        pass

    run = Run()
    run.jobs, run.id, run.attempt = jobs, running_id, 0
    running = _Running()
    running.runs.add(run)
    running.beat()
    beats = {r["id"]: r["heartbeat_at"] for r in rows(engine)}
    assert beats[running_id] > utcnow() - timedelta(seconds=5)
    assert beats[other_id] == stale

    # A database error is one WARNING line; the next beat tries again.
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    Job.__table__.drop(engine)
    running.beat()
    assert any("heartbeat failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("count", [1, 150])  # an INSERT; COPY
def test_a_missing_job_table_is_named_at_the_commit(jobs_app, count):
    app, engine, _queue, _client = jobs_app
    Job.__table__.drop(engine)
    registry = app.pyramid_registry
    tm = transaction.TransactionManager(explicit=True)
    from demo_app.models import Order
    from pyramid_tasks.sqlalchemy import get_tm_session

    tm.begin()
    session = get_tm_session(registry["dbsession_factory"], tm)
    session.add(Order(email="a@example.com"))
    for n in range(count):
        app.tasks["noop"].apply_async((n,), tm=tm)
    with pytest.raises(JobTableMissing, match="tasks-celery CONFIG jobs init-db"):
        tm.commit()
    tm.abort()
    with engine.connect() as connection:
        assert connection.scalar(select(sqlalchemy.func.count(Order.id))) == 0


def test_tasks_jobs_settings_without_the_include_are_refused():
    config = Configurator(
        settings={
            "celery.broker_url": "memory://",
            "tasks.jobs.relay_grace": "5s",
        }
    )
    config.include("pyramid_tasks")
    with pytest.raises(ConfigurationExecutionError) as info:
        config.commit()
    assert isinstance(info.value.evalue, ConfigurationError)
    assert "tasks.jobs.relay_grace" in str(info.value.evalue)
    assert "config.include('pyramid_tasks.jobs')" in str(info.value.evalue)


def test_durable_mode_makes_transactional_tasks_redeliverable(jobs_app):
    app = jobs_app[0]
    acks = {
        name: (app.tasks[name].acks_late, app.tasks[name].reject_on_worker_lost)
        for name in ("noop", "plain", "tx", "tx_early")
    }
    assert acks == {
        "noop": (False, None),
        "plain": (False, None),
        "tx": (True, True),
        "tx_early": (False, True),  # the app's own choice is kept
    }


def test_tasks_run_by_the_testing_helpers_run_every_time(database_url, pg_schema):
    """pyramid_tasks.testing runs a captured task as often as asked, durable
    mode or not: no job row is read or written for it."""
    from pyramid_tasks.testing import get_task_capture

    config = Configurator(
        settings={
            "sqlalchemy.url": database_url,
            "demo.schema": pg_schema,
            "demo.create_tables": "true",
        }
    )
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.include("pyramid_tasks.testing")
    config.add_task(noop, bind=True, base=RetryableTransactionTask, name="tx")
    config.commit()
    registry = config.registry
    app = registry.celery_app
    app.tasks["tx"].delay(7)
    (captured,) = get_task_capture(registry).sent
    assert captured.run() == (7,)
    assert captured.run() == (7,)
    engine = registry["dbsession_factory"].kw["bind"]
    assert not sqlalchemy.inspect(engine).has_table("pyramid_tasks_job")


def test_a_relay_without_its_table_says_what_to_do_and_backs_off(jobs_app, caplog):
    app, engine, _queue, _client = jobs_app
    Job.__table__.drop(engine)
    relay = Relay(app)
    relay.settings = type(relay.settings)(relay_interval=0.01)
    caplog.set_level(logging.INFO, "pyramid_tasks")
    relay.start()
    wait_for(
        lambda: len([r for r in caplog.records if r.levelname == "ERROR"]) >= 3,
        message="three failed rounds",
    )
    relay.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("Job relay started: every 0.01 s, on postgresql")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0].startswith(
        "The job relay's round failed (tried again in 0.02 s): The job table "
        "pyramid_tasks_job does not exist in postgresql"
    )
    assert "tried again in 0.04 s" in errors[1]
    assert "tasks-celery CONFIG jobs init-db" in errors[0]
    assert "SELECT" not in errors[0]  # the database's message, not the SQL


def test_a_job_whose_workers_keep_dying_is_failed_not_rerun(jobs_app, caplog):
    """tasks.jobs.lost_attempts (3): the third lost worker fails the job."""
    app, engine, queue, client = jobs_app
    stale = utcnow() - timedelta(seconds=60)
    (job_id,) = insert_pending(
        engine, state="started", heartbeat_at=stale, worker="w9", lost=2
    )
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    assert Relay(app).run_once() == (1, 0, 0)
    (row,) = rows(engine)
    assert (row["state"], row["lost"]) == ("failed", 3)
    assert row["error"] == (
        "WorkerLostError: its worker was lost 3 times (tasks.jobs.lost_attempts)"
    )
    assert client.llen(queue) == 0
    [line] = [r for r in caplog.records if job_id in r.getMessage()]
    assert line.levelname == "ERROR"
    assert line.getMessage().endswith(
        "failed, its worker lost 3 times (tasks.jobs.lost_attempts)."
    )


def test_retrying_without_an_error_keeps_the_last_one(jobs_app):
    """Celery's retry() without exc: the job waits, its last error stays."""
    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    (job_id,) = insert_pending(
        engine, state="started", attempts=1, error="KeyError: 'x'"
    )
    assert store.retrying(job_id, 1) is True
    (row,) = rows(engine)
    assert (row["state"], row["error"]) == ("retrying", "KeyError: 'x'")


def test_a_late_started_mark_never_overwrites_an_outcome(jobs_app, caplog):
    """The started mark a transactional run with ``acks_late`` leaves to the
    heartbeat thread (``start_late``, with the attempts its lock read) lands
    on a job still waiting or started by another delivery since (counted on
    top), never on one that succeeded, was cancelled, or failed or died
    after that read."""
    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    cases = {
        # (state, attempts) before: what start_late(seen=1) finds it
        ("queued", 1): 2,
        ("retrying", 1): 2,
        ("started", 2): 3,  # another delivery started while this one ran
        ("failed", 1): 2,  # failed before this delivery read it: re-run
        ("dead", 1): 2,
        ("failed", 2): None,  # failed after the read: a newer attempt's
        ("dead", 2): None,
        ("succeeded", 1): None,
        ("cancelled", 1): None,
    }
    ids = {
        case: insert_pending(engine, state=case[0], attempts=case[1])[0]
        for case in cases
    }
    started_at = utcnow() - timedelta(seconds=1)
    landed = {case: store.start_late(ids[case], 1, started_at) for case in cases}
    print({f"{state}/{attempts}": landed[state, attempts] for state, attempts in cases})
    assert landed == cases
    after = {row["id"]: row for row in rows(engine)}
    for case, attempt in cases.items():
        row = after[ids[case]]
        if attempt is None:
            assert (row["state"], row["attempts"], row["started_at"]) == (
                *case,
                None,
            )
        else:
            assert (row["state"], row["attempts"]) == ("started", attempt)
            assert (row["started_at"], row["worker"]) == (started_at, store.worker_name)
            assert row["heartbeat_at"] > started_at

    # A cancelled run's attempt is recorded only on its own read of the row.
    cancelled = ids["cancelled", 1]
    assert store.record_attempt(cancelled, None, (0, started_at)) is False
    assert store.record_attempt(cancelled, None, (1, started_at)) is True
    assert (store.get(cancelled)["state"], store.get(cancelled)["attempts"]) == (
        "cancelled",
        2,
    )

    # A mark that fails is one WARNING line; the run keeps owing it.
    class Run:
        pass

    run = Run()
    run.jobs, run.task = app.pyramid_registry.pyramid_tasks_jobs, app.tasks["tx"]
    run.id, run.seen, run.started_at = ids["queued", 1], 1, started_at
    run.attempt, run.deferred = None, True
    running = _Running()
    running.writing.add(run)
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    Job.__table__.drop(engine)
    running._start(run)
    assert (run.attempt, run.deferred, running.writing) == (None, True, set())
    assert f"Job tx[{run.id}]: its row was not marked started: " in caplog.text


def test_a_second_delivery_waits_for_the_lock_of_the_first(jobs_app):
    """The lock of a job held by one transaction: another waits for it
    (``waiting()`` called first, when given), then reads the row as the
    first one's COMMIT left it."""
    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    [job_id] = insert_pending(engine, state="queued")
    got, waited = {}, []
    with engine.connect() as first:
        assert store.lock(first, job_id) == ("queued", 0, None)
        first.execute(update(Job.__table__).values(state="succeeded", attempts=1))

        def second(name, waiting):
            with engine.connect() as connection:
                got[name] = store.lock(connection, job_id, waiting)
                connection.rollback()

        threads = [
            threading.Thread(target=second, args=("told", lambda: waited.append(1))),
            threading.Thread(target=second, args=("silent", None)),
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: lock_waiters(engine, job_id) == 2, message="both to wait")
        assert (got, waited) == ({}, [1])
        first.commit()
    for thread in threads:
        thread.join(10)
    assert got == {"told": ("succeeded", 1, None), "silent": ("succeeded", 1, None)}


def test_a_runs_lock_and_mark_go_to_the_cursor_as_sqlalchemy_runs_them(
    jobs_app, database_url, caplog, monkeypatch
):
    """A run's lock and mark go to a cursor by SQLAlchemy's short path (no
    execution context, no result): the engine's echo logs them, a driver's
    error comes as SQLAlchemy's (a missing table named as such), and a lost
    or closed connection is invalidated, so the pool never hands it out
    again.  Listeners, hidden parameters and a connection outside a
    transaction get them through ``exec_driver_sql``."""
    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    job_id, other_id, hidden_id = insert_pending(engine, count=3, state="queued")
    caplog.set_level(logging.INFO, "sqlalchemy.engine.Engine")
    taken = []

    def long_path(connection, statement, parameters=None, *args, **kwargs):
        if "pyramid_tasks_job" in statement:
            taken.append(statement.split()[0])
        return exec_driver_sql(connection, statement, parameters, *args, **kwargs)

    exec_driver_sql = sqlalchemy.engine.Connection.exec_driver_sql
    monkeypatch.setattr(sqlalchemy.engine.Connection, "exec_driver_sql", long_path)
    with engine.connect() as connection:  # its echo: read when it is made
        connection.begin()  # as the session's
        assert store.lock(connection, job_id) == ("queued", 0, None)
        assert store.succeed_in(connection, job_id) is True
        connection.commit()
    assert taken == []  # the short path
    logged = [r.getMessage() for r in caplog.records]
    assert [m.split()[0] for m in logged if "pyramid_tasks_job" in m] == [
        "SELECT",
        "UPDATE",
    ]
    assert logged[0] == "BEGIN (implicit)"
    assert "pg_try_advisory_xact_lock" in logged[1]
    assert logged[2] == f"[raw sql] {{'job_id': '{job_id}', 'hashtextextended_1': 0}}"
    assert store.get(job_id)["state"] == "succeeded"

    def another(**arguments):  # an engine on the same schema
        made = sqlalchemy.create_engine(database_url, **arguments)
        return made.execution_options(**engine.get_execution_options())

    # An engine with listeners (of its own: SQLAlchemy keeps an engine on
    # its long path once it had one): they get an execution context, as for
    # any statement (OpenTelemetry's keeps its span on it).
    contexts = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        contexts.append((statement.split()[0], context.isinsert))

    listening = another()
    sqlalchemy.event.listen(listening, "before_cursor_execute", seen)
    try:
        with listening.begin() as connection:
            assert store.lock(connection, other_id) == ("queued", 0, None)
            assert store.succeed_in(connection, other_id) is True
    finally:
        listening.dispose()
    assert contexts == [("SELECT", False), ("UPDATE", False)]
    assert taken == ["SELECT", "UPDATE"]

    # An engine that hides its parameters: SQLAlchemy 2.0's short path would
    # log them all the same.
    caplog.clear()
    hiding = another(hide_parameters=True)
    try:
        with hiding.begin() as connection:
            assert store.lock(connection, hidden_id) == ("queued", 0, None)
    finally:
        hiding.dispose()
    logged = [r.getMessage() for r in caplog.records]
    assert taken[2:] == ["SELECT"]
    assert not [m for m in logged if hidden_id in m]
    [at] = [i for i, m in enumerate(logged) if "pg_try_advisory_xact_lock" in m]
    hidden = "[raw sql] [SQL parameters hidden due to hide_parameters=True]"
    assert logged[at + 1] == hidden
    taken.clear()

    with engine.connect() as connection:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with engine.connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(sqlalchemy.exc.OperationalError) as lost:
            store.lock(connection, job_id)
        assert lost.value.connection_invalidated is True
        assert connection.invalidated is True
    with engine.connect() as connection:
        connection.begin()
        connection.connection.driver_connection.close()  # the cursor fails
        with pytest.raises(sqlalchemy.exc.OperationalError) as closed:
            store.lock(connection, job_id)
        assert closed.value.connection_invalidated is True
    with engine.connect() as connection:  # the pool's next one works
        connection.begin()
        assert store.lock(connection, job_id) == ("succeeded", 0, None)
    assert taken == []

    Job.__table__.drop(engine)
    with engine.connect() as connection:
        connection.begin()
        with pytest.raises(JobTableMissing, match="jobs init-db"):
            store.lock(connection, job_id)
        connection.rollback()
        connection.begin()
        with pytest.raises(sqlalchemy.exc.ProgrammingError, match=job_id[:8]):
            store.succeed_in(connection, job_id)
    assert taken == []


def test_many_rows_go_by_copy_as_the_insert_writes_them(jobs_app):
    """150 jobs on one commit go in by COPY, 2 on another by INSERT: the
    rows of the same calls are the same, defaults and JSON included (plain
    arguments copied, others through kombu's JSON)."""
    app, engine, queue, _client = jobs_app
    registry = app.pyramid_registry
    odd = {"when": datetime(2026, 1, 1, tzinfo=UTC), "amount": Decimal("1.50")}
    tm = transaction.TransactionManager(explicit=True)
    text = "x\t\\y\n"  # what COPY's text format escapes
    batches = []
    for count in (150, 2):
        with tm:
            batches.append(
                [
                    app.tasks["noop"]
                    .apply_async((n, text, odd, {"k": [n, None]}), tm=tm, priority=3)
                    .id
                    for n in range(count)
                ]
            )
        assert registry.pyramid_tasks_jobs.flush(10)
    by_id = {row["id"]: row for row in rows(engine)}
    assert len(by_id) == 152
    varying = {"id", "created_at", "published_at"}
    for copied, inserted in zip(batches[0][:2], batches[1], strict=True):
        copied, inserted = by_id[copied], by_id[inserted]
        assert {k: v for k, v in copied.items() if k not in varying} == {
            k: v for k, v in inserted.items() if k not in varying
        }
    row = by_id[batches[0][1]]
    assert (row["state"], row["queue"], row["priority"]) == ("queued", queue, 3)
    assert (row["attempts"], row["publish_attempts"], row["lost"]) == (0, 0, 0)
    assert row["args"][:2] == [1, text]
    assert row["args"][2]["amount"] == {"__type__": "decimal", "__value__": "1.50"}
    assert row["args"][3] == {"k": [1, None]}
    assert row["kwargs"] == {}


def test_a_run_quicker_than_the_marker_leaves_it_nothing_to_write(jobs_app):
    """A worker that ran a job before the marker thread marked it
    ``queued`` (deferred runs of a few milliseconds do) records the
    publish as its start; the marker's mark, coming after, then changes
    nothing, so the run's outcome stays the row's last write (its
    transaction's, for the transactional classes: seen in CI as another
    transaction id on the row)."""
    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    succeeded, started = insert_pending(engine, count=2)
    started_at = utcnow() - timedelta(seconds=1)
    with engine.begin() as connection:
        assert store.lock(connection, succeeded) == ("pending", 0, None)
        assert store.succeed_in(connection, succeeded, (0, started_at)) is True
    assert store.start_late(started, 0, started_at) == 1

    def xmin(job_id):
        with engine.connect() as connection:
            return connection.scalar(
                select(sqlalchemy.literal_column("xmin::text")).where(_c.id == job_id)
            )

    before = {job_id: xmin(job_id) for job_id in (succeeded, started)}
    assert store.mark_published([(succeeded, None), (started, None)]) == 0
    assert {job_id: xmin(job_id) for job_id in (succeeded, started)} == before
    for job_id, state in ((succeeded, "succeeded"), (started, "started")):
        row = store.get(job_id)
        assert (row["state"], row["published_at"]) == (state, started_at)


def test_the_publish_marks_join_their_ids_whatever_the_plan(jobs_app):
    """The marks' UPDATEs get the ids as one array, joined as the rows of
    ``unnest``: PostgreSQL's generic plan of a prepared statement (chosen
    after a few executions, in a process that lives) never checks each
    pending row against the whole array, which made 10,000 jobs take 0.7 to
    3 s to mark instead of 0.13.  Read from the generic plans themselves."""
    import json
    import re

    from psycopg import sql

    app, engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    ids = insert_pending(engine, count=3)
    given = {"ids": ids, "state": "queued", "now": utcnow()}
    plans = []
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        schemas = connection.get_execution_options().get("schema_translate_map")
        for number, statement in enumerate(store._publish_marks):
            compiled = statement.compile(
                dialect=connection.dialect,
                schema_translate_map=schemas,
                render_schema_translate=True,
            )
            names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", str(compiled))))
            text = re.sub(  # PREPARE's $1, $2...
                r"%\((\w+)\)s",
                lambda m, names=names: f"${names.index(m[1]) + 1}",
                str(compiled),
            )
            values = {**compiled.params, **given}
            arguments = sql.SQL(", ").join(sql.Literal(values[n]) for n in names)
            connection.exec_driver_sql(f"PREPARE mark_{number} AS {text}")
            explain = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(
                sql.Identifier(f"mark_{number}"), arguments
            )
            plan = connection.exec_driver_sql(explain.as_string(driver)).scalar()
            plans.append(json.dumps(plan))
    for plan in plans:
        assert '"Function Name": "unnest"' in plan, plan
        assert "ANY" not in plan, plan
