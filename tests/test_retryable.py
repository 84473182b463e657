"""``retryable``: one task, many short transactions, each retried on its own."""

import logging
import random
import threading

import pytest
import sqlalchemy
import transaction
import webtest
from pyramid.scripting import prepare
from sqlalchemy import text
from transaction._transaction import Status
from transaction.interfaces import AlreadyInTransaction, TransientError
from zope.sqlalchemy import mark_changed

from demo_app.models import Order
from pyramid_tasks import (
    PyramidTask,
    RetryAttemptsExhausted,
    ScheduleOnCommitTask,
    TransactionalTask,
    retryable,
)
from pyramid_tasks.retry import in_transaction
from pyramid_tasks.testing import get_task_capture

from .conftest import db_app

ITEMS = 50


@pytest.fixture
def db(database_url, pg_schema):
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{pg_schema}"'))
        connection.execute(
            text(
                f'CREATE TABLE "{pg_schema}".items (id int PRIMARY KEY, '
                "value int NOT NULL DEFAULT 0, processed bool NOT NULL DEFAULT false)"
            )
        )
        connection.execute(
            text(
                f'INSERT INTO "{pg_schema}".items (id) '
                f"SELECT generate_series(1, {ITEMS})"
            )
        )
    settings = {
        "sqlalchemy.url": database_url,
        "sqlalchemy.isolation_level": "SERIALIZABLE",
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
        "celery.task_eager_propagates": "true",
        "tasks.retry.backoff": "0.001",
        "tasks.retry.backoff_max": "0.01",
    }
    yield settings, engine, pg_schema
    engine.dispose()


def rows(engine, schema):
    with engine.connect() as connection:
        result = connection.execute(
            text(f'SELECT id, value, processed FROM "{schema}".items ORDER BY id')
        )
        return {row.id: (row.value, row.processed) for row in result}


class CommitCounter:
    """A ``transaction`` synchronizer counting the commits of one manager."""

    def __init__(self):
        self.commits = 0

    def newTransaction(self, txn):
        pass

    def beforeCompletion(self, txn):
        pass

    def afterCompletion(self, txn):
        self.commits += txn.status == Status.COMMITTED


class Writers:
    """Other connections writing to the rows the task works on.

    ``interfere(id)`` commits an update to that row once, from inside the
    task's first attempt at it: a conflict is certain.  The background thread
    keeps updating random rows all along.  Every committed write is counted.
    """

    def __init__(self, engine, schema):
        self.engine = engine
        self.sql = text(f'UPDATE "{schema}".items SET value = value + 1 WHERE id = :id')
        self.writes = dict.fromkeys(range(1, ITEMS + 1), 0)
        self.interfered = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.keep_writing)

    def write(self, item_id):
        with self.engine.begin() as connection:
            connection.execute(self.sql, {"id": item_id})
        self.writes[item_id] += 1

    def interfere(self, item_id):
        if item_id not in self.interfered:
            self.interfered.add(item_id)
            self.write(item_id)

    def keep_writing(self):
        chooser = random.Random(7)
        while not self.stop.is_set():
            self.write(chooser.randint(1, ITEMS))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(timeout=30)


def test_fifty_items_in_fifty_one_transactions_despite_a_concurrent_writer(db, caplog):
    settings, engine, schema = db
    counter = CommitCounter()

    def rebuild_all(self):
        request = self.get_request()
        session = request.dbsession
        request.tm.registerSynch(counter)

        @retryable(tm=request.tm, attempts=10)
        def ids():
            return list(
                session.execute(text(f'SELECT id FROM "{schema}".items')).scalars()
            )

        @retryable(tm=request.tm, attempts=10)
        def rebuild_one(item_id):
            sql = f'SELECT value FROM "{schema}".items WHERE id = :id'
            value = session.execute(text(sql), {"id": item_id}).scalar()
            writers.interfere(item_id)
            session.execute(
                text(
                    f'UPDATE "{schema}".items SET value = :v, processed = true '
                    "WHERE id = :id"
                ),
                {"v": value + 100, "id": item_id},
            )
            mark_changed(session)

        for item_id in sorted(ids()):
            rebuild_one(item_id)
        return "done"

    config = db_app(settings, (rebuild_all, PyramidTask))
    with (
        caplog.at_level(logging.WARNING, logger="pyramid_tasks"),
        Writers(engine, schema) as writers,
    ):
        assert config.registry.celery_app.tasks["rebuild_all"].delay().get() == "done"

    assert counter.commits == ITEMS + 1
    final = rows(engine, schema)
    assert all(processed for _, processed in final.values())
    assert {i: value for i, (value, _) in final.items()} == {
        i: 100 + writes for i, writes in writers.writes.items()
    }
    retries = [r for r in caplog.records if "rebuild_one: attempt" in r.getMessage()]
    assert len(retries) >= ITEMS  # each item conflicted at least once
    assert sum(writers.writes.values()) > ITEMS  # the background writer wrote too


