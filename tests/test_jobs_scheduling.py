"""Scheduling options of a job: ``title=``, ``unique_key=``, ``priority=``,
``countdown=``/``eta=`` against Redis's ``visibility_timeout``, and
``request.enqueue``.

Real PostgreSQL (a schema of the test's own) and SQLite files, real
``transaction`` managers, the shared Redis on a queue of the test's own; one
real worker (the title a message carries to the worker that makes its row).
Concurrent schedulers are threads, each with its own manager and session.
"""

import base64
import json
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
import transaction
from celery import Task, beat
from pyramid.config import Configurator
from pyramid.scripting import prepare
from sqlalchemy import event, func, select, text, update

from demo_app.models import Order
from pyramid_tasks import (
    PyramidTask,
    ScheduleOnCommitTask,
    TaskNotRegistered,
    task,
)
from pyramid_tasks.jobs import Job
from pyramid_tasks.options import TITLE_HEADER

from . import test_jobs_web as web
from .conftest import wait_for
from .test_jobs_web import Statements, writes
from .test_jobs_worker import Probe, web_app

durable = web.durable
queue = web.queue

_VISIBILITY = "celery.broker_transport_options.visibility_timeout"


def messages(redis_client, key):
    """The raw messages (kombu's Redis envelope) in list ``key``, oldest first."""
    return [json.loads(raw) for raw in reversed(redis_client.lrange(key, 0, -1))]


def body(message):
    return json.loads(base64.b64decode(message["body"]))


def rows(d, key=None):
    """``[(id, state, title)]`` of the job table (with ``unique_key`` ``key``)."""
    assert d.jobs.flush(10)
    query = select(Job.id, Job.state, Job.title).order_by(Job.created_at)
    if key is not None:
        query = query.where(Job.unique_key == key)
    with d.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


# -- title= ---------------------------------------------------------------


def test_a_title_is_the_rows_and_never_a_message_option(durable, redis_client, queue):
    """With ``tm=``, without, and through a signature: the row has the title;
    the message carries neither ``title`` nor ``unique_key`` as a property
    (Celery puts an option it does not know there); without ``tm=`` it
    carries the title in a header, for a worker that makes the row."""
    d = durable()
    with d.tm:
        on_commit = d.echo.apply_async((1,), tm=d.tm, title="Import 1").id
        signed = d.echo.s(2).set(title="Import 2").apply_async(tm=d.tm).id
    at_once = d.plain.apply_async((3,), title="Import 3", headers={"mine": 1}).id
    unique = d.plain.apply_async((4,), title="Import 4", unique_key="k4").id
    assert {job_id: title for job_id, _, title in rows(d)} == {
        on_commit: "Import 1",
        signed: "Import 2",
        at_once: "Import 3",
        unique: "Import 4",
    }
    sent = {m["headers"]["id"]: m for m in messages(redis_client, queue)}
    assert set(sent) == {on_commit, signed, at_once, unique}
    for message in sent.values():
        assert "title" not in message["properties"]
        assert "unique_key" not in message["properties"]
    assert sent[at_once]["headers"][TITLE_HEADER] == "Import 3"
    assert sent[at_once]["headers"]["mine"] == 1
    # The row's options are what the relay sends again: no header of ours.
    assert d.row(at_once)["options"] == {"headers": {"mine": 1}}
    assert d.row(unique)["unique_key"] == "k4"


def test_a_worker_that_makes_the_row_takes_the_title_from_the_header(
    start_worker, ini_vars, tmp_path, redis_client
):
    """On SQLite the sender writes no row for a task sent without ``tm=`` (its
    own transaction may hold the one write lock): the worker makes it, with
    the title the message carries."""
    settings = {
        "sqlalchemy.url": f"sqlite:///{tmp_path}/jobs.sqlite",
        "demo.schema": "",
        "probe.redis_url": ini_vars["redis_url"],
    }
    worker = start_worker(section="jobs_probe", settings=settings)
    probe = Probe(web_app(tmp_path, ini_vars, "web", settings), redis_client)
    key = probe.key()
    job_id = probe.task("plain").apply_async((key,), title="Nightly import").id
    row = probe.wait_state(job_id, "succeeded")
    name = "tests.jobs_probe_app.plain"
    assert (row["title"], row["name"]) == ("Nightly import", name), worker.log
    assert probe.effects(key) == 1


