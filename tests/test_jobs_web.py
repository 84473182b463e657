"""Durable mode, web side: job rows commit with the business data.

Real PostgreSQL (a schema of the test's own, the demo's cookiecutter-style
session), real ``transaction`` managers, a real Redis broker (the shared one
on a queue of the test's own, or a private ``redis-server`` that the test
stops or freezes).  SQL is counted with SQLAlchemy's cursor events, and each
statement is tied to its PostgreSQL backend (``pg_backend_pid``, read from the
psycopg connection without a query).
"""

import logging
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import kombu
import pytest
import redis
import sqlalchemy
import transaction
import webtest
from celery.beat import ScheduleEntry, Scheduler
from pyramid.config import Configurator
from pyramid.response import Response
from pyramid.threadlocal import get_current_request
from sqlalchemy import event, select, text
from transaction.interfaces import DoomedTransaction

from demo_app.models import Order
from pyramid_tasks import PyramidTask, ScheduleOnCommitTask, TransactionalTask
from pyramid_tasks.jobs import Job, JobCreated, metadata
from pyramid_tasks.jobs.relay import Relay
from pyramid_tasks.jobs.store import JobTableMissing
from pyramid_tasks.sqlalchemy import get_tm_session, register_factory

from .conftest import NullDataManager, free_port, wait_for
from .test_publish_faults import frozen
from .test_schedule_on_commit import FailingVote, published

# -- the app ------------------------------------------------------------------


def echo(self, value):
    """Never runs here (the test reads what reached the broker), except in
    eager mode."""
    return value


def plain(self, value):
    return value


class Durable:
    """An app in durable mode on this test's schema and queue."""

    def __init__(self, config, queue):
        self.config = config
        self.registry = config.registry
        self.app = config.registry.celery_app
        self.jobs = config.registry.pyramid_tasks_jobs
        self.engine = self.jobs.store.engine
        self.queue = queue
        self.tm = transaction.TransactionManager(explicit=True)
        self.echo = self.app.tasks["echo"]
        self.plain = self.app.tasks["plain"]

    def session(self, tm=None):
        """A cookiecutter session joined to ``tm`` (the app's own by default)."""
        return get_tm_session(self.registry["dbsession_factory"], tm or self.tm)

    def states(self):
        """``{job id: state}`` as committed, once the rows published so far
        are marked (the marker thread's UPDATE)."""
        assert self.jobs.flush(10)
        with self.engine.connect() as connection:
            return dict(connection.execute(select(Job.id, Job.state)).all())

    def row(self, job_id):
        assert self.jobs.flush(10)
        return self.jobs.store.get(job_id)

    def emails(self):
        with self.engine.connect() as connection:
            query = select(Order.email).order_by(Order.id)
            return list(connection.execute(query).scalars())


@pytest.fixture
def queue():
    return f"pyramid_tasks_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def durable(database_url, pg_schema, redis_url, redis_client, queue):
    """``make(broker_url=..., setup=None, **settings)``: a committed durable
    app with the demo models and the tasks ``echo`` (ScheduleOnCommitTask)
    and ``plain`` (PyramidTask); ``setup(config)`` adds views, subscribers."""
    made = []

    def make(broker_url=redis_url, setup=None, **settings):
        config = Configurator(
            settings={
                "sqlalchemy.url": database_url,
                "demo.schema": pg_schema,
                "demo.create_tables": "true",
                "celery.broker_url": broker_url,
                "celery.task_default_queue": queue,
                **settings,
            }
        )
        config.include("demo_app.models")
        config.include("pyramid_tasks")
        config.include("pyramid_tasks.jobs")
        config.add_task(echo, bind=True, base=ScheduleOnCommitTask, name="echo")
        config.add_task(plain, bind=True, base=PyramidTask, name="plain")
        if setup is not None:
            setup(config)
        config.commit()
        app = Durable(config, queue)
        metadata.create_all(app.engine)  # what `jobs init-db` does
        made.append(app)
        return app

    yield make
    redis_client.delete(queue)
    for app in made:
        app.app.close()
        app.engine.dispose()


class Statements:
    """What ran on ``engine``'s connections: ``(backend pid, SQL)`` of each
    statement, the backend pid of each COMMIT, and pool checkouts."""

    def __init__(self, engine):
        self.sql = []
        self.commits = []
        self.checkouts = 0
        event.listen(engine, "before_cursor_execute", self._execute)
        event.listen(engine, "commit", self._commit)
        event.listen(engine.pool, "checkout", self._checkout)

    def _execute(self, conn, cursor, statement, parameters, context, executemany):
        self.sql.append((cursor.connection.info.backend_pid, statement))

    def _commit(self, conn):
        self.commits.append(conn.connection.dbapi_connection.info.backend_pid)

    def _checkout(self, dbapi_connection, record, proxy):
        self.checkouts += 1

    def mark(self):
        return len(self.sql), len(self.commits), self.checkouts

    def since(self, mark):
        """``(statements, commits, checkouts)`` since ``mark``."""
        sql, commits, checkouts = mark
        return self.sql[sql:], self.commits[commits:], self.checkouts - checkouts


def writes(statements, verb, table="pyramid_tasks_job"):
    """The statements among ``statements`` that ``verb`` (INSERT, UPDATE) ``table``."""
    return [
        (pid, sql)
        for pid, sql in statements
        if sql.lstrip().upper().startswith(verb)
        # by name, or quoted as the job INSERT's text names it
        and (f"{table} " in f"{sql} " or f'"{table}"' in sql)
    ]


