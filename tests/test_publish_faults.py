"""After the commit, with the broker down or frozen: how long the commit is
held, what is reported, and what arrived.

Private brokers only: a TCP port that closes every connection it accepts (a
broker that is down, whose connection attempts can be counted) and a
redis-server of the test's own, frozen with SIGSTOP.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import kombu
import kombu.transport.redis
import pytest
import redis
import transaction
from kombu.pools import ProducerPool

from pyramid_tasks import producers
from pyramid_tasks.producers import _pool

from .conftest import ROOT, redis_server, wait_for
from .test_schedule_on_commit import make_app, published


@pytest.fixture
def queue():
    return f"pyramid_tasks_test_{uuid.uuid4().hex[:12]}"


@contextmanager
def closing_port():
    """``(url, count)``: a Redis URL whose port accepts each connection and
    closes it at once; ``count()`` is how many it accepted."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    peers = []

    def serve():
        while True:
            try:
                connection, peer = server.accept()
            except OSError:  # the server was shut down
                return
            connection.close()
            peers.append(peer)

    def count():
        # The backlog is first in, first out: once a marker connection made
        # now is accepted, so is every connection made before it.
        with socket.create_connection(server.getsockname()) as marker:
            mark = marker.getsockname()
            wait_for(lambda: mark in peers, timeout=10, message="the marker")
        return peers.index(mark)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", count
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes accept()
        server.close()
        thread.join(timeout=10)


def test_a_broker_that_is_down_costs_one_retry_policy_for_any_batch(queue, caplog):
    """Each try of Celery's publish retry policy opens a connection: a batch
    of 100 makes as many as one task, 1 + max_retries, and reports each task
    once."""
    attempts = {}
    for size in (1, 100):
        with closing_port() as (url, count):
            app = make_app(url, queue)
            tm = transaction.TransactionManager(explicit=True)
            with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
                ids = [
                    app.tasks["t.echo"].apply_async((n,), tm=tm).id for n in range(size)
                ]
            attempts[size] = count()
            app.close()
        assert [r.args[1] for r in caplog.records] == ids
        assert all("could not be sent" in r.getMessage() for r in caplog.records)
        caplog.clear()
    tries = 1 + app.conf.task_publish_retry_policy["max_retries"]
    assert attempts == {1: tries, 100: tries}


def test_the_retry_policys_own_errback_still_hears_each_error(queue, caplog):
    """The errback that stops retries after a timeout passes every other
    error on to the one of the task's ``retry_policy``."""
    heard = []

    def errback(exc, interval):
        heard.append((type(exc).__name__, interval))

    policy = {"max_retries": 2, "interval_start": 0, "errback": errback}
    with closing_port() as (url, count):
        app = make_app(url, queue)
        tm = transaction.TransactionManager(explicit=True)
        with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
            task_id = (
                app.tasks["t.echo"].apply_async((1,), tm=tm, retry_policy=policy).id
            )
        attempts = count()
        app.close()
    assert [r.args[1] for r in caplog.records] == [task_id]
    assert attempts == 3
    # Once before each new connection: kombu's ensure, then its reconnection.
    assert [name for name, _ in heard] == ["ConnectionError"] * (attempts - 1)


@pytest.fixture
def freezable_redis(tmp_path):
    """``(url, process)`` of a redis-server of this test's own, which the test
    may freeze (SIGSTOP); woken and ended by its PID at teardown."""
    with redis_server(tmp_path) as server:
        yield server


@contextmanager
def frozen(process, wake_after=30.0):
    """Freeze ``process`` (SIGSTOP); a timer wakes it (SIGCONT) after
    ``wake_after`` seconds: the fault of a broker that pauses, and a watchdog
    for one that should stay frozen, so an unbounded commit fails the test
    instead of hanging it.  Yields an Event set when the timer woke it."""
    woke = threading.Event()

    def wake():
        os.kill(process.pid, signal.SIGCONT)
        woke.set()

    timer = threading.Timer(wake_after, wake)
    os.kill(process.pid, signal.SIGSTOP)
    timer.start()
    try:
        yield woke
    finally:
        timer.cancel()
        os.kill(process.pid, signal.SIGCONT)