def test_in_eager_mode_the_run_makes_the_row_with_the_title(durable):
    d = durable(**{"celery.task_always_eager": "true"})
    job_id = d.plain.apply_async(("x",), title="Eager", countdown=7200).id
    assert rows(d) == [(job_id, "succeeded", "Eager")]


@pytest.mark.parametrize("option", ["title", "unique_key"])
def test_title_and_unique_key_need_the_job_table(redis_url, queue, option):
    config = Configurator(
        settings={"celery.broker_url": redis_url, "celery.task_default_queue": queue}
    )
    config.include("pyramid_tasks")
    config.add_task(web.echo, bind=True, base=ScheduleOnCommitTask, name="echo")
    config.commit()
    echo = config.registry.celery_app.tasks["echo"]
    message = (
        rf"^echo.apply_async\({option}=...\) needs the job table: include "
        r"pyramid_tasks.jobs .*, or leave out " + option
    )
    tm = transaction.TransactionManager(explicit=True)
    with tm, pytest.raises(TypeError, match=message):
        echo.apply_async((1,), tm=tm, **{option: "x"})
    with pytest.raises(TypeError, match=message):
        echo.apply_async((1,), **{option: "x"})
    config.registry.celery_app.close()


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("title", "", "''"),
        ("title", 7, "7"),
        ("unique_key", "k" * 256, "'kkkk"),
        ("unique_key", b"k", "b'k'"),
    ],
)
def test_a_bad_title_or_unique_key_is_refused_at_the_call(
    durable, redis_client, queue, option, value, shown
):
    d = durable()
    expected = rf"echo.apply_async\({option}={shown}.*\): expected a string of 1 to 255"
    with d.tm, pytest.raises(ValueError, match=expected):
        d.echo.apply_async((1,), tm=d.tm, **{option: value})
    with pytest.raises(ValueError, match=expected):
        d.echo.apply_async((1,), **{option: value})
    assert rows(d) == []
    assert messages(redis_client, queue) == []


# -- unique_key= with tm=: 8 concurrent transactions on PostgreSQL -----------


class Scheduler(threading.Thread):
    """One scheduler: its own transaction manager and session, one
    ``apply_async(tm=..., unique_key=...)``, then commit or abort as told."""

    def __init__(self, d, key, commit=True):
        super().__init__(daemon=True)
        self.d, self.key, self.commit = d, key, commit
        self.tm = transaction.TransactionManager(explicit=True)
        self.pid = None
        self.job_id = None
        self.scheduled = threading.Event()
        self.go = threading.Event()

    def run(self):
        self.tm.begin()
        connection = self.d.session(self.tm).connection()
        if self.d.engine.dialect.name == "postgresql":
            self.pid = connection.connection.dbapi_connection.info.backend_pid
        self.job_id = self.d.echo.apply_async(
            (self.name,), tm=self.tm, unique_key=self.key
        ).id
        self.scheduled.set()
        assert self.go.wait(30)
        if self.commit:
            self.tm.commit()
        else:
            self.tm.abort()

    def finish(self):
        """Let it commit (or abort), and wait for it."""
        self.go.set()
        self.join(30)
        assert not self.is_alive()
        assert self.job_id is not None


def waiting_on_locks(d, schedulers):
    """How many of ``schedulers`` wait for a lock (their INSERT, for another
    transaction holding the key)."""
    with d.engine.connect() as connection:
        return connection.scalar(
            text(
                "SELECT count(DISTINCT pid) FROM pg_locks"
                " WHERE NOT granted AND pid = ANY(:pids)"
            ),
            {"pids": [s.pid for s in schedulers]},
        )


def start_contenders(d, key, first_commits):
    """The first scheduler writes its row and holds it; seven more start and
    each waits in its INSERT, on the unique index."""
    first = Scheduler(d, key, commit=first_commits)
    first.start()
    assert first.scheduled.wait(30)
    others = [Scheduler(d, key) for _ in range(7)]
    for scheduler in others:
        scheduler.start()
    wait_for(lambda: all(s.pid for s in others), message="7 sessions")
    wait_for(
        lambda: waiting_on_locks(d, others) == 7,
        message="7 schedulers waiting on the unique index",
    )
    assert not any(s.scheduled.is_set() for s in others)
    return first, others