def test_an_item_that_always_conflicts_exhausts_and_stops_the_task(db):
    settings, engine, schema = db

    def process(self):
        request = self.get_request()

        @retryable(tm=request.tm)
        def one(item_id):
            if item_id == 3:
                raise TransientError(f"item {item_id} conflicts")
            request.dbsession.execute(
                text(f'UPDATE "{schema}".items SET processed = true WHERE id = :id'),
                {"id": item_id},
            )
            mark_changed(request.dbsession)

        list(map(one, range(1, 6)))  # stops at the item that exhausts

    config = db_app(settings, (process, PyramidTask))
    with pytest.raises(RetryAttemptsExhausted) as info:
        config.registry.celery_app.tasks["process"].delay()
    assert info.value.attempts == 20  # the default tasks.retry.attempts
    assert str(info.value.__cause__) == "item 3 conflicts"
    processed = {i: p for i, (_, p) in rows(engine, schema).items() if i <= 5}
    assert processed == {1: True, 2: True, 3: False, 4: False, 5: False}


def test_nesting_inside_an_active_transaction_raises(db):
    settings, _, _ = db
    seen = []
    body = seen.append  # must never be called

    def inside_with(self):
        tm = self.get_request().tm
        with tm:
            retryable(tm=tm)(body)("ran")

    def inside_transactional(self):
        retryable(tm=self.get_request().tm)(body)("ran")

    config = db_app(
        settings,
        (inside_with, PyramidTask),
        (inside_transactional, TransactionalTask),
    )
    tasks = config.registry.celery_app.tasks
    with pytest.raises(AlreadyInTransaction, match=r"retryable list\.append\(\)"):
        tasks["inside_with"].delay()
    with pytest.raises(AlreadyInTransaction):
        tasks["inside_transactional"].delay()

    def view(request):
        return retryable(tm=request.tm)(body)("ran")

    config.add_route("nested", "/")
    config.add_view(view, route_name="nested")
    with pytest.raises(AlreadyInTransaction):
        webtest.TestApp(config.make_wsgi_app()).get("/")
    assert seen == []


def always_conflicting(self):
    request = self.get_request()
    calls = []

    @retryable(tm=request.tm, **self.request.kwargs.get("overrides", {}))
    def conflict():
        calls.append(1)
        raise TransientError("again")

    try:
        conflict()
    except RetryAttemptsExhausted as exc:
        return [exc.attempts, len(calls)]


def test_policy_comes_from_the_app_and_arguments_override_it(db):
    settings, _, _ = db

    def policy_probe(self, overrides=None):
        return always_conflicting(self)

    config = db_app(
        settings, (policy_probe, PyramidTask), **{"tasks.retry.attempts": "5"}
    )
    task = config.registry.celery_app.tasks["policy_probe"]
    assert task.delay().get() == [5, 5]
    assert task.delay(overrides={"attempts": 2}).get() == [2, 2]
    assert task.delay(overrides={"backoff": 0, "backoff_max": 0}).get() == [5, 5]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"attempts": 0}, "attempts=0"),
        ({"attempts": "3"}, "attempts='3'"),
        ({"attempts": True}, "attempts=True"),
        ({"backoff": -1}, "backoff=-1"),
        ({"backoff_max": float("inf")}, "backoff_max=inf"),
    ],
)
def test_bad_policy_arguments_name_the_argument(arguments, message):
    tm = transaction.TransactionManager(explicit=True)
    with pytest.raises(ValueError, match=rf"retryable\({message}\)"):
        retryable(tm=tm, **arguments)


