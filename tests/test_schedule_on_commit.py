"""ScheduleOnCommitTask: sent after a successful commit, and only then.

Real ``transaction`` managers and a real Redis broker: what was published is
read back from the broker's queue.
"""

import base64
import json
import logging
import time
import uuid
from contextlib import contextmanager
from functools import partial

import kombu.transport.redis
import pytest
import redis
import transaction
from celery import group
from celery.signals import before_task_publish
from kombu.exceptions import EncodeError
from kombu.pools import ProducerPool
from pyramid.config import Configurator
from transaction.interfaces import DoomedTransaction

from pyramid_tasks import NoActiveTransaction, ScheduleOnCommitTask

from .conftest import NullDataManager, free_port


class FailingVote(NullDataManager):
    """A data manager whose vote fails: the commit fails after our join."""

    def tpc_vote(self, txn):
        raise RuntimeError("vote failed")


def echo(self, *args, **kwargs):
    return [args, kwargs]


def other(self, value):
    return value


@pytest.fixture
def queue():
    return f"pyramid_tasks_test_{uuid.uuid4().hex[:12]}"


def make_app(broker_url, queue, **settings):
    config = Configurator(
        settings={
            "celery.broker_url": broker_url,
            "celery.task_default_queue": queue,
            **settings,
        }
    )
    config.include("pyramid_tasks")
    config.add_task(echo, bind=True, base=ScheduleOnCommitTask, name="t.echo")
    config.add_task(other, bind=True, base=ScheduleOnCommitTask, name="t.other")
    config.commit()
    return config.registry.celery_app


@pytest.fixture
def app(redis_url, queue, redis_client):
    app = make_app(redis_url, queue)
    yield app
    redis_client.delete(queue)
    app.close()