def test_eight_concurrent_schedulers_make_one_job(durable, redis_client, queue):
    """The first commits: the seven others, which waited for it, get its id;
    one row, one message."""
    d = durable()
    key = f"report:{uuid.uuid4().hex}"
    first, others = start_contenders(d, key, first_commits=True)
    first.finish()
    for scheduler in others:
        scheduler.finish()
    ids = {s.job_id for s in others}
    print(f"8 schedulers, first commits: ids {len(ids | {first.job_id})}")
    assert ids == {first.job_id}
    assert rows(d) == [(first.job_id, "queued", None)]
    assert [m["headers"]["id"] for m in messages(redis_client, queue)] == [first.job_id]


def test_when_the_first_rolls_back_one_of_the_others_wins(durable, redis_client, queue):
    """The first aborts: one of the seven writes its row, the six others wait
    for it and get its id once it commits; one row, one message."""
    d = durable()
    key = f"report:{uuid.uuid4().hex}"
    first, others = start_contenders(d, key, first_commits=False)
    first.finish()
    wait_for(
        lambda: sum(s.scheduled.is_set() for s in others) == 1,
        message="one winner",
    )
    [winner] = [s for s in others if s.scheduled.is_set()]
    losers = [s for s in others if s is not winner]
    wait_for(
        lambda: waiting_on_locks(d, losers) == 6,
        message="six waiting for the winner",
    )
    winner.finish()
    for scheduler in losers:
        scheduler.finish()
    print(f"8 schedulers, first aborts: winner {others.index(winner) + 1} of 7")
    assert winner.job_id != first.job_id
    assert {s.job_id for s in losers} == {winner.job_id}
    assert rows(d) == [(winner.job_id, "queued", None)]
    assert [m["headers"]["id"] for m in messages(redis_client, queue)] == [
        winner.job_id
    ]


def test_on_sqlite_the_write_lock_serializes_the_schedulers(durable, tmp_path):
    """SQLite has one writer: the INSERT of each scheduler waits for the
    write lock (up to its busy timeout), then finds the committed job; with
    the first aborted, the next one to get the lock wins."""
    d = durable(
        **{"sqlalchemy.url": f"sqlite:///{tmp_path}/jobs.sqlite", "demo.schema": ""}
    )
    for first_commits in (True, False):
        key = f"report:{first_commits}"
        first = Scheduler(d, key, commit=first_commits)
        first.start()
        assert first.scheduled.wait(30)
        others = [Scheduler(d, key) for _ in range(3)]
        for scheduler in others:
            scheduler.go.set()  # commit as soon as scheduled
            scheduler.start()
        first.finish()
        for scheduler in others:
            scheduler.finish()
        ids = {s.job_id for s in others}
        [(winner, state, _)] = rows(d, key)
        if first_commits:
            assert ids == {first.job_id} == {winner}
        else:
            assert ids == {winner} != {first.job_id}
        assert state == "queued"


# -- unique_key= in one transaction, and after the job ends -------------------


def test_a_key_is_taken_until_its_job_finishes(durable, redis_client, queue):
    """Twice in one transaction: one job.  A savepoint rolled back frees the
    key; an aborted transaction leaves nothing; a finished job frees it too.
    The row goes through the transaction's session, with the business data,
    and the commit's INSERT skips it."""
    d = durable()
    seen = Statements(d.engine)
    key = "nightly"
    with d.tm:
        session = d.session()
        session.add(Order(email="ann@example.com"))
        one = d.echo.apply_async((1,), tm=d.tm, unique_key=key, title="Nightly").id
        assert d.echo.apply_async((2,), tm=d.tm, unique_key=key).id == one
        savepoint = d.tm.savepoint()
        other = d.echo.apply_async((3,), tm=d.tm, unique_key="other").id
        savepoint.rollback()
        again = d.echo.apply_async((4,), tm=d.tm, unique_key="other").id
        plain = d.echo.apply_async((5,), tm=d.tm).id
    # Four at the calls (one of them found the key taken), one at the commit
    # (plain's); all in the COMMIT of the order.
    [pid] = seen.commits
    assert [p for p, _ in writes(seen.sql, "INSERT")] == [pid] * 5
    assert [p for p, _ in writes(seen.sql, "INSERT", "orders")] == [pid]
    assert again != other
    assert {job_id for job_id, _, _ in rows(d)} == {one, again, plain}
    assert rows(d, key) == [(one, "queued", "Nightly")]
    assert len(messages(redis_client, queue)) == 3

    d.tm.begin()
    d.echo.apply_async((6,), tm=d.tm, unique_key="aborted")
    d.tm.abort()
    assert rows(d, "aborted") == []

    with d.engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == one).values(state="succeeded"))
    with d.tm:
        next_one = d.echo.apply_async((7,), tm=d.tm, unique_key=key).id
    assert next_one != one
    assert rows(d, key) == [(one, "succeeded", "Nightly"), (next_one, "queued", None)]