def before_publish(d, seen):
    """An after-commit hook, added before the first task: it runs before the
    publish's.  Records what ran since ``found["mark"]`` (set it before the
    commit) and the committed states."""
    found = {}

    def hook(committed):
        found["commit"] = seen.since(found["mark"])
        found["states"] = d.states()

    d.tm.get().addAfterCommitHook(hook)
    return found


# -- 1. the rows commit with the business data --------------------------------


def test_fifty_jobs_are_one_insert_in_the_business_transaction(
    durable, redis_client, queue
):
    """50 tasks and an order in one transaction: the commit runs one INSERT
    of the job table, on the connection of the order's INSERT, committed by
    the same COMMIT, one pool checkout; the rows are ``pending`` until the
    publish, then ``queued`` by one UPDATE."""
    d = durable()
    seen = Statements(d.engine)
    d.tm.begin()
    found = before_publish(d, seen)
    d.session().add(Order(email="ann@example.com"))
    ids = [d.echo.apply_async((n,), tm=d.tm).id for n in range(50)]
    assert d.states() == {}  # nothing is written before the commit
    found["mark"] = after = seen.mark()
    d.tm.commit()

    statements, commits, checkouts = found["commit"]
    job_inserts = writes(statements, "INSERT")
    order_inserts = writes(statements, "INSERT", "orders")
    pids = {pid for pid, _ in statements}
    print(
        f"commit of 50 jobs: statements {len(statements)}, job INSERTs "
        f"{len(job_inserts)}, order INSERTs {len(order_inserts)}, COMMITs "
        f"{len(commits)}, backends {len(pids | set(commits))}, checkouts {checkouts}"
    )
    assert len(job_inserts) == 1
    assert len(order_inserts) == 1
    assert commits == [job_inserts[0][0]]  # one COMMIT, on the same backend
    assert pids == {job_inserts[0][0]}
    assert checkouts == 1
    assert found["states"] == dict.fromkeys(ids, "pending")

    # After the commit: published, then one UPDATE marks them queued.
    assert d.jobs.flush(10)
    updates = writes(seen.since(after)[0], "UPDATE")
    print(f"after the commit: job UPDATEs {len(updates)}")
    assert len(updates) == 1
    assert d.states() == dict.fromkeys(ids, "queued")
    assert [i for _, i, _ in published(redis_client, queue)] == ids
    assert d.emails() == ["ann@example.com"]
    row = d.row(ids[7])
    assert (row["name"], row["args"], row["kwargs"]) == ("echo", [7], {})
    assert (row["queue"], row["attempts"], row["parent_id"]) == (queue, 0, None)
    assert row["published_at"] >= row["created_at"]


def test_eta_and_countdown_jobs_are_scheduled(durable, redis_client, queue):
    """A countdown and an eta ahead: ``scheduled`` with their eta, the other
    ``queued``; one UPDATE per state."""
    d = durable()
    seen = Statements(d.engine)
    eta = datetime.now(UTC) + timedelta(hours=1)
    started = datetime.now(UTC)
    with d.tm:
        now_id = d.echo.apply_async((1,), tm=d.tm).id
        countdown_id = d.echo.apply_async((2,), tm=d.tm, countdown=60).id
        eta_id = d.echo.apply_async((3,), tm=d.tm, eta=eta).id
        iso_id = d.echo.apply_async((4,), tm=d.tm, eta=eta.isoformat()).id
        mark = seen.mark()
    assert d.jobs.flush(10)
    assert len(writes(seen.since(mark)[0], "UPDATE")) == 2
    assert d.states() == {
        now_id: "queued",
        countdown_id: "scheduled",
        eta_id: "scheduled",
        iso_id: "scheduled",
    }
    assert d.row(now_id)["eta"] is None
    assert d.row(eta_id)["eta"] == d.row(iso_id)["eta"] == eta
    countdown_eta = d.row(countdown_id)["eta"]
    assert started + timedelta(seconds=60) <= countdown_eta
    assert countdown_eta < datetime.now(UTC) + timedelta(seconds=60)
    assert len(published(redis_client, queue)) == 4


def test_a_task_routed_to_its_own_queue_records_that_queue(durable, redis_client):
    d = durable()
    other = f"{d.queue}_other"
    try:
        with d.tm:
            named = d.echo.apply_async((1,), tm=d.tm, queue=other).id
        assert d.row(named)["queue"] == other
        assert [i for _, i, _ in published(redis_client, other)] == [named]
    finally:
        redis_client.delete(other)


# -- 2. what does not commit leaves no row -----------------------------------


