"""A run's BEGIN and lock in one round trip (pyramid_tasks/jobs/prepared.py),
proved by libpq's own trace of the messages sent and received."""

import logging
import re
import tempfile
from contextlib import contextmanager

import pytest
import sqlalchemy
from psycopg import pq

from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs import prepared as prepared_module
from pyramid_tasks.jobs.prepared import LOST_LIMIT, _Prepared, _Statement
from pyramid_tasks.jobs.store import JobTableMissing

from .test_jobs_store import insert_pending, jobs_app  # noqa: F401


@contextmanager
def traced(connection):
    """The protocol messages of ``connection`` (SQLAlchemy's) while the
    block runs, as libpq writes them: ``[(direction, type, text)]``."""
    messages = []
    pgconn = connection.connection.driver_connection.pgconn
    with tempfile.TemporaryFile() as file:
        pgconn.trace(file.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield messages
        finally:
            pgconn.untrace()
            file.seek(0)
            # A message a line, its text's own line breaks aside.
            trace = re.split(r"\n(?=[FB]\t)", file.read().decode().strip())
            for line in trace:
                direction, _length, kind, *text = line.split("\t")
                text = " ".join(text).replace("\n", " ").strip()
                messages.append((direction, kind, text))


def sent(messages):
    """What the client sent: a simple query's text, else the message type."""
    return [text if kind == "Query" else kind for d, kind, text in messages if d == "F"]


def round_trips(messages):
    return sum(kind == "ReadyForQuery" for _d, kind, _t in messages)


@pytest.fixture
def another_engine(jobs_app, database_url):  # noqa: F811
    """Engines on the test's schema, made with ``**arguments``; disposed."""
    _app, engine, _queue, _client = jobs_app
    made = []

    def make(**arguments):
        options = arguments.pop("execution_options", {})
        new = sqlalchemy.create_engine(arguments.pop("url", database_url), **arguments)
        made.append(new)
        return new.execution_options(**engine.get_execution_options(), **options)

    yield make
    for one in made:
        one.dispose()


def test_a_runs_begin_and_lock_go_in_one_message(jobs_app, another_engine):  # noqa: F811
    """The lock of a run is the first statement of its transaction: its
    BEGIN and it go in one simple query (one round trip, not two), the lock
    prepared on the server the first time the connection runs it.  The
    transaction is psycopg's as if it had begun it: the app's statements
    and the COMMIT follow, and the job's advisory lock is held until then."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    engine = another_engine()
    first, second = insert_pending(engine, count=2, state="queued", title="T")
    with engine.connect() as connection:
        for job_id in (first, second):
            connection.begin()
            with traced(connection) as messages:
                assert store.lock(connection, job_id) == ("queued", 0, "T")
                connection.exec_driver_sql("SELECT 1")
                with engine.connect() as other:
                    taken = other.exec_driver_sql(
                        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
                        (job_id,),
                    ).scalar()
                assert taken is False
                connection.commit()
            lock = f"BEGIN; EXECUTE pyramid_tasks_\\w{{16}}\\('{job_id}', '0'\\)"
            if job_id == first:  # prepared once
                assert re.fullmatch(
                    r'"PREPARE pyramid_tasks_\w{16}\(text, bigint\) '
                    r'AS SELECT pg_try_advisory_xact_lock.*"',
                    sent(messages)[0],
                )
                del messages[:3]  # its Query, CommandComplete, ReadyForQuery
            assert re.fullmatch(f'"{lock}"', sent(messages)[0])
            assert sent(messages)[1:] == ['"SELECT 1"', '"COMMIT"']
            assert round_trips(messages) == 3
        driver = connection.connection.driver_connection
        assert driver.info.transaction_status == pq.TransactionStatus.IDLE


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({}, ("read committed", "off", "off")),
        (
            {
                "isolation_level": "SERIALIZABLE",
                "postgresql_readonly": True,
                "postgresql_deferrable": True,
            },
            ("serializable", "on", "on"),
        ),
        (
            {
                "isolation_level": "REPEATABLE READ",
                "postgresql_readonly": False,
                "postgresql_deferrable": False,
            },
            ("repeatable read", "off", "off"),
        ),
    ],
)
def test_the_begin_sent_with_the_lock_is_psycopgs_own(
    jobs_app,  # noqa: F811
    another_engine,
    options,
    shown,
):
    """The BEGIN keeps the isolation level, read-only and deferrable flags
    SQLAlchemy set on the connection, as psycopg's own BEGIN would."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    engine = another_engine()
    [job_id] = insert_pending(engine, state="queued")
    with engine.connect() as connection:
        # As a Connection's options (an engine's come by a pool listener,
        # which keeps the lock on SQLAlchemy's long path).
        connection.execution_options(**options)
        connection.begin()
        with traced(connection) as messages:
            assert store.lock(connection, job_id) == ("queued", 0, None)
        assert sent(messages)[-1].startswith('"BEGIN')
        assert "EXECUTE pyramid_tasks_" in sent(messages)[-1]
        settings = (
            "transaction_isolation",
            "transaction_read_only",
            "transaction_deferrable",
        )
        assert (
            tuple(
                connection.exec_driver_sql(f"SHOW {name}").scalar() for name in settings
            )
            == shown
        )
        connection.rollback()


def lock_with_trace(store, connection, job_id):
    with traced(connection) as messages:
        row = store.lock(connection, job_id)
    return row, sent(messages)


def test_the_lock_goes_on_its_own_where_one_message_cannot_hold_it(
    jobs_app,  # noqa: F811
    another_engine,
):
    """A connection that prepares nothing (psycopg's ``prepare_threshold``
    None, PgBouncer's setting), is in autocommit, in pipeline mode or whose
    transaction has begun, and a job id with a NUL (which PostgreSQL's text
    cannot hold): the lock goes on its own, as before (the NUL refused by
    psycopg, as SQLAlchemy raises it)."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    [job_id] = insert_pending(another_engine(), state="queued")
    expected = ("queued", 0, None)

    unprepared = another_engine(connect_args={"prepare_threshold": None})
    with unprepared.connect() as connection:
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert (row, messages[0]) == (expected, '"BEGIN"')
        assert not [m for m in messages if "pyramid_tasks_" in m]
        connection.rollback()

    autocommit = another_engine(execution_options={"isolation_level": "AUTOCOMMIT"})
    with autocommit.connect() as connection:
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert row == expected
        assert not [m for m in messages if "BEGIN" in m or "pyramid_tasks_" in m]
        connection.rollback()

    engine = another_engine()
    with engine.connect() as connection:
        connection.begin()
        connection.exec_driver_sql("SELECT 1")  # begun
        row, messages = lock_with_trace(store, connection, job_id)
        assert row == expected
        assert not [m for m in messages if "BEGIN" in m or "pyramid_tasks_" in m]
        connection.rollback()
        connection.begin()
        with connection.connection.driver_connection.pipeline():
            row, messages = lock_with_trace(store, connection, job_id)
        assert row == expected
        assert not [m for m in messages if "pyramid_tasks_" in m]
        connection.rollback()
        connection.begin()
        nul = pytest.raises(sqlalchemy.exc.DataError, match="NUL")
        with traced(connection) as messages, nul:
            store.lock(connection, job_id[:8] + "\x00" + job_id)
        assert sent(messages) == ['"BEGIN"']  # psycopg refused it, not sent
        connection.rollback()


def test_a_statement_psycopg_deallocated_is_prepared_again(
    jobs_app,  # noqa: F811
    another_engine,
):
    """psycopg deallocates every prepared statement, the lock's too, when it
    rolls back a transaction while it has statements of its own prepared:
    the next lock's one message fails, its transaction is rolled back and
    the lock goes the usual way; the one after prepares it again.  Nothing
    is counted against the engine."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    engine = another_engine()
    [job_id] = insert_pending(engine, state="queued")
    expected = ("queued", 0, None)
    with engine.connect() as connection:
        connection.begin()
        assert store.lock(connection, job_id) == expected  # prepared
        for n in range(6):  # psycopg prepares its own after five
            connection.exec_driver_sql("SELECT %(n)s::int", {"n": n})
        with traced(connection) as messages:
            connection.rollback()
        assert sent(messages) == ['"ROLLBACK"', '"DEALLOCATE ALL"']
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert row == expected
        assert messages[0].startswith('"BEGIN; EXECUTE pyramid_tasks_')
        assert messages[1:3] == ['"ROLLBACK"', '"BEGIN"']
        connection.rollback()
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert row == expected
        assert messages[0].startswith('"PREPARE pyramid_tasks_')
        assert messages[1].startswith('"BEGIN; EXECUTE pyramid_tasks_')
        connection.rollback()
    assert engine.pool not in prepared_module._prepared.lost


def test_a_pool_losing_what_it_just_prepared_stops_after_three(
    jobs_app,  # noqa: F811
    another_engine,
    caplog,
    monkeypatch,
):
    """A pooler that runs each message on another server connection (as
    PgBouncer's transaction pooling with ``server_round_robin``) loses the
    statement between the PREPARE and the message that runs it; stood in
    for here by a PREPARE of another name.  Each such try is rolled back and
    the lock goes the usual way; after three, the engine sends the lock on
    its own from then on, and says so once, its password masked."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    caplog.set_level(logging.INFO, prepared_module.__name__)
    url = sqlalchemy.engine.make_url(another_engine().url).set(password="s3cret")
    engine = another_engine(url=url)  # trust: the password is not asked for
    [job_id] = insert_pending(engine, state="queued")
    expected = ("queued", 0, None)
    real = _Statement.__init__

    def elsewhere(self, text, types):  # the PREPARE another server got
        real(self, text, types)
        self.prepare = self.prepare.replace(self.name, b"elsewhere", 1)

    monkeypatch.setattr(_Statement, "__init__", elsewhere)
    monkeypatch.setattr(prepared_module, "_prepared", _Prepared())
    with engine.connect() as connection:
        for lost in range(1, LOST_LIMIT + 1):
            connection.begin()
            row, messages = lock_with_trace(store, connection, job_id)
            assert row == expected
            assert (
                messages[0]
                == '"PREPARE elsewhere(text, bigint) AS SELECT '
                + (messages[0].split(" AS SELECT ", 1)[1])
            )
            assert messages[1].startswith('"BEGIN; EXECUTE pyramid_tasks_')
            assert messages[2:4] == ['"ROLLBACK"', '"BEGIN"']
            connection.rollback()
            connection.exec_driver_sql("DEALLOCATE elsewhere")
            connection.commit()
            assert prepared_module._prepared.lost[engine.pool] == lost
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert (row, messages[0]) == (expected, '"BEGIN"')
        assert not [m for m in messages if "PREPARE" in m or "EXECUTE" in m]
        connection.rollback()
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("Jobs on postgresql+psycopg://")
    assert "s3cret" not in said and "***" in said
    assert "lose a statement prepared the message before" in said


def test_a_statement_prepared_by_another_pyramid_tasks_is_used(
    jobs_app,  # noqa: F811
    another_engine,
    monkeypatch,
):
    """A connection that has the statement already (prepared by another
    copy of the package's state in this process) keeps it: PREPARE's
    "already exists" is taken as done."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    engine = another_engine()
    [job_id] = insert_pending(engine, state="queued")
    with engine.connect() as connection:
        connection.begin()
        assert store.lock(connection, job_id) == ("queued", 0, None)
        connection.rollback()
        monkeypatch.setattr(prepared_module, "_prepared", _Prepared())  # forgot
        connection.begin()
        row, messages = lock_with_trace(store, connection, job_id)
        assert row == ("queued", 0, None)
        assert messages[0].startswith('"PREPARE')
        assert messages[1].startswith('"BEGIN; EXECUTE')
        connection.rollback()


def test_errors_come_the_usual_way(jobs_app, another_engine):  # noqa: F811
    """What the database refuses or a connection lost is left to the usual
    way, which raises it as SQLAlchemy does: a missing table named, a killed
    backend invalidated, a closed connection too."""
    app, _engine, _queue, _client = jobs_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    engine = another_engine()
    [job_id] = insert_pending(engine, state="queued")
    for prepared in (False, True):  # killed before the PREPARE, or after
        with engine.connect() as connection:
            if prepared:
                connection.begin()
                store.lock(connection, job_id)
                connection.rollback()
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            connection.commit()
            connection.begin()
            with engine.connect() as killer:
                killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            failing = pytest.raises(sqlalchemy.exc.OperationalError)
            with traced(connection) as messages, failing as lost:
                store.lock(connection, job_id)
            assert lost.value.connection_invalidated is True
            assert sent(messages)[0].startswith(
                '"BEGIN; EXECUTE' if prepared else '"PREPARE'
            )
    with engine.connect() as connection:
        connection.begin()
        connection.connection.driver_connection.close()
        with pytest.raises(sqlalchemy.exc.OperationalError) as closed:
            store.lock(connection, job_id)
        assert closed.value.connection_invalidated is True
    Job.__table__.drop(engine)
    with engine.connect() as connection:
        connection.begin()
        with pytest.raises(JobTableMissing, match="jobs init-db"):
            store.lock(connection, job_id)


def test_what_the_one_message_cannot_say_goes_the_usual_way(database_url):
    """Parameters of other types, a text the connection cannot encode and a
    statement of no row (its transaction rolled back) are left to the usual
    way (None); ``%%`` is a percent sign."""
    statement = _Statement(
        "SELECT %(a)s %% 2, %(b)s = %(a)s", {"a": "bigint", "b": "text"}
    )
    assert statement.names == ["a", "b"]
    assert statement.prepare.endswith(b"(bigint, text) AS SELECT $1 % 2, $2 = $1")
    state = _Prepared()
    assert state.statement("SELECT %(x)s", {"x": 1.5}) is None
    assert state.statement("SELECT %(x)s", {"x": 1}) is state.statement(
        "SELECT %(x)s", {"x": 2}
    )
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.begin()
            assert state.begin_with(connection, "SELECT %(x)s", {"x": "\udcff"}) is None
            assert state.begin_with(connection, "SELECT %(x)s", {"x": 1.5}) is None
            # Refused at PREPARE; then prepared, run, no row.
            assert (
                state.begin_with(connection, "SELECT 1 WHERE %(x)s", {"x": 0}) is None
            )
            none = state.begin_with(connection, "SELECT 1 WHERE %(x)s = 1", {"x": 0})
            assert none is None
            driver = connection.connection.driver_connection
            assert driver.info.transaction_status == pq.TransactionStatus.IDLE
            assert state.begin_with(connection, "SELECT %(x)s::int", {"x": 7}) == (7,)
            connection.rollback()
    finally:
        engine.dispose()