def test_a_beat_entry_of_the_ini_waits_for_its_last_job(durable, redis_client, queue):
    """``tasks.beat.<name>.options`` takes the options: the entry fires
    twice while its job waits, one job, with its title."""
    d = durable(
        **{
            "tasks.beat.nightly.task": "echo",
            "tasks.beat.nightly.schedule": "0 3 * * *",
            "tasks.beat.nightly.args": "[3]",
            "tasks.beat.nightly.options": '{"title": "Nightly", "unique_key": "n"}',
        }
    )
    entry = beat.ScheduleEntry(
        name="nightly", app=d.app, **d.app.conf.beat_schedule["nightly"]
    )
    scheduler = beat.Scheduler(d.app, schedule={}, lazy=True)
    try:
        ids = {scheduler.apply_async(entry, advance=False).id for _ in range(2)}
    finally:
        scheduler.close()
    assert len(ids) == 1
    assert rows(d) == [(*ids, "queued", "Nightly")]
    assert len(messages(redis_client, queue)) == 1


def test_a_job_that_finishes_between_insert_and_lookup_frees_the_key(durable):
    """The INSERT found the key held; before the lookup the holder finished
    (another connection commits it, from the lookup's own event): the INSERT
    is tried again and goes in."""
    d = durable()
    with d.tm:
        holder = d.echo.apply_async((1,), tm=d.tm, unique_key="k").id
    lookups = []

    def finish_the_holder(conn, cursor, statement, parameters, context, many):
        if statement.lstrip().startswith("SELECT") and "unique_key" in statement:
            lookups.append(statement)
            with d.engine.begin() as other:
                other.execute(
                    update(Job).where(Job.id == holder).values(state="failed")
                )

    event.listen(d.engine, "before_cursor_execute", finish_the_holder)
    try:
        with d.tm:
            d.session().connection()
            second = d.echo.apply_async((2,), tm=d.tm, unique_key="k").id
    finally:
        event.remove(d.engine, "before_cursor_execute", finish_the_holder)
    assert len(lookups) == 1
    assert second != holder
    assert rows(d, "k") == [(holder, "failed", None), (second, "queued", None)]


def test_without_a_session_the_row_goes_through_one_joined_to_the_transaction(
    durable, redis_client, queue
):
    """No session in the transaction (a script's bare manager): a session of
    its own joins it, so the row commits or aborts with the transaction."""
    d = durable()
    d.tm.begin()
    d.echo.apply_async((1,), tm=d.tm, unique_key="bare")
    d.tm.abort()
    with d.tm:
        kept = d.echo.apply_async((2,), tm=d.tm, unique_key="bare").id
        assert d.echo.apply_async((3,), tm=d.tm, unique_key="bare").id == kept
    assert rows(d) == [(kept, "queued", None)]
    assert len(messages(redis_client, queue)) == 1
    assert d.engine.pool.checkedout() == 0


# -- unique_key= without tm= ------------------------------------------------


def test_without_tm_the_row_commits_first_then_the_task_is_sent(
    durable, redis_client, queue
):
    d = durable()
    first = d.plain.apply_async((1,), unique_key="once", countdown=30)
    second = d.plain.apply_async((2,), unique_key="once")
    assert second.id == first.id
    assert rows(d) == [(first.id, "scheduled", None)]
    assert [body(m)[0] for m in messages(redis_client, queue)] == [[1]]
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3"):
        d.plain.apply_async((1, 2), unique_key="typing")
    assert rows(d, "typing") == []