@pytest.fixture
def deferred_unique(durable, pg_schema):
    """An app whose schema has a table with a deferred unique constraint: a
    duplicate fails at the COMMIT itself, after the job rows were written."""
    d = durable()
    with d.engine.begin() as connection:
        connection.execute(
            text(
                f'CREATE TABLE "{pg_schema}".ticket '
                "(code int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    return d


def _abort(d, work):
    d.tm.begin()
    work()
    d.tm.abort()


def _exception(d, work):
    with pytest.raises(ValueError, match="the view failed"), d.tm:
        work()
        raise ValueError("the view failed")


def _doom(d, work):
    d.tm.begin()
    work()
    d.tm.doom()
    with pytest.raises(DoomedTransaction):
        d.tm.commit()
    d.tm.abort()  # what pyramid_tm does with a doomed transaction


def _veto(d, work):
    d.tm.begin()
    work()
    d.tm.get().join(FailingVote())
    with pytest.raises(RuntimeError, match="vote failed"):
        d.tm.commit()
    d.tm.abort()


def _flush_fails(d, work):
    d.tm.begin()
    work().add(Order(id=1, email="duplicate@example.com"))
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="pk_orders"):
        d.tm.commit()
    d.tm.abort()


def _commit_fails(d, work):
    d.tm.begin()
    session = work()
    ticket = text(
        f'INSERT INTO "{d.registry.settings["demo.schema"]}".ticket VALUES (7)'
    )
    session.execute(ticket)
    session.execute(ticket)  # deferred: the COMMIT fails, not this
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="ticket_code_key"):
        d.tm.commit()
    d.tm.abort()


# How many job INSERTs each way runs: the rows are written at the commit,
# before the votes and the COMMIT.
_ENDS = {
    _abort: 0,
    _exception: 0,
    _doom: 0,
    _veto: 1,
    _flush_fails: 0,
    _commit_fails: 1,
}


@pytest.mark.parametrize(
    "end",
    list(_ENDS),
    ids=["abort", "exception", "doom", "veto", "flush-fails", "commit-fails"],
)
def test_a_transaction_that_does_not_commit_leaves_no_job(
    deferred_unique, redis_client, queue, end
):
    """An order exists (id 1); a transaction adds one and schedules 3 tasks,
    then does not commit: no job row, no new order, no message, and the
    engine's connections are all back in the pool."""
    d = deferred_unique
    with d.tm:
        d.session().add(Order(id=1, email="first@example.com"))
    seen = Statements(d.engine)
    ids = []

    def work():  # the transaction's one session, as request.dbsession is
        session = d.session()
        session.add(Order(id=2, email="second@example.com"))
        ids.extend(d.echo.apply_async((n,), tm=d.tm).id for n in range(3))
        return session

    end(d, work)
    job_inserts = writes(seen.sql, "INSERT")
    print(
        f"{end.__name__}: scheduled {len(ids)}, job INSERTs run "
        f"{len(job_inserts)}, rows {len(d.states())}, messages "
        f"{len(published(redis_client, queue))}"
    )
    assert len(ids) == 3
    assert len(job_inserts) == _ENDS[end]
    assert d.states() == {}
    assert d.emails() == ["first@example.com"]
    assert published(redis_client, queue) == []
    assert d.engine.pool.checkedout() == 0
    # The manager is usable again, and the next commit records its job.
    with d.tm:
        again = d.echo.apply_async((9,), tm=d.tm).id
    assert d.states() == {again: "queued"}


def test_a_rolled_back_savepoint_drops_only_the_jobs_after_it(
    durable, redis_client, queue
):
    d = durable()
    with d.tm:
        session = d.session()
        session.add(Order(email="kept@example.com"))
        before = d.echo.apply_async(("before",), tm=d.tm).id
        savepoint = d.tm.savepoint()
        session.add(Order(email="dropped@example.com"))
        dropped = d.echo.apply_async(("dropped",), tm=d.tm).id
        savepoint.rollback()
        after = d.echo.apply_async(("after",), tm=d.tm).id
    print(f"savepoint: scheduled 3, rolled back 1, rows {len(d.states())}")
    assert d.states() == {before: "queued", after: "queued"}
    assert dropped not in d.states()
    assert [i for _, i, _ in published(redis_client, queue)] == [before, after]
    assert d.emails() == ["kept@example.com"]


# -- 3. no session joined: the rows on a connection of their own ------------


class Peek(NullDataManager):
    """Reads the committed job states while the transaction votes."""

    def __init__(self, d):
        self.d = d
        self.seen = None

    def tpc_vote(self, txn):
        self.seen = self.d.states()


def test_without_a_joined_session_the_rows_commit_only_with_the_transaction(
    durable, redis_client, queue
):
    """No session in the transaction: the rows are inserted on a connection
    of their own at the commit, invisible while the transaction votes, and
    committed after every resource voted."""
    d = durable()
    seen = Statements(d.engine)
    peek = Peek(d)
    with d.tm:
        d.tm.get().join(peek)
        ids = [d.echo.apply_async((n,), tm=d.tm).id for n in range(3)]
    inserts = writes(seen.sql, "INSERT")
    assert len(inserts) == 1
    assert inserts[0][0] in seen.commits  # committed on its own connection
    assert peek.seen == {}  # not committed while the transaction voted
    assert d.states() == dict.fromkeys(ids, "queued")
    assert len(published(redis_client, queue)) == 3
    assert d.engine.pool.checkedout() == 0

    # A vote that fails: the rows written on that connection are rolled back.
    d.tm.begin()
    d.tm.get().join(FailingVote())
    vetoed = d.echo.apply_async(("vetoed",), tm=d.tm).id
    with pytest.raises(RuntimeError, match="vote failed"):
        d.tm.commit()
    print(f"own connection: INSERTs {len(writes(seen.sql, 'INSERT'))}")
    assert len(writes(seen.sql, "INSERT")) == 2  # it was written, then undone
    assert vetoed not in d.states()
    assert len(published(redis_client, queue)) == 3
    assert d.engine.pool.checkedout() == 0


