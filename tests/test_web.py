"""Views under pyramid_tm and pyramid_retry, through a real WSGI app (WebTest)."""

import logging

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.response import Response
from pyramid.threadlocal import get_current_request
from transaction.interfaces import TransientError

from pyramid_tasks import EagerTaskFailed, NoActiveTransaction, ScheduleOnCommitTask

from .conftest import NullDataManager
from .test_schedule_on_commit import echo, published


class Recorder(NullDataManager):
    """A data manager that records when the web transaction finished."""

    def __init__(self, events):
        self.events = events

    def tpc_finish(self, txn):
        self.events.append("web transaction committed")


def no_tm_under_static(request):
    return not request.path.startswith("/static")


def make_app(settings, events, body=echo):
    config = Configurator(
        settings={
            "tm.manager_hook": "pyramid_tm.explicit_manager",
            "tm.commit_veto": "pyramid_tm.default_commit_veto",
            "tm.activate_hook": "tests.test_web.no_tm_under_static",
            "retry.attempts": "3",
            **settings,
        }
    )
    config.include("pyramid_tm")
    config.include("pyramid_retry")
    config.include("pyramid_tasks")
    config.add_task(body, bind=True, base=ScheduleOnCommitTask, name="t.echo")

    def schedule(request, *args, record=True):
        if record:
            request.tm.get().join(Recorder(events))
        return request.celery_app.tasks["t.echo"].apply_async(args, tm=request.tm)

    def view(request):
        action = request.matchdict["action"]
        if action == "ok":
            schedule(request, "ok")
        elif action == "fail":
            schedule(request, "fail")
            raise ValueError("view failed")
        elif action == "veto":
            schedule(request, "veto")
            return Response("server error", status=500)
        elif action == "retry":
            attempt = len([e for e in events if e.startswith("attempt")]) + 1
            events.append(f"attempt {attempt}")
            schedule(request, f"attempt {attempt}")
            if attempt == 1:
                raise TransientError("conflict, try again")
        elif action == "fail-eagerly":
            schedule(request, "fail")
        elif action == "late":
            request.add_response_callback(
                lambda r, _: schedule(r, "late", record=False)
            )
        return Response(action)

    config.add_route("action", "/{action}")
    config.add_view(view, route_name="action")
    config.add_route("static", "/static/x")
    config.add_view(
        lambda r: Response(schedule(r, "static", record=False).id), route_name="static"
    )
    return webtest.TestApp(config.make_wsgi_app())


@pytest.fixture
def broker(redis_url, queue, redis_client):
    yield {"celery.broker_url": redis_url, "celery.task_default_queue": queue}
    redis_client.delete(queue)


@pytest.fixture
def queue():
    from uuid import uuid4

    return f"pyramid_tasks_test_{uuid4().hex[:12]}"


def sent_args(redis_client, queue):
    return [args for _, _, args in published(redis_client, queue)]


def test_committed_view_sends_after_the_commit(broker, redis_client, queue):
    events = []
    app = make_app(broker, events)
    app.get("/ok")
    assert events == ["web transaction committed"]
    assert sent_args(redis_client, queue) == [["ok"]]
    app.get("/nothing")  # a view that schedules nothing sends nothing
    assert sent_args(redis_client, queue) == [["ok"]]


def test_failing_view_and_commit_veto_send_nothing(broker, redis_client, queue):
    app = make_app(broker, [])
    with pytest.raises(ValueError, match="view failed"):
        app.get("/fail")
    app.get("/veto", status=500)
    assert sent_args(redis_client, queue) == []


def test_only_the_final_pyramid_retry_attempt_sends(broker, redis_client, queue):
    events = []
    make_app(broker, events).get("/retry")
    assert events[:2] == ["attempt 1", "attempt 2"]
    assert sent_args(redis_client, queue) == [["attempt 2"]]


def test_scheduling_after_pyramid_tm_finished_is_an_error(broker, redis_client, queue):
    app = make_app(broker, [])
    with pytest.raises(NoActiveTransaction):
        app.get("/late")
    with pytest.raises(NoActiveTransaction):
        app.get("/static/x")  # pyramid_tm is not active for this request
    assert sent_args(redis_client, queue) == []


EAGER = {"celery.broker_url": "memory://", "celery.task_always_eager": "true"}


def eager_app(events, propagate):
    def record(self, value):
        request = self.get_request()
        events.append(
            {
                "value": value,
                "after web commit": "web transaction committed" in events,
                "own request": get_current_request() is request,
                "tm": request.tm,
            }
        )
        if value == "fail":
            raise LookupError("eager task failed")

    settings = {**EAGER, "celery.task_eager_propagates": str(propagate).lower()}
    return make_app(settings, events, body=record)


def test_eager_task_runs_after_the_commit_in_its_own_request():
    events = []
    eager_app(events, propagate=True).get("/ok")
    run = events[1]
    assert events[0] == "web transaction committed"
    assert run["value"] == "ok"
    assert run["after web commit"] and run["own request"]
    assert run["tm"].explicit


def test_eager_exception_reaches_the_caller_when_propagating():
    events = []
    app = eager_app(events, propagate=True)
    with pytest.raises(EagerTaskFailed, match="eager task failed") as info:
        app.get("/fail-eagerly")
    assert isinstance(info.value.__cause__, LookupError)
    # The web transaction itself committed before the task ran.
    assert events[0] == "web transaction committed"


def test_eager_exception_is_logged_when_not_propagating(caplog):
    events = []
    app = eager_app(events, propagate=False)
    with caplog.at_level(logging.ERROR):
        app.get("/fail-eagerly", status=200)
    assert "eager task failed" in caplog.text
    assert any(record.exc_info for record in caplog.records)


def test_an_eager_transient_error_does_not_rerun_the_committed_view():
    """pyramid_retry retries TransientError: the view must still run once."""
    events = []

    def conflicted(self, value):
        raise TransientError("the eager task conflicted")

    settings = {**EAGER, "celery.task_eager_propagates": "true"}
    app = make_app(settings, events, body=conflicted)
    with pytest.raises(EagerTaskFailed):
        app.get("/ok")
    assert events == ["web transaction committed"]


def test_the_eager_tween_lets_apps_without_pyramid_tm_be():
    config = Configurator(settings={**EAGER, "celery.task_eager_propagates": "true"})
    config.include("pyramid_tasks")
    config.add_route("plain", "/")
    config.add_view(lambda request: Response("no pyramid_tm"), route_name="plain")
    assert webtest.TestApp(config.make_wsgi_app()).get("/").text == "no pyramid_tm"
