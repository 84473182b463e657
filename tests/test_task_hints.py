"""The two transaction mistakes a new task body makes, named in their errors.

A plain ``PyramidTask`` that uses ``request.dbsession`` outside ``with
request.tm:`` gets ``NoTransaction`` from zope.sqlalchemy, and a
``TransactionalTask`` body that writes ``with request.tm:`` gets
``AlreadyInTransaction`` from ``begin()``: bare, without a message.  Both are
raised again with one (same type, chained from the original), on a real
SQLite database through the cookiecutter app's models.
"""

import pytest
import sqlalchemy
import transaction
from pyramid.config import Configurator
from transaction.interfaces import AlreadyInTransaction, NoTransaction

from pyramid_tasks import (
    EagerTaskFailed,
    PyramidTask,
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    retryable,
)
from tests.pkgs.cookiecutter_app.models import Order
from tests.pkgs.cookiecutter_app.models.meta import Base

from .conftest import wait_for

NO_TRANSACTION = (
    "task {}: request.tm is an explicit transaction manager with no transaction: "
    "wrap the database work in `with request.tm:` or use base=TransactionalTask "
    "/ RetryableTransactionTask"
)
ALREADY_IN_TRANSACTION = (
    "task {}: the body of a TransactionalTask already runs inside request.tm; "
    "remove `with request.tm:` (or use base=PyramidTask to manage transactions "
    "yourself)"
)

runs = []
orders = {}  # email -> the child task test_a_failed_eager_child... gives checkout


def place_bare(self, email):
    """The mistake: the database work of a plain task outside ``request.tm``."""
    runs.append("place_bare")
    request = self.get_request()
    request.dbsession.add(Order(email=email))  # joins request.tm: raises


def place_in_tm(self, email):
    """Right in a plain task; the reverse mistake in a transactional one."""
    runs.append("place_in_tm")
    request = self.get_request()
    with request.tm:
        request.dbsession.add(Order(email=email))
    return email


def count_in_retryable(self):
    """``retryable`` in a transactional body: its own error, already worded."""
    request = self.get_request()
    return retryable(tm=request.tm)(request.dbsession.query(Order).count)()


def other_managers_error(self):
    self.get_request()
    transaction.TransactionManager(explicit=True).get()


def no_request(self):
    raise NoTransaction()


def checkout(self, email):
    """A transactional parent whose child, run eagerly at its commit, errs."""
    request = self.get_request()
    request.dbsession.add(Order(email=email))
    orders[email].apply_async((email,), tm=request.tm)


def make_app(tmp_path, eager=True):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/hints.sqlite")
    Base.metadata.create_all(engine)
    settings = {
        "dbengine": engine,
        "celery.broker_url": "memory://",
        "celery.task_always_eager": str(eager).lower(),
        "celery.task_eager_propagates": str(eager).lower(),
        "tasks.retry.backoff": "0",
    }
    config = Configurator(settings=settings)
    config.include("tests.pkgs.cookiecutter_app.models")
    config.include("pyramid_tasks")
    config.add_route("order", "/orders/{id}")
    tasks = [
        (place_bare, PyramidTask, "place_bare"),
        (place_bare, ScheduleOnCommitTask, "place_bare_soc"),
        (place_in_tm, PyramidTask, "place_in_tm"),
        (place_in_tm, TransactionalTask, "place_nested"),
        (place_in_tm, RetryableTransactionTask, "place_nested_retryable"),
        (count_in_retryable, TransactionalTask, "count_in_retryable"),
        (other_managers_error, PyramidTask, "other_managers_error"),
        (no_request, PyramidTask, "no_request"),
        (checkout, TransactionalTask, "checkout"),
    ]
    for body, base, name in tasks:
        config.add_task(body, bind=True, base=base, name=name)
    config.commit()
    runs.clear()
    return config.registry.celery_app, engine


def count_orders(engine):
    with engine.connect() as connection:
        return connection.scalar(sqlalchemy.text("SELECT count(*) FROM orders"))


def assert_hint(info, message):
    error = info.value
    assert str(error) == message
    assert type(error.__cause__) is type(error)  # the bare one, from transaction
    assert error.__cause__.args == ()