def commit_held(tm, task, size):
    """Schedule ``size`` tasks and commit: ``(ids, seconds the commit took)``."""
    tm.begin()
    ids = [task.apply_async((n,), tm=tm).id for n in range(size)]
    started = time.monotonic()
    tm.commit()
    return ids, time.monotonic() - started


@pytest.mark.parametrize("options", [{}, {"retry_on_timeout": True}])
def test_a_frozen_broker_holds_the_commit_about_one_publish_timeout(
    freezable_redis, queue, caplog, options
):
    """Redis accepts the connection and never answers: the commit returns
    after about one ``tasks.publish_timeout``, a lone task and a pipeline
    alike, even with the broker's ``retry_on_timeout`` (which would write the
    commands again); each task is reported as maybe delivered and, once Redis
    wakes, arrives exactly once."""
    url, process = freezable_redis
    timeout = 0.5
    app = make_app(
        url,
        queue,
        **{
            "tasks.publish_timeout": str(timeout),
            "celery.broker_transport_options": json.dumps(options),
        },
    )
    echo = app.tasks["t.echo"]
    client = redis.Redis.from_url(url)
    tm = transaction.TransactionManager(explicit=True)
    held, sent = {}, {}
    for size in (1, 5):  # a lone task, then a pipeline
        commit_held(tm, echo, 1)  # the producer's connection is open
        client.delete(queue)
        with (
            frozen(process) as woke,
            caplog.at_level(logging.ERROR, logger="pyramid_tasks"),
        ):
            sent[size], held[size] = commit_held(tm, echo, size)
        assert not woke.is_set(), f"the commit of {size} waited for the watchdog"
        wait_for(lambda n=size: len(published(client, queue)) >= n, timeout=10)
        assert [task_id for _, task_id, _ in published(client, queue)] == sent[size]
    # A fault bound, not a speed target: one socket timeout, and a margin for
    # a loaded machine (measured: timeout + 0.01 s).
    assert held[1] < timeout + 1.0, held
    assert held[5] < timeout + 1.0, held
    assert [r.args[1] for r in caplog.records] == sent[1] + sent[5]
    assert all("may have been delivered" in r.getMessage() for r in caplog.records)
    client.close()
    app.close()


@pytest.mark.parametrize("size", [1, 3])
def test_a_broker_that_wakes_after_the_timeout_gets_each_task_once(
    freezable_redis, queue, caplog, monkeypatch, size
):
    """Redis pauses for twice the timeout while tasks go one at a time (a
    lone task; a batch on a transport that cannot pipeline).  The first LPUSH
    was written, so Celery's publish retry policy must not push it again (it
    would arrive twice).  The commit returns after one timeout, before Redis
    wakes; the first task is reported as maybe delivered, the others as not
    sent; after the wake: arrived 1, duplicates 0."""
    for cls in (kombu.transport.redis.Transport, kombu.transport.redis.Channel):
        monkeypatch.setattr(cls, "supports_batch_publish", False)
    url, process = freezable_redis
    timeout = 1.0
    app = make_app(url, queue, **{"tasks.publish_timeout": str(timeout)})
    echo = app.tasks["t.echo"]
    client = redis.Redis.from_url(url)
    tm = transaction.TransactionManager(explicit=True)
    commit_held(tm, echo, 1)  # the producer's connection is open
    client.delete(queue)
    with frozen(process, wake_after=2 * timeout) as woke:
        with caplog.at_level(logging.ERROR, logger="pyramid_tasks"):
            ids, held = commit_held(tm, echo, size)
        woke.wait(timeout=10)
    # Redis runs what it read while paused as it wakes.
    wait_for(lambda: published(client, queue), timeout=10, message="the task")
    assert client.ping()
    assert [i for _, i, _ in published(client, queue)] == ids[:1]
    assert held < 2 * timeout, held  # returned before Redis woke up
    # redis-py's words: "socket" before 8.2, the server's address since.
    port = url.rsplit(":", 1)[1].split("/")[0]
    causes = [
        f"TimeoutError: Timeout reading from {where}"
        for where in ("socket", f"127.0.0.1:{port}")
    ]
    first = caplog.records[0].getMessage() if caplog.records else ""
    cause = causes[1] if first.endswith(causes[1]) else causes[0]
    assert [r.getMessage() for r in caplog.records] == [
        f"Task t.echo[{ids[0]}] was committed and may have been delivered, but "
        f"the broker did not confirm it: {cause}",
        *(
            f"Task t.echo[{i}] was committed but could not be sent: {cause}"
            for i in ids[1:]
        ),
    ]
    client.close()
    app.close()


