"""Eager mode outside views: scripts, transactional tasks, retry()."""

import logging

import pytest
import transaction
from celery.exceptions import Retry
from pyramid.config import Configurator

from pyramid_tasks import (
    EagerTaskFailed,
    ScheduleOnCommitTask,
    TransactionalTask,
    retryable,
)
from pyramid_tasks.publish import raise_eager_errors


def make_app(propagate=True, **settings):
    config = Configurator(
        settings={
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "celery.task_eager_propagates": str(propagate).lower(),
            **settings,
        }
    )
    config.include("pyramid_tasks")
    runs = []

    def child(self, value):
        runs.append(value)
        if value == "boom":
            raise LookupError("child failed")
        return value

    def parent(self, value):
        request = self.get_request()
        request.celery_app.tasks["child"].apply_async((value,), tm=request.tm)
        runs.append(f"parent {value}")

    def flaky(self):
        runs.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0, max_retries=3)
        return "third time"

    config.add_task(child, bind=True, base=ScheduleOnCommitTask, name="child")
    config.add_task(parent, bind=True, base=TransactionalTask, name="parent")
    config.add_task(flaky, bind=True, base=ScheduleOnCommitTask, name="flaky")
    config.commit()
    return config.registry.celery_app, runs


def test_a_transactional_task_fails_when_its_eager_child_fails():
    app, runs = make_app()
    assert app.tasks["parent"].delay("ok").get() is None
    with pytest.raises(EagerTaskFailed, match=r"child\[.*LookupError") as info:
        app.tasks["parent"].delay("boom")
    assert isinstance(info.value.__cause__, LookupError)
    assert runs == ["parent ok", "ok", "parent boom", "boom"]


def test_scripts_get_the_error_logged(caplog):
    app, runs = make_app()
    tm = transaction.TransactionManager(explicit=True)
    with caplog.at_level(logging.ERROR), tm:
        app.tasks["child"].apply_async(("boom",), tm=tm)
    assert runs == ["boom"]
    assert "child failed" in caplog.text
    with pytest.raises(EagerTaskFailed):
        raise_eager_errors(tm)  # and kept for whoever raises them
    raise_eager_errors(tm)  # once


def test_an_old_eager_error_is_not_raised_by_a_later_call():
    app, _ = make_app()
    tm = transaction.TransactionManager(explicit=True)
    with tm:  # a script: the error is logged and kept, nobody raises it
        app.tasks["child"].apply_async(("boom",), tm=tm)

    @retryable(tm=tm)
    def unrelated():
        return "fine"

    assert unrelated() == "fine"


def test_the_thread_local_manager_works_as_tm():
    app, runs = make_app()
    with transaction.manager:
        app.tasks["child"].apply_async(
            ("via transaction.manager",), tm=transaction.manager
        )
        assert runs == []
    assert runs == ["via transaction.manager"]


def test_celery_retry_in_eager_mode_reruns_without_deferring():
    app, runs = make_app(propagate=False)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        result = app.tasks["flaky"].apply_async(tm=tm)
    assert runs == [0, 1, 2]
    assert result.id
    # As in plain Celery, task_eager_propagates makes retry() raise Retry.
    app, runs = make_app(propagate=True)
    with pytest.raises(Retry):
        app.tasks["flaky"].delay()
    assert runs == [0]


def test_explicit_queue_gets_the_prefix(redis_url, redis_client):
    import uuid

    prefix = f"pt{uuid.uuid4().hex[:8]}"
    app, _ = make_app(
        **{
            "celery.task_always_eager": "false",
            "celery.broker_url": redis_url,
            "tasks.queue_prefix": prefix,
        }
    )
    try:
        app.tasks["child"].apply_async(("x",), queue="mail")
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            app.tasks["child"].apply_async(("y",), queue="mail", tm=tm)
        assert redis_client.llen(f"{prefix}.mail") == 2
        assert redis_client.llen("mail") == 0
    finally:
        redis_client.delete(f"{prefix}.mail")