def test_a_session_on_another_database_is_not_used_for_the_rows(
    durable, database_url, redis_client, queue
):
    """The only session in the transaction is bound to another engine: the
    rows go on the job engine's own connection, and both commit."""
    d = durable()
    other_engine = sqlalchemy.create_engine(database_url)
    other = register_factory(sqlalchemy.orm.sessionmaker(bind=other_engine))
    seen = Statements(d.engine)
    try:
        with d.tm:
            session = get_tm_session(other, d.tm)
            assert session.execute(text("SELECT 1")).scalar() == 1
            job_id = d.echo.apply_async((1,), tm=d.tm).id
        assert d.states() == {job_id: "queued"}
        assert len(writes(seen.sql, "INSERT")) == 1
    finally:
        other_engine.dispose()


def test_a_session_bound_per_mapper_without_the_job_table(durable):
    """The app's session binds its own mappers only (``binds=``) and the job
    engine is named as an engine: the rows go on their own connection, the
    order and the job both commit."""

    def setup(config):
        config.registry["jobs_engine"] = config.registry["dbsession_factory"].kw["bind"]

    d = durable(setup=setup, **{"tasks.jobs.session_factory": "jobs_engine"})
    factory = register_factory(sqlalchemy.orm.sessionmaker(binds={Order: d.engine}))
    seen = Statements(d.engine)
    with d.tm:
        get_tm_session(factory, d.tm).add(Order(email="ann@example.com"))
        job_id = d.echo.apply_async((1,), tm=d.tm).id
    [(job_pid, _)] = writes(seen.sql, "INSERT")
    [(order_pid, _)] = writes(seen.sql, "INSERT", "orders")
    assert job_pid != order_pid
    assert {job_pid, order_pid} <= set(seen.commits)
    assert d.states() == {job_id: "queued"}
    assert d.emails() == ["ann@example.com"]


# -- tasks scheduled while the transaction commits -------------------------


def test_a_task_scheduled_by_a_flush_at_the_commit_gets_its_row_there(
    durable, redis_client, queue
):
    """An ORM listener schedules the task when zope.sqlalchemy flushes, in
    the commit: its row is written in the same database transaction, on the
    connection of the order's INSERT."""
    d = durable()
    seen = Statements(d.engine)
    with d.tm:
        session = d.session()

        def schedule_confirmation(session, flush_context):
            for order in [o for o in session.new if isinstance(o, Order)]:
                d.echo.apply_async((order.email,), tm=d.tm)

        event.listen(session, "after_flush", schedule_confirmation)
        session.add(Order(email="late@example.com"))
    [(pid, _)] = writes(seen.sql, "INSERT")
    assert {pid for pid, _ in writes(seen.sql, "INSERT", "orders")} == {pid}
    assert seen.commits[0] == pid
    [(job_id, state)] = d.states().items()
    assert state == "queued"
    assert d.row(job_id)["args"] == ["late@example.com"]
    assert [i for _, i, _ in published(redis_client, queue)] == [job_id]


class SchedulesAtCommit(NullDataManager):
    """A resource that schedules a task as the transaction commits (its
    ``tpc_begin``), as an ORM flush would, with no session joined."""

    def __init__(self, d, ids):
        self.d = d
        self.ids = ids

    def tpc_begin(self, txn):
        self.ids.append(self.d.echo.apply_async(("at commit",), tm=self.d.tm).id)


@pytest.mark.parametrize("outcome", ["committed", "vetoed"])
@pytest.mark.parametrize("earlier", [0, 1])
def test_a_task_scheduled_during_the_commit_without_a_session(
    durable, redis_client, queue, outcome, earlier
):
    """With ``earlier`` tasks scheduled before the commit (their rows are
    written at the commit phase, with this one) or none (this one's row on a
    connection of its own, settled after the votes): committed, every row
    ``queued``; vetoed, no row and no connection left out."""
    d = durable()
    ids = []
    d.tm.begin()
    ids += [d.echo.apply_async((n,), tm=d.tm).id for n in range(earlier)]
    d.tm.get().join(SchedulesAtCommit(d, ids))
    if outcome == "vetoed":
        d.tm.get().join(FailingVote())
        with pytest.raises(RuntimeError, match="vote failed"):
            d.tm.commit()
        d.tm.abort()
        expected = {}
    else:
        d.tm.commit()
        expected = dict.fromkeys(ids, "queued")
    assert len(ids) == earlier + 1
    assert d.states() == expected
    assert len(published(redis_client, queue)) == len(expected)
    assert d.engine.pool.checkedout() == 0


# -- faults at and after the commit ------------------------------------------


@pytest.mark.parametrize("with_session", [True, False])
def test_job_rows_that_cannot_be_written_fail_the_commit(
    durable, pg_schema, redis_client, queue, with_session
):
    """The job table is missing: the commit fails, so no business data
    commits without its jobs, and nothing is sent."""
    d = durable()
    with d.engine.begin() as connection:
        connection.execute(text(f'DROP TABLE "{pg_schema}".pyramid_tasks_job'))
    d.tm.begin()
    if with_session:
        d.session().add(Order(email="ann@example.com"))
    d.echo.apply_async((1,), tm=d.tm)
    with pytest.raises(JobTableMissing, match="jobs init-db") as info:
        d.tm.commit()
    assert isinstance(info.value.__cause__, sqlalchemy.exc.ProgrammingError)
    d.tm.abort()
    assert d.emails() == []
    assert published(redis_client, queue) == []
    assert d.engine.pool.checkedout() == 0