def test_commits_waiting_for_a_connection_are_bounded_too(
    freezable_redis, queue, caplog
):
    """More concurrent commits than ``celery.broker_pool_limit`` on a frozen
    broker: those without a connection wait at most the timeout for one, then
    report their task as not sent.  Each commit is held at most two timeouts
    (waiting, then its own send), not one timeout per commit ahead of it."""
    url, process = freezable_redis
    timeout, commits = 0.5, 8
    app = make_app(
        url,
        queue,
        **{"tasks.publish_timeout": str(timeout), "celery.broker_pool_limit": "1"},
    )
    echo = app.tasks["t.echo"]
    client = redis.Redis.from_url(url)
    commit_held(transaction.TransactionManager(explicit=True), echo, 1)
    client.delete(queue)
    held = []

    def commit():
        held.append(commit_held(transaction.TransactionManager(), echo, 1)[1])

    threads = [threading.Thread(target=commit) for _ in range(commits)]
    with (
        frozen(process) as woke,
        caplog.at_level(logging.ERROR, logger="pyramid_tasks"),
    ):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not woke.is_set(), "the commits waited for the watchdog"
    assert len(held) == commits
    assert max(held) < 2 * timeout + 1.0, sorted(held)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == commits
    maybe = [r.args[1] for r in caplog.records if "may have been" in r.getMessage()]
    unsent = [m for m in messages if "could not be sent" in m]
    assert len(maybe) + len(unsent) == commits
    # Who had the connection, in turn: the first, and any that got it as the
    # first gave it back; the others waited one timeout and sent nothing.
    assert maybe and unsent, messages
    assert all(
        "no broker connection was free within tasks.publish_timeout (0.5 s); "
        "celery.broker_pool_limit is 1" in m
        for m in unsent
    ), unsent
    # The first had the open connection and wrote its LPUSH; a later one
    # reconnects and times out in the handshake: "may", and nothing arrives.
    wait_for(lambda: published(client, queue), timeout=10, message="the task")
    assert client.ping()
    arrived = [i for _, i, _ in published(client, queue)]
    assert len(arrived) == len(set(arrived)) and set(arrived) <= set(maybe), arrived
    client.close()
    app.close()


def connections(client):
    """``(received, open)``: connections a redis-server has accepted since it
    started, and how many are open (``client``'s own not counted)."""
    info = client.info("all")
    return info["total_connections_received"], info["connected_clients"] - 1