@pytest.mark.parametrize("name", ["place_bare", "place_bare_soc"])
def test_a_plain_task_using_the_session_outside_request_tm_is_told_why(tmp_path, name):
    app, engine = make_app(tmp_path)
    task = app.tasks[name]
    message = NO_TRANSACTION.format(name)
    with pytest.raises(NoTransaction) as eager:  # eager, propagating
        task.delay("ann@example.com")
    assert_hint(eager, message)
    with pytest.raises(NoTransaction) as direct:  # called directly
        task("bo@example.com")
    assert_hint(direct, message)
    assert runs == [name.removesuffix("_soc")] * 2
    assert count_orders(engine) == 0

    # The fix the message gives: the same work inside `with request.tm:`.
    assert app.tasks["place_in_tm"].delay("cy@example.com").get() == "cy@example.com"
    assert count_orders(engine) == 1


def test_apply_without_a_worker_stores_the_hint(tmp_path):
    app, engine = make_app(tmp_path, eager=False)
    result = app.tasks["place_bare"].apply(("ann@example.com",))
    assert result.failed()
    assert isinstance(result.result, NoTransaction)
    assert str(result.result) == NO_TRANSACTION.format("place_bare")
    assert "NoTransaction: task place_bare: request.tm is" in result.traceback
    with pytest.raises(NoTransaction, match="wrap the database work in"):
        result.get()

    nested = app.tasks["place_nested"].apply(("bo@example.com",))
    assert isinstance(nested.result, AlreadyInTransaction)
    assert str(nested.result) == ALREADY_IN_TRANSACTION.format("place_nested")
    assert runs == ["place_bare", "place_in_tm"]
    assert count_orders(engine) == 0


@pytest.mark.parametrize("name", ["place_nested", "place_nested_retryable"])
def test_with_request_tm_in_a_transactional_body_is_told_why(tmp_path, name):
    app, engine = make_app(tmp_path)
    with pytest.raises(AlreadyInTransaction) as eager:
        app.tasks[name].delay("ann@example.com")
    assert_hint(eager, ALREADY_IN_TRANSACTION.format(name))
    with pytest.raises(AlreadyInTransaction) as direct:
        app.tasks[name]("bo@example.com")
    assert_hint(direct, ALREADY_IN_TRANSACTION.format(name))
    # Not retryable: one run each, the task's transaction aborted.
    assert runs == ["place_in_tm"] * 2
    assert count_orders(engine) == 0


def test_errors_not_raised_by_request_tm_are_left_as_they_are(tmp_path):
    app, _ = make_app(tmp_path)
    # retryable's own AlreadyInTransaction already says what to do
    with pytest.raises(AlreadyInTransaction, match=r"retryable .*count\(\) was"):
        app.tasks["count_in_retryable"].delay()
    # another manager's NoTransaction, and one raised before any request
    for name in ("other_managers_error", "no_request"):
        with pytest.raises(NoTransaction) as info:
            app.tasks[name].delay()
        assert info.value.args == ()
        assert info.value.__cause__ is None


def test_a_failed_eager_child_reaches_the_parent_with_its_hint(tmp_path):
    app, engine = make_app(tmp_path)
    orders["ann@example.com"] = app.tasks["place_bare_soc"]
    orders["bo@example.com"] = app.tasks["place_nested"]
    try:
        with pytest.raises(EagerTaskFailed) as failed:
            app.tasks["checkout"].delay("ann@example.com")
        assert "request.tm is an explicit transaction manager" in str(failed.value)
        assert str(failed.value.__cause__) == NO_TRANSACTION.format("place_bare_soc")
        assert count_orders(engine) == 1  # the parent committed, the child failed

        with pytest.raises(EagerTaskFailed) as failed:
            app.tasks["checkout"].delay("bo@example.com")
        assert str(failed.value.__cause__) == ALREADY_IN_TRANSACTION.format(
            "place_nested"
        )
        assert count_orders(engine) == 2
        assert runs == ["place_bare", "place_in_tm"]
    finally:
        orders.clear()


def test_a_worker_reports_the_hints(start_worker):
    worker = start_worker("-P", "solo")
    tasks = worker.celery_app.tasks
    outside = tasks["tests.probe_app.query_outside_tm"].delay()
    nested = tasks["tests.probe_app.nested_tm"].delay()
    with pytest.raises(NoTransaction) as info:
        outside.get(timeout=60)
    assert str(info.value) == NO_TRANSACTION.format("tests.probe_app.query_outside_tm")
    with pytest.raises(AlreadyInTransaction) as info:
        nested.get(timeout=60)
    assert str(info.value) == ALREADY_IN_TRANSACTION.format("tests.probe_app.nested_tm")
    # The worker's own ERROR lines say it too (logged after the result is stored).
    hints = ("wrap the database work in `with", "remove `with request.tm:`")
    wait_for(lambda: all(h in worker.log for h in hints), message="the worker log")