def test_without_tm_typing_false_skips_the_argument_check_as_celery_does(
    durable, redis_client, queue
):
    def setup(config):
        config.add_task(
            web.plain, bind=True, base=PyramidTask, name="untyped", typing=False
        )

    d = durable(setup=setup)
    job_id = d.app.tasks["untyped"].apply_async((1, 2), unique_key="untyped").id
    assert rows(d) == [(job_id, "queued", None)]
    assert [body(m)[0] for m in messages(redis_client, queue)] == [[1, 2]]


def test_without_tm_in_eager_mode_it_runs_at_the_call(durable):
    d = durable(**{"celery.task_always_eager": "true"})
    result = d.plain.apply_async(("x",), unique_key="eager")
    assert result.get() == "x"
    assert rows(d, "eager") == [(result.id, "succeeded", None)]
    assert d.plain.apply_async(("y",), unique_key="eager").id != result.id


def test_without_tm_a_refused_send_waits_for_the_relay(durable, private_redis, caplog):
    """The broker is down after the row committed: a WARNING, the row stays
    pending for the relay, the caller gets the job's handle."""
    d = durable(broker_url=private_redis)
    stopped = redis.Redis.from_url(private_redis)
    stopped.shutdown(nosave=True)
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        job_id = d.plain.apply_async((1,), unique_key="down").id
    assert rows(d) == [(job_id, "pending", None)]
    assert f"Job plain[{job_id}] is committed; the broker did not take it" in (
        caplog.text
    )


# -- priority=, countdown=/eta= ----------------------------------------------


# Celery 5 honours a task's own priority, and warns it will not in 6.0.
@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_priority_is_recorded_and_sent(durable, redis_client, queue):
    """``priority=`` and a task's own priority: in the row and the message
    (kombu's Redis transport puts it on the list of its priority step)."""

    def setup(config):
        config.add_task(
            web.echo, bind=True, base=ScheduleOnCommitTask, name="urgent", priority=5
        )

    d = durable(setup=setup)
    urgent_task = d.app.tasks["urgent"]
    try:
        with d.tm:
            given = d.echo.apply_async((1,), tm=d.tm, priority=7).id
            own = urgent_task.apply_async((2,), tm=d.tm).id
        at_once = d.plain.apply_async((3,), priority=7).id
        assert {i: d.row(i)["priority"] for i in (given, own, at_once)} == {
            given: 7,
            own: 5,
            at_once: 7,
        }
        sent = {}
        for key in redis_client.keys(f"{queue}*"):
            for message in messages(redis_client, key):
                sent[message["headers"]["id"]] = (
                    key.decode(),
                    message["properties"]["priority"],
                )
        separator = "\x06\x16"
        assert sent == {
            given: (f"{queue}{separator}6", 7),
            own: (f"{queue}{separator}3", 5),
            at_once: (f"{queue}{separator}6", 7),
        }
    finally:
        redis_client.delete(*redis_client.keys(f"{queue}*") or [queue])


def test_countdown_and_eta_are_scheduled_until_a_worker_starts_them(
    durable, redis_client, queue
):
    d = durable()
    eta = datetime.now(UTC) + timedelta(minutes=5)
    with d.tm:
        on_commit = d.echo.apply_async((1,), tm=d.tm, eta=eta).id
    at_once = d.plain.apply_async((2,), countdown=300).id
    assert {job_id: state for job_id, state, _ in rows(d)} == {
        on_commit: "scheduled",
        at_once: "scheduled",
    }
    assert len(messages(redis_client, queue)) == 2


def _in_two_hours():
    return datetime.now(UTC) + timedelta(hours=2)