def test_concurrent_first_commits_share_one_pool_closed_with_the_app(
    freezable_redis, queue, monkeypatch
):
    """Sixteen threads commit at once as the app's first publish: one
    producer pool is created, no more connections are opened than
    ``celery.broker_pool_limit`` allows (two sockets a producer, measured),
    and ``app.close()`` closes them."""
    created = []
    arrived = []  # threads that reached the pool's look-up
    everyone = threading.Event()
    pool = producers._pool

    def counted_pool(app):
        arrived.append(app)  # list.append is atomic
        if len(arrived) == 16:
            everyone.set()
        return pool(app)

    class SlowProducerPool(ProducerPool):
        def __init__(self, *args, **kwargs):
            # A slow start: the pool is made only once every thread has
            # reached the look-up, the widest window a race could use.
            assert everyone.wait(timeout=30), f"{len(arrived)} of 16 arrived"
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(producers, "_pool", counted_pool)
    monkeypatch.setattr(producers, "ProducerPool", SlowProducerPool)
    url, _ = freezable_redis
    app = make_app(url, queue, **{"celery.broker_pool_limit": "2"})
    echo = app.tasks["t.echo"]
    client = redis.Redis.from_url(url)
    client.ping()
    received, open_before = connections(client)
    barrier = threading.Barrier(16)

    def commit():
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        echo.apply_async((1,), tm=tm)
        barrier.wait()
        tm.commit()

    threads = [threading.Thread(target=commit) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.llen(queue) == 16
    assert len(created) == 1
    opened, still_open = connections(client)
    assert 0 < opened - received <= 2 * 2
    assert still_open - open_before == opened - received
    app.close()
    wait_for(lambda: connections(client)[1] == open_before, message="closed")
    client.close()


def test_a_forked_child_closing_the_app_leaves_the_parents_connection(queue, amqp_url):
    """A process forked after a publish (a pre-loading web server) closes
    only its own pool: on AMQP, closing the inherited connection would close
    it for the parent (measured: the parent had to reconnect).  RabbitMQ."""
    probe = subprocess.run(
        [sys.executable, "-m", "tests.fork_probe", amqp_url, queue],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert probe.stdout.split() == ["kept"], probe.stderr
    with kombu.Connection(amqp_url) as connection:
        channel = connection.channel()
        assert channel.queue_declare(queue, passive=True).message_count == 2
        channel.queue_delete(queue)


def test_the_publish_timeout_reaches_only_the_publishing_connection(redis_url, queue):
    """The socket timeouts of the after-commit publish, and no
    ``retry_on_timeout``, never the consumer's (a worker's BRPOP blocks on
    purpose); a shorter one of the broker's transport options is kept."""
    options = '{"socket_timeout": 30, "socket_connect_timeout": 0.25, '
    options += '"retry_on_timeout": true}'
    app = make_app(
        redis_url,
        queue,
        **{"tasks.publish_timeout": "2s", "celery.broker_transport_options": options},
    )
    names = ("socket_timeout", "socket_connect_timeout", "retry_on_timeout")
    with _pool(app).acquire(block=True) as producer:
        publishing = producer.channel.client.connection_pool.connection_kwargs
    assert [publishing[n] for n in names] == [2.0, 0.25, False]
    with app.connection_for_read() as connection:
        consuming = connection.default_channel.client.connection_pool.connection_kwargs
    assert [consuming[n] for n in names] == [30, 0.25, True]
    app.close()


def test_publish_timeout_none_keeps_the_brokers_own_options(queue):
    app = make_app("redis://127.0.0.1:1/0", queue, **{"tasks.publish_timeout": "none"})
    with _pool(app).acquire(block=True) as producer:
        assert "socket_timeout" not in producer.connection.transport_options
    app.close()


def test_other_transports_get_no_redis_options(queue):
    app = make_app("memory://", queue)
    with _pool(app).acquire(block=True) as producer:
        assert producer.connection.transport_options == {}
    app.close()


def refuse_with_a_secret(name, args, kwargs, options, task=None, **kw):
    """An app's router (``celery.task_routes``) whose error spans two lines
    and carries a broker password."""
    raise ValueError("no route to redis://:s3cret@example.com/0\nfor this task")


def test_an_unsent_task_is_one_error_line_and_a_debug_traceback(
    redis_url, queue, caplog
):
    app = make_app(
        redis_url,
        queue,
        **{"celery.task_routes": "tests.test_publish_faults.refuse_with_a_secret"},
    )
    tm = transaction.TransactionManager(explicit=True)
    with caplog.at_level(logging.DEBUG, logger="pyramid_tasks.publish"):
        ids, _ = commit_held(tm, app.tasks["t.echo"], 2)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.args[:2] for r in errors] == [("t.echo", task_id) for task_id in ids]
    for record in errors:
        assert record.getMessage() == (
            f"Task t.echo[{record.args[1]}] was committed but could not be sent: "
            "ValueError: no route to redis://:***@example.com/0 for this task"
        )
        assert record.exc_info is None
    traces = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(traces) == 2
    assert all("Traceback (most recent call last)" in trace for trace in traces)
    assert all("in refuse_with_a_secret" in trace for trace in traces)
    assert "s3cret" not in caplog.text
    app.close()