class KillsConnection(NullDataManager):
    """Terminates, while the transaction votes, the backend that holds the
    job rows (their own connection): its COMMIT fails in tpc_finish."""

    def __init__(self, seen, database_url):
        self.seen = seen
        self.database_url = database_url
        self.killed = None

    def tpc_vote(self, txn):
        [(pid, _)] = writes(self.seen.sql, "INSERT")
        engine = sqlalchemy.create_engine(self.database_url)
        try:
            with engine.begin() as connection:
                self.killed = connection.scalar(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
                )
        finally:
            engine.dispose()


def test_job_rows_lost_after_the_votes_are_logged_and_the_tasks_still_sent(
    durable, database_url, redis_client, queue, caplog
):
    """No session joined; the connection holding the rows dies after every
    resource voted: the transaction has committed, so the task is sent and
    one ERROR line says its row was not (a worker makes it as it starts)."""
    d = durable()
    seen = Statements(d.engine)
    killer = KillsConnection(seen, database_url)
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"), d.tm:
        d.tm.get().join(killer)
        job_id = d.echo.apply_async((1,), tm=d.tm).id
    messages = [i for _, i, _ in published(redis_client, queue)]
    print(f"rows lost at COMMIT: rows {len(d.states())}, messages {len(messages)}")
    assert killer.killed is True
    assert d.states() == {}
    assert messages == [job_id]
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(
        "The job rows of a committed transaction could not be committed: "
    )
    assert d.engine.pool.checkedout() == 0


def test_rows_not_marked_after_the_publish_stay_pending_for_the_relay(
    durable, pg_schema, redis_client, queue, caplog
):
    """The UPDATE after the publish fails (a trigger refuses it): one
    WARNING, the row stays ``pending``; the relay sends it again once the
    table takes updates: 2 messages of one job (the worker's row lock runs a
    transactional task once)."""
    d = durable(**relay_settings())
    with d.engine.begin() as connection:
        connection.execute(
            text(
                f'CREATE FUNCTION "{pg_schema}".refuse() RETURNS trigger '
                "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no updates now'; "
                "END $$"
            )
        )
        connection.execute(
            text(
                f'CREATE TRIGGER refuse BEFORE UPDATE ON "{pg_schema}".'
                "pyramid_tasks_job FOR EACH ROW EXECUTE FUNCTION "
                f'"{pg_schema}".refuse()'
            )
        )
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"), d.tm:
        job_id = d.echo.apply_async((1,), tm=d.tm).id
    assert d.jobs.flush(10)
    [record] = caplog.records
    assert record.getMessage().startswith(
        "1 committed job(s) were sent but not marked queued (the relay may "
        "send them again): "
    )
    assert "no updates now" in record.getMessage()
    assert d.states() == {job_id: "pending"}
    with d.engine.begin() as connection:
        connection.execute(
            text(f'DROP TRIGGER refuse ON "{pg_schema}".pyramid_tasks_job')
        )
    sent, arrived = relay_sends(d, job_id, redis_client)
    print(f"unmarked: published 1, relay sent {sent}, messages {arrived}")
    assert (sent, arrived) == (1, 2)


def refuse_unroutable(name, args, kwargs, options, task=None, **kw):
    """An app's router (``celery.task_routes``) that fails for one value."""
    if args and args[0] == "unroutable":
        raise LookupError("no route for this order")


def test_queue_objects_and_a_failing_router(durable, redis_client, queue, caplog):
    """A kombu ``Queue`` is recorded by its name (the relay publishes to
    it); a router that fails leaves the queue unknown, and fails again at
    the publish: that job stays ``pending``, the others go."""
    d = durable(
        **{"celery.task_routes": "tests.test_jobs_web.refuse_unroutable"},
        **relay_settings(),
    )
    other = f"{queue}_other"
    try:
        with caplog.at_level(logging.WARNING, logger="pyramid_tasks"), d.tm:
            to_object = d.echo.apply_async((1,), tm=d.tm, queue=kombu.Queue(other))
            unroutable = d.echo.apply_async(("unroutable",), tm=d.tm)
            routed = d.echo.apply_async((2,), tm=d.tm)
        assert d.row(to_object.id)["queue"] == other
        assert d.row(to_object.id)["options"] == {"queue": other}
        assert d.row(unroutable.id)["queue"] is None
        assert d.row(routed.id)["queue"] == queue
        assert d.states() == {
            to_object.id: "queued",
            unroutable.id: "pending",
            routed.id: "queued",
        }
        assert [r.getMessage() for r in caplog.records] == [
            "Sending 3 committed tasks one at a time, not in one pipeline: "
            "LookupError: no route for this order",
            f"Job echo[{unroutable.id}] is committed; the broker did not take it "
            "(LookupError: no route for this order): the relay will send it.",
        ]
        assert [i for _, i, _ in published(redis_client, other)] == [to_object.id]
        assert [i for _, i, _ in published(redis_client, queue)] == [routed.id]
    finally:
        redis_client.delete(other)


# -- 4. sent without tm -------------------------------------------------------