@pytest.mark.parametrize(
    ("settings", "options", "timeout"),
    [
        ({}, lambda: {"countdown": 3601}, 3600),
        ({}, lambda: {"countdown": 3599}, None),
        ({}, lambda: {"eta": _in_two_hours()}, 3600),
        ({}, lambda: {"eta": _in_two_hours().replace(tzinfo=None).isoformat()}, 3600),
        ({_VISIBILITY: "86400"}, lambda: {"countdown": 7200}, None),
        ({_VISIBILITY: "600"}, lambda: {"countdown": 601}, 600),
        ({"celery.task_always_eager": "true"}, lambda: {"countdown": 7200}, None),
    ],
    ids=["countdown", "below", "eta", "naive-iso", "raised", "lowered", "eager"],
)
def test_an_eta_beyond_the_visibility_timeout_is_warned_at_the_call(
    durable, caplog, settings, options, timeout
):
    """With ``tm=`` and without: one WARNING each."""
    d = durable(**settings)
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        d.tm.begin()
        d.echo.apply_async((1,), tm=d.tm, **options())
        d.tm.abort()
        d.plain.apply_async((1,), **options())
    lines = [r.getMessage() for r in caplog.records if "visibility" in r.getMessage()]
    if timeout is None:
        assert lines == []
        return
    assert [line.split(" is due")[0] for line in lines] == ["Task echo", "Task plain"]
    for line in lines:
        assert (
            f"beyond the Redis broker's visibility_timeout ({timeout} s): Redis "
            f"delivers it again every {timeout} s until it runs, so it runs "
            "early and more than once. Raise "
            "celery.broker_transport_options.visibility_timeout above"
        ) in line


def test_no_warning_on_other_transports(durable, caplog):
    """RabbitMQ keeps an unacknowledged message until its consumer goes."""
    d = durable(broker_url="amqp://guest:guest@127.0.0.1:1//")
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        d.tm.begin()
        d.echo.apply_async((1,), tm=d.tm, countdown=86400)
        d.tm.abort()
    assert "visibility_timeout" not in caplog.text


# -- request.enqueue -----------------------------------------------------------


ran = []


@task(bind=True, base=PyramidTask, name="tests.scheduling.handled")
def handled(self, value):
    ran.append((self.request.id, value))


def never_registered(value):
    return value


def enqueue_app(durable, **settings):
    def setup(config):
        config.add_task(handled)

    return durable(setup=setup, **settings)


@pytest.fixture
def request_of():
    """``request_of(d)``: a request of app ``d`` (threadlocals pushed), its
    ``tm`` begun; closed at teardown."""
    closers = []

    def make(d):
        env = prepare(registry=d.registry)
        closers.append(env["closer"])
        env["request"].tm.begin()
        return env["request"]

    yield make
    for closer in closers:
        closer()


def test_enqueue_sends_on_commit_whatever_the_task_is_given_as(
    durable, request_of, redis_client, queue
):
    """A @task handle, a function given to add_task, a Celery task, a name:
    each sent when request.tm commits (a PyramidTask too, which sends at once
    with apply_async), with its title and queue."""
    d = enqueue_app(durable)
    request = request_of(d)
    ids = [
        request.enqueue(handled, [1], title="By handle").id,
        request.enqueue(web.echo, args=[2], queue=queue).id,
        request.enqueue(d.echo, kwargs={"value": 3}, countdown=1).id,
        request.enqueue("echo", (4,)).id,
    ]
    assert messages(redis_client, queue) == []
    request.tm.commit()
    assert [m["headers"]["id"] for m in messages(redis_client, queue)] == ids
    assert [body(m)[:2] for m in messages(redis_client, queue)] == [
        [[1], {}],
        [[2], {}],
        [[], {"value": 3}],
        [[4], {}],
    ]
    assert [title for _, _, title in rows(d)] == ["By handle", None, None, None]


def test_enqueue_on_abort_sends_nothing(durable, request_of, redis_client, queue):
    d = enqueue_app(durable)
    request = request_of(d)
    request.enqueue(handled, [1])
    request.tm.abort()
    assert messages(redis_client, queue) == []
    assert rows(d) == []


def test_enqueue_with_a_key_writes_through_the_requests_session(
    durable, request_of, redis_client, queue
):
    """The view has not touched ``request.dbsession`` yet: the job's row joins
    it, and commits with the order the view writes next, in one COMMIT."""
    d = enqueue_app(durable)
    seen = Statements(d.engine)
    request = request_of(d)
    job_id = request.enqueue("echo", [1], unique_key="view").id
    assert request.enqueue(handled, [2], unique_key="view").id == job_id
    request.dbsession.add(Order(email="ann@example.com"))
    request.tm.commit()
    [pid] = seen.commits
    # Two at the calls (the second found the key taken), none at the commit.
    assert [p for p, _ in writes(seen.sql, "INSERT")] == [pid, pid]
    assert [p for p, _ in writes(seen.sql, "INSERT", "orders")] == [pid]
    assert rows(d) == [(job_id, "queued", None)]


