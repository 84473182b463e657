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
        assert capture.run_pending(tm, marker="lent") == ["done"]
        assert seen["outer"] == (tm, "lent")
        assert seen["inner"] is not tm
        assert seen["inner active"] == "Active"
        assert tm.get().status == "Active"  # the test's, still open