def test_tasks_sent_without_tm_get_a_queued_row(durable, redis_client, queue):
    """``delay()`` of a ScheduleOnCommitTask and of a PyramidTask, and what
    beat sends (its own producer): each a ``queued`` row, written after the
    send, one INSERT each."""
    d = durable()
    seen = Statements(d.engine)
    first = d.echo.delay(1).id
    second = d.plain.delay(2).id
    scheduler = Scheduler(d.app, schedule={}, lazy=True)
    entry = ScheduleEntry(
        name="every-minute", task="echo", args=(3,), schedule=60, app=d.app
    )
    try:
        beat = scheduler.apply_async(entry, advance=False).id
    finally:
        scheduler.close()
    assert d.states() == {first: "queued", second: "queued", beat: "queued"}
    assert len(writes(seen.sql, "INSERT")) == 3
    assert [i for _, i, _ in published(redis_client, queue)] == [first, second, beat]
    row = d.row(beat)
    assert (row["name"], row["args"], row["queue"]) == ("echo", [3], queue)
    assert "producer" not in row["options"]
    assert row["published_at"] == row["created_at"]


def test_a_row_a_worker_made_first_is_kept(durable):
    """The row of a task sent without tm is inserted unless it exists (the
    worker may have started the job already): the first one stands."""
    d = durable()
    job_id = str(uuid.uuid4())
    d.jobs.store.insert_missing(
        [d.jobs.row(d.plain, job_id, (1,), {}, {}, state="started")]
    )
    assert d.plain.apply_async((1,), task_id=job_id).id == job_id
    assert d.states() == {job_id: "started"}


def test_a_row_that_cannot_be_written_after_the_send_is_logged(
    durable, pg_schema, redis_client, queue, caplog
):
    """The row of a task sent at once cannot be written: the task is still
    sent, with one log line naming it: a WARNING when the database refused
    the row (the worker that starts the job writes it), an ERROR saying what
    to do when the job table is missing."""
    d = durable()
    with d.engine.begin() as connection:
        connection.execute(
            text(
                f'CREATE FUNCTION "{pg_schema}".refuse() RETURNS trigger '
                "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no inserts now'; "
                "END $$"
            )
        )
        connection.execute(
            text(
                f'CREATE TRIGGER refuse BEFORE INSERT ON "{pg_schema}".'
                "pyramid_tasks_job FOR EACH ROW EXECUTE FUNCTION "
                f'"{pg_schema}".refuse()'
            )
        )
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        refused_id = d.plain.delay(1).id
    with d.engine.begin() as connection:
        connection.execute(text(f'DROP TABLE "{pg_schema}".pyramid_tasks_job'))
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        missing_id = d.plain.delay(2).id
    assert [i for _, i, _ in published(redis_client, queue)] == [
        refused_id,
        missing_id,
    ]
    refused, missing = caplog.records
    assert (refused.levelno, refused.getMessage()) == (
        logging.WARNING,
        f"Job plain[{refused_id}] was sent; its row could not be written (the "
        "worker that starts it will): no inserts now",
    )
    assert missing.levelno == logging.ERROR
    assert missing.getMessage().startswith(
        f"Job plain[{missing_id}] was sent with no row: The job table "
        "pyramid_tasks_job does not exist in "
    )
    assert "jobs init-db" in missing.getMessage()


def test_in_eager_mode_the_run_makes_and_marks_its_row(durable):
    """Eager mode: ``delay()`` runs at once, the run creates its row and marks
    it ``succeeded``; with tm, the row written at the commit is run and marked
    after it, and stays ``succeeded``."""
    d = durable(**{"celery.task_always_eager": "true"})
    direct = d.plain.delay(5)
    assert direct.get() == 5
    on_commit = d.echo.delay(6)
    with d.tm:
        scheduled = d.echo.apply_async((7,), tm=d.tm).id
    assert d.states() == {
        direct.id: "succeeded",
        on_commit.id: "succeeded",
        scheduled: "succeeded",
    }
    for job_id in (direct.id, on_commit.id, scheduled):
        row = d.row(job_id)
        assert (row["attempts"], row["progress"]) == (1, 100), row
        assert row["finished_at"] >= row["started_at"]
    assert d.row(direct.id)["args"] == [5]


def interrupted(self):
    """A body interrupted as the prefork pool's SIGTERM interrupts a child
    (billiard's handler raises ``SystemExit(-241)``)."""
    raise SystemExit(-241)


def test_a_run_interrupted_by_its_process_ending_is_not_marked_failed(durable, caplog):
    """SystemExit or KeyboardInterrupt ends the process, not the job.  Marked
    ``failed`` "SystemExit: -241", a run past its hard time limit hid the
    limit whenever the pool's SIGTERM reached the child before the main
    process marked the kill (a flaky CI run).  The row stays ``started`` for
    the main process's mark, a redelivery or the lease; one line says so."""
    d = durable(
        setup=lambda config: config.add_task(
            interrupted, bind=True, base=PyramidTask, name="interrupted"
        ),
        **{"celery.task_always_eager": "true"},
    )
    with pytest.raises(SystemExit), caplog.at_level(logging.WARNING):
        d.app.tasks["interrupted"].apply(task_id="job-interrupted")
    row = d.row("job-interrupted")
    assert (row["state"], row["attempts"], row["error"]) == ("started", 1, None)
    assert [r.getMessage() for r in caplog.records] == [
        "Job interrupted[job-interrupted]: its run was interrupted "
        "(SystemExit: -241); its row is left for the worker's main process, "
        "a redelivery or its lease."
    ]


def place_and_notify(self, email):
    """A transactional task that schedules another with its own tm."""
    request = self.get_request()
    request.dbsession.add(Order(email=email))
    return request.celery_app.tasks["echo"].apply_async((email,), tm=request.tm).id


