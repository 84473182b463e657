"""After the commit, with the broker down or frozen: how long the commit is
held, what is reported, and what arrived.

Private brokers only: a TCP port that closes every connection it accepts (a
broker that is down, whose connection attempts can be counted) and a
redis-server of the test's own, frozen with SIGSTOP.
"""

import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
import redis
import transaction

from pyramid_tasks.publish import _producers

from .conftest import free_port, wait_for
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


@pytest.fixture
def freezable_redis(tmp_path):
    """``(url, process)`` of a redis-server of this test's own, which the test
    may freeze (SIGSTOP); woken and ended by its PID at teardown."""
    port = free_port()
    arguments = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    arguments += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=10, message=f"redis-server on port {port}")
        yield url, process
    finally:
        client.close()
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(timeout=10)


def commit_held(tm, task, size):
    """Schedule ``size`` tasks and commit: ``(ids, seconds the commit took)``."""
    tm.begin()
    ids = [task.apply_async((n,), tm=tm).id for n in range(size)]
    started = time.monotonic()
    tm.commit()
    return ids, time.monotonic() - started


def test_a_frozen_broker_holds_the_commit_within_the_publish_timeout(
    freezable_redis, queue, caplog
):
    """Redis accepts the connection and never answers: the commit returns
    after the bound and each task is reported as maybe delivered; once Redis
    wakes, it runs what was written before the timeout, each task once (the
    retries' new connections never got past their handshake)."""
    url, process = freezable_redis
    timeout = 0.5
    app = make_app(url, queue, **{"tasks.publish_timeout": str(timeout)})
    echo = app.tasks["t.echo"]
    client = redis.Redis.from_url(url)
    tm = transaction.TransactionManager(explicit=True)
    held, sent = {}, {}
    for size in (1, 5):  # a lone task, then a pipeline
        commit_held(tm, echo, 1)  # the producer's connection is open
        client.delete(queue)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.ERROR, logger="pyramid_tasks"):
                sent[size], held[size] = commit_held(tm, echo, size)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        wait_for(lambda n=size: len(published(client, queue)) >= n, timeout=10)
        assert [task_id for _, task_id, _ in published(client, queue)] == sent[size]
    # Fault bounds, not speed targets: the pipeline waits one timeout; the lone
    # task, Celery's retry policy of timeouts (measured: 5 timeouts + 0.6 s).
    tries = app.conf.task_publish_retry_policy["max_retries"] + 2
    assert held[1] < tries * timeout + 0.6 + 3, held
    assert held[5] < timeout + 3, held
    assert [r.args[1] for r in caplog.records] == sent[1] + sent[5]
    assert all("may have been delivered" in r.getMessage() for r in caplog.records)
    client.close()
    app.close()


def test_the_publish_timeout_reaches_only_the_publishing_connection(redis_url, queue):
    """The socket timeouts of the after-commit publish, never the consumer's
    (a worker's BRPOP blocks on purpose); a shorter one of the broker's
    transport options is kept."""
    options = '{"socket_timeout": 30, "socket_connect_timeout": 0.25}'
    app = make_app(
        redis_url,
        queue,
        **{"tasks.publish_timeout": "2s", "celery.broker_transport_options": options},
    )
    with _producers(app).acquire(block=True) as producer:
        publishing = producer.channel.client.connection_pool.connection_kwargs
    assert (publishing["socket_timeout"], publishing["socket_connect_timeout"]) == (
        2.0,
        0.25,
    )
    with app.connection_for_read() as connection:
        consuming = connection.default_channel.client.connection_pool.connection_kwargs
    assert (consuming["socket_timeout"], consuming["socket_connect_timeout"]) == (
        30,
        0.25,
    )
    app.close()


def test_publish_timeout_none_keeps_the_brokers_own_options(queue):
    app = make_app("redis://127.0.0.1:1/0", queue, **{"tasks.publish_timeout": "none"})
    with _producers(app).acquire(block=True) as producer:
        assert "socket_timeout" not in producer.connection.transport_options
    app.close()


def test_other_transports_get_no_redis_options(queue):
    app = make_app("memory://", queue)
    with _producers(app).acquire(block=True) as producer:
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