def test_a_missing_transaction_manager_is_an_error_at_the_decorator():
    """Never a body run with no transaction at all."""
    ran = []
    with pytest.raises(TypeError, match=r"retryable\(tm=None\): expected a transac"):
        retryable(tm=None)
    # ``@retryable`` over a function, its call forgotten: the function is tm.
    with pytest.raises(TypeError, match=r"retryable\(tm=<built-in .*without its"):
        retryable(ran.append)

    with pytest.raises(TypeError, match=r"retryable\(tm='request.tm'\): expected"):
        retryable("request.tm")
    # Nothing is lent on this thread: None is not taken for a lent manager.
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute"):
        in_transaction(None, lambda: ran.append(1))
    assert ran == []


def test_outside_tasks_the_current_app_or_the_default_policy_applies(db):
    settings, engine, schema = db
    config = db_app(settings, **{"tasks.retry.attempts": "4"})
    config.include("pyramid_tm")
    config.commit()

    def exhaust(tm):
        @retryable(tm=tm, backoff=0)
        def conflict():
            raise TransientError("again")

        with pytest.raises(RetryAttemptsExhausted) as info:
            conflict()
        return info.value.attempts

    with prepare(registry=config.registry) as env:  # what pshell and bootstrap do
        assert exhaust(env["request"].tm) == 4

        @retryable(tm=env["request"].tm)
        def place():
            env["request"].dbsession.add(Order(email="shell@example.com"))
            return "placed"

        assert place() == "placed"
    with engine.connect() as connection:
        count = connection.scalar(text(f'SELECT count(*) FROM "{schema}".orders'))
    assert count == 1
    assert exhaust(transaction.TransactionManager(explicit=True)) == 20  # default


def test_tasks_scheduled_in_a_call_go_out_once_it_commits(db):
    settings, _, _ = db

    def child(self, attempt):
        """Captured, not run."""

    def parent(self):
        request = self.get_request()
        attempts = []

        @retryable(tm=request.tm)
        def step():
            attempts.append(len(attempts) + 1)
            request.celery_app.tasks["child"].apply_async(
                (attempts[-1],), tm=request.tm
            )
            if len(attempts) == 1:
                raise TransientError("retry me")

        step()

    config = db_app(
        settings,
        (child, ScheduleOnCommitTask),
        (parent, PyramidTask),
        **{"pyramid.includes": "pyramid_tasks.testing"},
    )
    config.registry.celery_app.tasks["parent"]()  # a direct call runs the body
    capture = get_task_capture(config.registry)
    assert [(t.name, t.args) for t in capture.sent] == [("child", (2,))]


def test_the_design_example_runs(db):
    """DESIGN.md's ``rebuild_all``, with the demo's orders as the assets."""
    settings, engine, schema = db

    def rebuild(request, order):
        order.status = f"rebuilt {order.id}"

    def rebuild_all(self):
        request = self.get_request()

        @retryable(tm=request.tm)
        def ids():
            return [a.id for a in request.dbsession.query(Order).all()]

        @retryable(tm=request.tm)
        def rebuild_one(asset_id):
            rebuild(request, request.dbsession.get(Order, asset_id))

        for asset_id in ids():  # transaction 1
            rebuild_one(asset_id)  # transactions 2..N, each short, each retried

    config = db_app(settings, (rebuild_all, PyramidTask))  # creates the tables
    with engine.begin() as connection:
        connection.execute(
            text(
                f'INSERT INTO "{schema}".orders (email, status) '
                "VALUES ('a', 'new'), ('b', 'new')"
            )
        )
    config.registry.celery_app.tasks["rebuild_all"].delay()
    with engine.connect() as connection:
        statuses = connection.execute(
            text(f'SELECT status FROM "{schema}".orders ORDER BY id')
        ).scalars()
        assert list(statuses) == ["rebuilt 1", "rebuilt 2"]