def published(redis_client, queue):
    """``[(task name, id, args)]`` of the messages in ``queue``, oldest first."""
    messages = []
    for raw in reversed(redis_client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        messages.append((headers["task"], headers["id"], body[0]))
    return messages


def test_sent_after_commit_with_the_id_returned_at_the_call(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        result = app.tasks["t.echo"].apply_async((1, 2), tm=tm)
        assert result.id
        assert published(redis_client, queue) == []
    assert published(redis_client, queue) == [("t.echo", result.id, [1, 2])]


def test_abort_and_exceptions_send_nothing(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    app.tasks["t.echo"].apply_async((1,), tm=tm)
    tm.abort()
    with pytest.raises(ValueError), tm:
        app.tasks["t.echo"].apply_async((2,), tm=tm)
        raise ValueError("the view failed")
    assert published(redis_client, queue) == []


def test_doomed_transaction_sends_nothing(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    app.tasks["t.echo"].apply_async((1,), tm=tm)
    tm.doom()
    with pytest.raises(DoomedTransaction):
        tm.commit()
    tm.abort()
    assert published(redis_client, queue) == []


def test_failed_commit_sends_nothing(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    txn = tm.begin()
    app.tasks["t.echo"].apply_async((1,), tm=tm)
    txn.join(FailingVote())
    with pytest.raises(RuntimeError, match="vote failed"):
        tm.commit()
    tm.abort()
    assert published(redis_client, queue) == []


def test_savepoint_rollback_drops_only_later_tasks(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    echo_task = app.tasks["t.echo"]
    with tm:
        echo_task.apply_async(("before",), tm=tm)
        savepoint = tm.savepoint()
        echo_task.apply_async(("dropped",), tm=tm)
        inner = tm.savepoint()
        echo_task.apply_async(("dropped too",), tm=tm)
        inner.rollback()
        savepoint.rollback()
        echo_task.apply_async(("after",), tm=tm)
    assert [args for _, _, args in published(redis_client, queue)] == [
        ["before"],
        ["after"],
    ]


def test_no_active_transaction_is_an_error_at_the_call(app):
    echo_task = app.tasks["t.echo"]
    explicit = transaction.TransactionManager(explicit=True)
    with pytest.raises(NoActiveTransaction, match=r"t\.echo.*no transaction"):
        echo_task.apply_async((1,), tm=explicit)
    implicit = transaction.TransactionManager()
    with pytest.raises(NoActiveTransaction):
        echo_task.apply_async((1,), tm=implicit)
    assert implicit._txn is None, "no transaction was started behind the caller"
    with pytest.raises(NoActiveTransaction):
        echo_task.apply_async((1,), tm=transaction.ThreadTransactionManager())


def test_scheduling_from_an_after_commit_hook_is_an_error(app):
    tm = transaction.TransactionManager(explicit=True)
    errors = []

    def hook(committed):
        try:
            app.tasks["t.echo"].apply_async((1,), tm=tm)
        except NoActiveTransaction as exc:
            errors.append(exc)

    with tm as txn:
        txn.addAfterCommitHook(hook)
    assert "committed transaction" in str(errors[0])


def test_calling_the_task_runs_the_body_in_process(app):
    assert app.tasks["t.echo"](1, k=2) == [(1,), {"k": 2}]
    assert app.tasks["t.other"]("value") == "value"


def test_without_tm_the_task_is_sent_at_once(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    result = app.tasks["t.echo"].apply_async((1,))
    assert published(redis_client, queue) == [("t.echo", result.id, [1])]
    tm.abort()
    app.tasks["t.other"].delay(5)
    assert len(published(redis_client, queue)) == 2


def test_arguments_are_serialized_at_the_call(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        with pytest.raises(EncodeError, match=r"t\.echo"):
            app.tasks["t.echo"].apply_async((object(),), tm=tm)
        items = ["original"]
        app.tasks["t.echo"].apply_async((items,), kwargs={"k": 1}, tm=tm)
        items.append("changed after the call")
    assert published(redis_client, queue)[0][2] == [["original"]]


def test_canvas_signatures_take_tm(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        app.tasks["t.echo"].s(1).apply_async(tm=tm)
        (app.tasks["t.echo"].s(2) | app.tasks["t.other"].s()).apply_async(tm=tm)
        # A group hands each task the producer it holds during the call.
        group(app.tasks["t.echo"].s(3), app.tasks["t.echo"].s(4)).apply_async(tm=tm)
        assert published(redis_client, queue) == []
    assert [args for _, _, args in published(redis_client, queue)] == [
        [1],
        [2],
        [3],
        [4],
    ]


def test_one_producer_for_the_whole_batch(app, redis_client, queue, monkeypatch):
    acquired = []
    original = ProducerPool.acquire

    def counting_acquire(pool, *args, **kwargs):
        acquired.append(pool)
        return original(pool, *args, **kwargs)

    monkeypatch.setattr(ProducerPool, "acquire", counting_acquire)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        for number in range(10):
            app.tasks["t.echo"].apply_async((number,), tm=tm)
    assert len(published(redis_client, queue)) == 10
    assert len(acquired) == 1


def test_a_large_batch_arrives_whole_in_order(app, redis_client, queue):
    """Pipelined in chunks: every task once, in the order of the calls."""
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        ids = [app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in range(2500)]
    messages = published(redis_client, queue)
    assert [task_id for _, task_id, _ in messages] == ids
    assert [args for _, _, args in messages] == [[n] for n in range(2500)]


@contextmanager
def on_publish(number, action):
    """Yield the ids Celery publishes; run ``action()`` before the ``number``th."""
    publishes = []

    def receiver(sender=None, headers=None, **kwargs):
        publishes.append(headers["id"])
        if len(publishes) == number:
            action()

    before_task_publish.connect(receiver, weak=False)
    try:
        yield publishes
    finally:
        before_task_publish.disconnect(receiver)


def out_of_memory(private_redis, queue):
    """An app on a private Redis with its queue declared (a write of its own),
    then every push refused: ``(app, client)``."""
    app = make_app(private_redis, queue)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        app.tasks["t.echo"].apply_async(("warm-up",), tm=tm)
    client = redis.Redis.from_url(private_redis)
    client.delete(queue)
    client.config_set("maxmemory", 1)  # OOM
    return app, client


def send_around_a_broken_queue(app, redis_client, queue):
    """Four tasks on commit, the third to a queue whose key is not a list
    (WRONGTYPE when declared): ``(ids of the good ones, id of the bad one)``."""
    broken = f"{queue}_broken"
    redis_client.set(broken, "not a list")
    tm = transaction.TransactionManager(explicit=True)
    echo_task = app.tasks["t.echo"]
    with tm:
        good = [echo_task.apply_async((n,), tm=tm).id for n in range(2)]
        bad = echo_task.apply_async((2,), tm=tm, queue=broken).id
        good.append(echo_task.apply_async((3,), tm=tm).id)
    redis_client.delete(broken)
    return good, bad


def test_a_failed_pipeline_is_sent_again_one_at_a_time(private_redis, queue, caplog):
    """Redis refuses the pipeline's pushes (out of memory); once it accepts
    writes again, each task is sent on its own: none lost, none twice."""
    app, client = out_of_memory(private_redis, queue)
    writable = partial(client.config_set, "maxmemory", 0)
    tm = transaction.TransactionManager(explicit=True)
    # The five of the pipeline, then the first resend: writable again.
    with (
        on_publish(6, writable) as publishes,
        caplog.at_level(logging.WARNING, logger="pyramid_tasks"),
        tm,
    ):
        ids = [app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in range(5)]
    assert [task_id for _, task_id, _ in published(client, queue)] == ids
    assert publishes == ids + ids
    [warning] = caplog.records
    assert "Sending 5 committed tasks one at a time" in warning.getMessage()
    assert "maxmemory" in warning.getMessage()
    app.close()


def test_a_queue_redis_refuses_costs_only_its_own_task(
    app, redis_client, queue, caplog
):
    """The pipeline is never sent, each task goes alone, and only the one of
    the broken queue is reported."""
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        good, bad = send_around_a_broken_queue(app, redis_client, queue)
    assert [task_id for _, task_id, _ in published(redis_client, queue)] == good
    warning, error = caplog.records
    assert "Sending 4 committed tasks one at a time" in warning.getMessage()
    assert error.args[:2] == ("t.echo", bad)
    assert "WRONGTYPE" in error.getMessage()


def test_a_failed_pipeline_then_no_broker_reports_each_as_uncertain(
    private_redis, queue, caplog
):
    """The pipeline failed, then the broker went away before the resend:
    each task is reported, saying the pipeline may have delivered it."""
    app, client = out_of_memory(private_redis, queue)
    tm = transaction.TransactionManager(explicit=True)
    # The three of the pipeline, then the first resend: the broker is gone.
    with (
        on_publish(4, partial(client.shutdown, nosave=True)),
        caplog.at_level(logging.ERROR, logger="pyramid_tasks"),
        tm,
    ):
        ids = [app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in range(3)]
    assert [r.args[1] for r in caplog.records] == ids
    assert all("may have been delivered" in r.getMessage() for r in caplog.records)
    app.close()


@pytest.fixture
def unpipelined(monkeypatch):
    """Redis standing in for a transport that cannot pipeline (AMQP, SQS):
    kombu's Redis channel says so, and each task is sent as it comes.
    (``retry_on_timeout`` did this once; the publishing connection never has
    it now.)"""
    for cls in (kombu.transport.redis.Transport, kombu.transport.redis.Channel):
        monkeypatch.setattr(cls, "supports_batch_publish", False)


@pytest.fixture
def unpipelined_app(redis_url, queue, redis_client, unpipelined):
    app = make_app(redis_url, queue)
    yield app
    redis_client.delete(queue)
    app.close()


def test_one_at_a_time_a_refused_push_stops_nothing(
    unpipelined_app, redis_client, queue, caplog
):
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        good, bad = send_around_a_broken_queue(unpipelined_app, redis_client, queue)
    assert [task_id for _, task_id, _ in published(redis_client, queue)] == good
    [error] = caplog.records
    assert error.args[:2] == ("t.echo", bad)
    assert "WRONGTYPE" in error.getMessage()


def test_one_at_a_time_the_broker_dying_reports_only_the_unsent(
    private_redis, queue, caplog, unpipelined
):
    app = make_app(private_redis, queue)
    client = redis.Redis.from_url(private_redis)
    tm = transaction.TransactionManager(explicit=True)
    with (
        on_publish(3, partial(client.shutdown, nosave=True)),
        caplog.at_level(logging.ERROR, logger="pyramid_tasks"),
        tm,
    ):
        ids = [app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in range(5)]
    assert [r.args[1] for r in caplog.records] == ids[2:]
    app.close()


def test_broker_down_logs_each_task_and_keeps_the_commit(queue, caplog):
    app = make_app(
        f"redis://:s3cret@127.0.0.1:{free_port()}/0",
        queue,
        **{
            "celery.broker_connection_timeout": "1",
            "celery.task_routes": "tests.test_schedule_on_commit.refuse_two",
        },
    )
    tm = transaction.TransactionManager(explicit=True)
    ids = []
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
        for number in [2, *range(20)]:  # the router refuses the first: logged once
            ids.append(app.tasks["t.echo"].apply_async((number,), tm=tm).id)
    held = time.monotonic() - started
    unsent = [r for r in caplog.records if "could not be sent" in r.getMessage()]
    assert [r.args[1] for r in unsent] == ids
    assert "the router refused it" in unsent[0].getMessage()
    assert all(r.args[0] == "t.echo" for r in unsent)
    assert "s3cret" not in caplog.text
    # Celery's publish retry policy bounds the wait, once for the batch.
    assert held < 5, held


def refuse_two(name, args, kwargs, options, task=None, **kw):
    """An app's router (``celery.task_routes``): app code run at publish."""
    if list(args) == [2]:
        raise ValueError("the router refused it")


def test_one_failing_publish_does_not_stop_the_others(
    redis_url, queue, redis_client, caplog
):
    app = make_app(
        redis_url,
        queue,
        **{"celery.task_routes": "tests.test_schedule_on_commit.refuse_two"},
    )
    tm = transaction.TransactionManager(explicit=True)
    with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
        ids = [app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in (1, 2, 3)]
    assert [args for _, _, args in published(redis_client, queue)] == [[1], [3]]
    [record] = [r for r in caplog.records if "could not be sent" in r.getMessage()]
    assert record.args[:2] == ("t.echo", ids[1])
    assert "the router refused it" in record.getMessage()
    redis_client.delete(queue)


def test_a_lone_task_that_cannot_be_sent_is_logged(redis_url, queue, caplog):
    app = make_app(
        redis_url,
        queue,
        **{"celery.task_routes": "tests.test_schedule_on_commit.refuse_two"},
    )
    tm = transaction.TransactionManager(explicit=True)
    with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
        task_id = app.tasks["t.echo"].apply_async((2,), tm=tm).id
    [record] = caplog.records
    assert record.args[:2] == ("t.echo", task_id)
    assert "the router refused it" in record.getMessage()
    app.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"expires": "next tuesday"}, "expires='next tuesday'"),
        ({"eta": "soon"}, "eta='soon'"),
        ({"countdown": "10"}, "countdown='10'"),
        ({"priority": "high"}, "priority='high'"),
        ({"priority": -1}, "priority=-1"),
        ({"priority": True}, "priority=True"),
    ],
)
def test_bad_publish_options_fail_at_the_call(app, options, message):
    tm = transaction.TransactionManager(explicit=True)
    with tm, pytest.raises((ValueError, TypeError), match=rf"t\.echo.*{message}"):
        app.tasks["t.echo"].apply_async((1,), tm=tm, **options)


def test_good_time_options_are_kept(app, redis_client, queue):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        app.tasks["t.echo"].apply_async(
            (1,), tm=tm, countdown=5, expires="2099-01-01T00:00:00+00:00"
        )
    [raw] = redis_client.lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["eta"] and headers["expires"].startswith("2099-01-01")


def test_a_rolled_back_savepoint_keeps_later_savepoints_working(
    app, redis_client, queue
):
    """The pending list joins again after a savepoint rollback unjoined it."""
    tm = transaction.TransactionManager(explicit=True)
    echo_task = app.tasks["t.echo"]
    with tm:
        first = tm.savepoint()
        echo_task.apply_async(("A",), tm=tm)
        first.rollback()
        echo_task.apply_async(("B",), tm=tm)
        second = tm.savepoint()
        echo_task.apply_async(("C",), tm=tm)
        second.rollback()
    assert [args for _, _, args in published(redis_client, queue)] == [["B"]]


def test_wrong_arguments_fail_at_the_call_not_after_the_commit(app):
    tm = transaction.TransactionManager(explicit=True)
    with tm, pytest.raises(TypeError, match="positional argument"):
        app.tasks["t.other"].apply_async((1, 2, 3), tm=tm)


def test_retry_exhaustion_survives_the_result_backend_round_trip():
    import pickle

    from pyramid_tasks import RetryAttemptsExhausted

    error = pickle.loads(pickle.dumps(RetryAttemptsExhausted("t.echo", 4)))
    assert (error.name, error.attempts) == ("t.echo", 4)
    assert str(error) == "t.echo failed 4 times with retryable errors"