def test_a_task_scheduled_by_a_task_records_its_parent(durable):
    """Eager mode: a TransactionalTask schedules ``echo`` with its request's
    tm: the child's row is written in the parent's transaction (with its
    order and its ``succeeded`` mark), names the parent, and runs after."""
    d = durable(
        setup=lambda config: config.add_task(
            place_and_notify, bind=True, base=TransactionalTask, name="place"
        ),
        **{"celery.task_always_eager": "true"},
    )
    seen = Statements(d.engine)
    parent = d.app.tasks["place"].delay("ann@example.com")
    child = parent.get()
    assert d.states() == {parent.id: "succeeded", child: "succeeded"}
    assert d.row(child)["parent_id"] == parent.id
    assert d.row(parent.id)["parent_id"] is None
    assert d.emails() == ["ann@example.com"]
    # The child's INSERT ran on the backend of the order's.
    [(order_pid, _)] = writes(seen.sql, "INSERT", "orders")
    assert any(pid == order_pid for pid, _ in writes(seen.sql, "INSERT"))


# -- 5. JobCreated ------------------------------------------------------------


def test_job_created_in_a_view_has_the_current_request(durable, redis_client, queue):
    """Under pyramid_tm (WebTest): the subscriber gets the view's request,
    and what it writes with ``request.dbsession`` commits with the job."""
    seen = []

    def view(request):
        seen.append(("view", request))
        request.dbsession.add(Order(email="view@example.com"))
        result = request.celery_app.tasks["echo"].apply_async((1,), tm=request.tm)
        return Response(result.id)

    def created(event):
        seen.append(("event", event.request, get_current_request(), event.job_id))
        assert event.task_name == "echo" and event.task.name == "echo"
        event.request.dbsession.add(Order(email=f"audit-{event.job_id}"))

    def setup(config):
        config.add_route("place", "/place")
        config.add_view(view, route_name="place")
        config.add_subscriber(created, JobCreated)

    d = durable(setup=setup)
    job_id = webtest.TestApp(d.config.make_wsgi_app()).post("/place").text
    (_, view_request), (_, event_request, current, event_job) = seen
    assert event_request is view_request is current
    assert event_job == job_id
    assert d.emails() == ["view@example.com", f"audit-{job_id}"]
    assert d.states() == {job_id: "queued"}
    assert [i for _, i, _ in published(redis_client, queue)] == [job_id]


def test_job_created_outside_a_request_gets_a_request_of_its_own(durable):
    """A script's ``with tm:``: the event's request is made for it, with the
    transaction's manager as ``tm``; its session's writes commit with the job;
    an abort takes both back."""
    seen = []

    def created(event):
        request = event.request
        seen.append((request.tm, request.registry, get_current_request() is request))
        request.dbsession.add(Order(email=f"audit-{event.job_id}"))

    d = durable(setup=lambda config: config.add_subscriber(created, JobCreated))
    with d.tm:
        job_id = d.echo.apply_async((1,), tm=d.tm).id
    assert seen == [(d.tm, d.registry, True)]
    assert get_current_request() is None  # popped after the event
    assert d.emails() == [f"audit-{job_id}"]
    assert d.states() == {job_id: "queued"}

    d.tm.begin()
    aborted = d.echo.apply_async((2,), tm=d.tm).id
    d.tm.abort()
    assert aborted not in d.states()
    assert d.emails() == [f"audit-{job_id}"]


def test_a_failing_job_created_subscriber_is_logged_and_changes_nothing(
    durable, redis_client, queue, caplog
):
    heard = []

    def broken(event):
        raise RuntimeError("subscriber bug")

    def listening(event):
        heard.append(event.job_id)

    def setup(config):
        config.add_subscriber(broken, JobCreated)
        config.add_subscriber(listening, JobCreated)

    d = durable(setup=setup)
    with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), d.tm:
        d.session().add(Order(email="ann@example.com"))
        job_id = d.echo.apply_async((1,), tm=d.tm).id
    [record] = caplog.records
    assert record.getMessage() == (
        f"A subscriber of JobCreated for job echo[{job_id}] failed; the job goes on."
    )
    assert record.exc_info[0] is RuntimeError
    assert heard == [job_id]
    assert d.states() == {job_id: "queued"}
    assert d.emails() == ["ann@example.com"]
    assert [i for _, i, _ in published(redis_client, queue)] == [job_id]


# -- 6. the publish after the commit is bounded -------------------------------


class OwnRedis:
    """A ``redis-server`` of the test's own on a port that stays its own:
    stopped (terminated by its PID) and started again on the same port."""

    def __init__(self, folder):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.client = redis.Redis.from_url(self.url)

    def start(self):
        arguments = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        arguments += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL)
        wait_for(self._answers, timeout=10, message=f"redis-server on {self.port}")
        return self

    def _answers(self):
        try:
            return self.client.ping()
        except redis.ConnectionError:
            return False

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)

    def close(self):
        """Woken and ended by its PID (Popen signals nothing once it exited)."""
        self.client.close()
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path).start()
    yield server
    server.close()


# One socket timeout (tasks.jobs.publish_timeout, 0.2 s) and 1 s for the
# COMMIT, the connection's set-up and a loaded 2-core machine (the suite's
# other xdist worker, or other runs: a stopped broker's commit once took
# 0.61 s there), as tests/test_publish_faults.py allows.  Measured quiet:
# 0.015 s stopped, 0.22-0.24 s frozen; kombu's connection retries, before
# the fix, took 6.0 s and 6.6 s: still five times the bound.
BOUND = 0.2 + 1.0


