"""pyramid_tasks.testing, used the way application tests use it."""

import pytest
import transaction
import webtest
from pyramid.config import Configurator
from pyramid.scripting import prepare

from demo_app import main
from demo_app.models import Order, get_tm_session
from demo_app.views import place_order
from pyramid_tasks import ScheduleOnCommitTask, TransactionalTask
from pyramid_tasks.testing import get_task_capture


@pytest.fixture
def settings(tmp_path):
    return {
        "sqlalchemy.url": f"sqlite:///{tmp_path}/test.sqlite",
        "demo.create_tables": "true",
        "tasks.site_url": "https://shop.example.com",
        "pyramid.includes": "pyramid_tasks.testing",
    }


@pytest.fixture
def app(settings):
    return main({}, **settings)


@pytest.fixture
def tm():
    """The cookiecutter's test transaction: doomed, it never commits."""
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    tm.doom()
    yield tm
    tm.abort()


@pytest.fixture
def app_request(app, tm):
    """The cookiecutter's ``app_request`` fixture."""
    with prepare(registry=app.registry) as env:
        request = env["request"]
        request.tm = tm
        factory = app.registry["dbsession_factory"]
        request.dbsession = get_tm_session(factory, tm, request=request)
        yield request


def test_a_view_schedules_in_the_cookiecutter_recipe(app, app_request, tm):
    app_request.method = "POST"
    app_request.POST["email"] = "ann@example.com"
    place_order(app_request)

    capture = get_task_capture(app.registry)
    [scheduled] = capture.pending(tm)
    order = app_request.dbsession.query(Order).one()
    assert scheduled.name == "demo_app.tasks.confirm_order"
    assert scheduled.args == (order.id,)
    assert capture.sent == []  # the doomed transaction never commits


def test_functional_test_sees_sent_tasks_and_runs_them(app):
    browser = webtest.TestApp(app)
    browser.post("/orders", {"email": "bob@example.com"}, status=302)

    capture = get_task_capture(app.registry)
    assert [task.name for task in capture.sent] == ["demo_app.tasks.confirm_order"]
    assert browser.get("/orders/1").json["status"] == "new"  # nothing ran yet
    assert capture.run_sent() == ["https://shop.example.com/orders/1"]
    assert capture.sent == []
    assert browser.get("/orders/1").json["status"] == "confirmed"


def test_capture_honours_abort_and_savepoints(app):
    def echo(value):
        return value

    config = Configurator(registry=app.registry)
    config.add_task(echo, base=ScheduleOnCommitTask, name="t.echo")
    config.commit()
    task = app.registry.celery_app.tasks["t.echo"]
    capture = get_task_capture(app.registry)
    tm = transaction.TransactionManager(explicit=True)

    with tm:
        task.apply_async(("kept",), tm=tm)
        savepoint = tm.savepoint()
        task.apply_async(("rolled back",), tm=tm)
        assert [t.args for t in capture.pending(tm)] == [("kept",), ("rolled back",)]
        savepoint.rollback()
    tm.begin()
    task.apply_async(("aborted",), tm=tm)
    tm.abort()
    assert capture.pending(tm) == []
    result = task.delay("at once")
    assert [t.args for t in capture.sent] == [("kept",), ("at once",)]
    assert capture.sent[-1].task_id == result.id
    assert capture.sent[0].run() == "kept"
    tm.begin()
    assert capture.pending(tm) == []  # an open transaction with nothing in it
    tm.abort()
    capture.clear()
    assert capture.sent == []


def test_capture_wins_over_eager_mode(settings):
    app = main({}, **settings, **{"celery.task_always_eager": "true"})
    browser = webtest.TestApp(app)
    browser.post("/orders", {"email": "cy@example.com"}, status=302)
    assert browser.get("/orders/1").json["status"] == "new"
    assert len(get_task_capture(app.registry).sent) == 1


def test_only_the_task_run_joins_the_tests_transaction(app):
    """A task its body calls directly runs as it would on a worker: in a
    request and transaction of its own."""
    seen = {}

    def inner(self):
        seen["inner"] = self.get_request().tm
        seen["inner active"] = self.get_request().tm.get().status

    def outer(self, value):
        request = self.get_request()
        seen["outer"] = (request.tm, request.marker)
        app.registry.celery_app.tasks["t.inner"]()
        return value

    config = Configurator(registry=app.registry)
    config.add_task(inner, bind=True, base=TransactionalTask, name="t.inner")
    config.add_task(outer, bind=True, base=TransactionalTask, name="t.outer")
    config.commit()
    capture = get_task_capture(app.registry)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        app.registry.celery_app.tasks["t.outer"].apply_async(("done",), tm=tm)
        assert capture.run_pending(tm, request_attributes={"marker": "lent"}) == [
            "done"
        ]
        assert seen["outer"] == (tm, "lent")
        assert seen["inner"] is not tm
        assert seen["inner active"] == "Active"
        assert tm.get().status == "Active"  # the test's, still open


@pytest.fixture
def echo(app):
    def echo(value):
        return value

    config = Configurator(registry=app.registry)
    config.add_task(echo, base=ScheduleOnCommitTask, name="t.echo")
    config.commit()
    return app.registry.celery_app.tasks["t.echo"]


def test_a_savepoint_drops_what_was_scheduled_after_it_once_tasks_ran(app, echo):
    capture = get_task_capture(app.registry)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        echo.apply_async(("before",), tm=tm)
        savepoint = tm.savepoint()
        assert capture.run_pending(tm) == ["before"]
        echo.apply_async(("after",), tm=tm)
        savepoint.rollback()
        assert capture.pending(tm) == []

        late = tm.savepoint()
        echo.apply_async(("kept",), tm=tm)
        inner = tm.savepoint()
        echo.apply_async(("dropped",), tm=tm)
        assert capture.run_pending(tm) == ["kept", "dropped"]
        echo.apply_async(("also dropped",), tm=tm)
        inner.rollback()
        assert capture.pending(tm) == []
        echo.apply_async(("sent",), tm=tm)
        late.rollback()
        echo.apply_async(("sent",), tm=tm)
    # What ran in the transaction is not sent again by its commit.
    assert [t.args for t in capture.sent] == [("sent",)]


def test_run_takes_a_task_off_the_list_it_came_from(app, echo):
    """Each captured task is run once by the helpers, as a broker delivers
    a message once; running the same object again is explicit."""
    capture = get_task_capture(app.registry)
    capture.clear()
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        echo.apply_async(("first",), tm=tm)
        echo.apply_async(("second",), tm=tm)
        first, second = capture.pending(tm)
        assert first.run(tm=tm) == "first"
        assert [t.args for t in capture.pending(tm)] == [("second",)]
        assert second.run() == "second"  # its own transaction: taken all the same
        assert capture.pending(tm) == []
        assert capture.run_pending(tm) == []
        assert first.run(tm=tm) == "first"  # the same object, run again
        echo.apply_async(("third",), tm=tm)
    [third] = capture.sent  # the commit sent only what had not run
    echo.delay("fourth")
    assert third.run() == "third"
    assert [t.args for t in capture.sent] == [("fourth",)]
    assert capture.run_sent() == ["fourth"]
    assert third.run() == "third"