def test_a_request_without_that_session_gets_one_joined_for_the_row(
    durable, request_of
):
    """``tasks.jobs.request_session`` names nothing on the request: the row
    goes through a session of its own, joined to ``request.tm``."""
    d = enqueue_app(durable, **{"tasks.jobs.request_session": "nothing"})
    seen = Statements(d.engine)
    request = request_of(d)
    job_id = request.enqueue("echo", [1], unique_key="own").id
    request.dbsession.add(Order(email="ann@example.com"))
    request.tm.commit()
    [(job_pid, _)] = writes(seen.sql, "INSERT")
    [(order_pid, _)] = writes(seen.sql, "INSERT", "orders")
    assert job_pid != order_pid
    assert sorted(seen.commits) == sorted([job_pid, order_pid])
    assert rows(d) == [(job_id, "queued", None)]
    assert d.emails() == ["ann@example.com"]


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        (
            42,
            TypeError,
            r"^request.enqueue\(\) got 42 \(int\); expected a task \(a @task "
            r"function, config.add_task's function or a Celery task\) or the "
            r"name of a registered task\.$",
        ),
        (
            never_registered,
            TypeError,
            r"^request.enqueue\(<function never_registered at .*>\): that "
            r"function is not a registered task; declare it with @task",
        ),
        (
            "myapp.nope",
            TaskNotRegistered,
            r"^request.enqueue\('myapp.nope'\): no task of that name is registered",
        ),
    ],
    ids=["int", "function", "name"],
)
def test_enqueue_names_what_it_cannot_send(durable, request_of, given, error, message):
    d = enqueue_app(durable)
    request = request_of(d)
    with pytest.raises(error, match=message):
        request.enqueue(given)


def test_enqueue_names_bad_args_and_kwargs(durable, request_of):
    d = enqueue_app(durable)
    request = request_of(d)
    with pytest.raises(TypeError, match=r"^request.enqueue\('echo', args=5\): "):
        request.enqueue("echo", 5)
    with pytest.raises(
        TypeError, match=r"^request.enqueue\('echo', kwargs=\[1\]\): expected a dict"
    ):
        request.enqueue("echo", kwargs=[1])


def test_enqueue_title_without_the_job_table_says_so():
    """An app without pyramid_tasks.jobs (eager here: no broker)."""
    config = Configurator(settings={"celery.task_always_eager": "true"})
    config.include("pyramid_tm")
    config.include("pyramid_tasks")
    config.add_task(handled)
    config.commit()
    env = prepare(registry=config.registry)
    try:
        request = env["request"]
        with request.tm:
            with pytest.raises(TypeError, match=r"needs the job table"):
                request.enqueue(handled, [1], title="Nightly")
            result = request.enqueue(handled, [1])
        assert ran == [(result.id, 1)]  # after the commit, eagerly
    finally:
        env["closer"]()
        config.registry.celery_app.close()


def test_enqueue_without_request_tm_says_so(durable):
    d = enqueue_app(durable)
    env = prepare(registry=d.registry)
    try:
        request = env["request"]
        request.tm = None
        with pytest.raises(TypeError, match=r"request.tm, and this request has none"):
            request.enqueue("echo", [1])
    finally:
        env["closer"]()


def test_a_celery_task_of_another_class_is_found_by_name(durable, request_of):
    """A plain Celery task registered on the app's Celery app."""
    d = enqueue_app(durable)
    plain_celery = d.app.task(name="celery_only", shared=False, base=Task)(
        never_registered
    )
    request = request_of(d)
    job_id = request.enqueue(plain_celery, [1]).id
    request.tm.commit()
    assert rows(d) == [(job_id, "queued", None)]
    assert d.row(job_id)["name"] == "celery_only"
    assert plain_celery(5) == 5  # the function's task


def test_a_commit_whose_jobs_were_written_at_their_calls_inserts_no_more(
    durable,
):
    """The batch INSERT of a commit whose every job was written at its call
    runs no INSERT."""
    d = durable()
    seen = Statements(d.engine)
    with d.tm:
        d.echo.apply_async((1,), tm=d.tm, unique_key="a")
        mark = seen.mark()
    assert writes(seen.since(mark)[0], "INSERT") == []
    with d.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Job)) == 1