def commit_one(d):
    """Commit one task with an order: ``(job id, seconds the commit took)``."""
    d.tm.begin()
    d.session().add(Order(email="ann@example.com"))
    job_id = d.echo.apply_async((1,), tm=d.tm).id
    started = time.monotonic()
    d.tm.commit()
    return job_id, time.monotonic() - started


def relay_settings():
    # No grace: the test's relay round takes the row at once.
    return {"tasks.jobs.relay": "false", "tasks.jobs.relay_grace": "0"}


def check_left_pending(d, job_id, caplog, verb):
    assert d.states()[job_id] == "pending"
    [record] = [r for r in caplog.records if r.name.startswith("pyramid_tasks")]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(
        f"Job echo[{job_id}] is committed; the broker did not {verb} it ("
    ), message
    assert message.endswith("): the relay will send it."), message


def relay_sends(d, job_id, client):
    """One relay round sends ``job_id``: ``(sent, messages of it in Redis)``."""
    rescued, sent, dead = Relay(d.app).run_once()
    assert (rescued, dead) == (0, 0)
    assert d.states()[job_id] == "queued"
    return sent, [i for _, i, _ in published(client, d.queue)].count(job_id)


@pytest.mark.parametrize("connection", ["open", "new"])
def test_a_stopped_broker_holds_the_commit_less_than_the_bound(
    durable, own_redis, caplog, connection
):
    """The broker is terminated (with the producer's connection open, or
    before the app's first publish): the commit returns at once, the job
    stays ``pending`` with one WARNING; the broker is started again on its
    port, one relay round sends the job: 1 message."""
    d = durable(broker_url=own_redis.url, **relay_settings())
    assert d.registry.pyramid_tasks_settings.publish_timeout == 0.2
    if connection == "open":
        warm, _ = commit_one(d)
        assert d.states()[warm] == "queued"
        own_redis.client.delete(d.queue)
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        job_id, held = commit_one(d)
    check_left_pending(d, job_id, caplog, "take")
    own_redis.start()
    sent, arrived = relay_sends(d, job_id, own_redis.client)
    print(
        f"broker stopped ({connection} connection): commit held {held:.3f} s "
        f"(bound {BOUND} s); relay sent {sent}, messages {arrived}"
    )
    assert held < BOUND
    assert (sent, arrived) == (1, 1)
    assert d.emails() == ["ann@example.com"] * (2 if connection == "open" else 1)


def test_a_frozen_broker_holds_the_commit_one_publish_timeout(
    durable, own_redis, caplog
):
    """The broker is SIGSTOPped before the app's first publish: the
    connection's handshake times out after tasks.jobs.publish_timeout,
    nothing was written; the job stays ``pending``; the broker wakes, one
    relay round sends it: 1 message."""
    d = durable(broker_url=own_redis.url, **relay_settings())
    with (
        frozen(own_redis.process) as woke,
        caplog.at_level(logging.WARNING, logger="pyramid_tasks"),
    ):
        job_id, held = commit_one(d)
    assert not woke.is_set(), "the commit waited for the watchdog"
    check_left_pending(d, job_id, caplog, "confirm")
    assert published(own_redis.client, d.queue) == []  # the handshake only
    sent, arrived = relay_sends(d, job_id, own_redis.client)
    print(
        f"broker frozen (new connection): commit held {held:.3f} s (bound "
        f"{BOUND} s); relay sent {sent}, messages {arrived}"
    )
    assert 0.2 <= held < BOUND
    assert (sent, arrived) == (1, 1)


def test_a_broker_frozen_under_an_open_connection_may_get_the_job_twice(
    durable, own_redis, caplog
):
    """Frozen with the producer's connection open: the LPUSH is written and
    never answered, so the commit gives up after one timeout and the job
    stays ``pending`` ("did not confirm").  Redis runs the LPUSH as it
    wakes: 1 message, and the row cannot know it; the relay sends the job
    again: 2 messages of one job, which a worker runs once (its row)."""
    d = durable(broker_url=own_redis.url, **relay_settings())
    commit_one(d)
    own_redis.client.delete(d.queue)
    with (
        frozen(own_redis.process) as woke,
        caplog.at_level(logging.WARNING, logger="pyramid_tasks"),
    ):
        job_id, held = commit_one(d)
    assert not woke.is_set(), "the commit waited for the watchdog"
    check_left_pending(d, job_id, caplog, "confirm")
    wait_for(lambda: published(own_redis.client, d.queue), timeout=10)
    sent, arrived = relay_sends(d, job_id, own_redis.client)
    print(
        f"broker frozen (open connection): commit held {held:.3f} s (bound "
        f"{BOUND} s); arrived at the wake 1, relay sent {sent}, messages {arrived}"
    )
    assert 0.2 <= held < BOUND
    assert (sent, arrived) == (1, 2)


def test_a_lower_tasks_publish_timeout_is_kept(durable):
    d = durable(**{"tasks.publish_timeout": "0.05"})
    assert d.registry.pyramid_tasks_settings.publish_timeout == 0.05
    d = durable(**{"tasks.publish_timeout": "none", "tasks.jobs.publish_timeout": "1s"})
    assert d.registry.pyramid_tasks_settings.publish_timeout == 1.0
