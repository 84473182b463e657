"""Scenarios 3, 4 and P10: the web side, sending tasks on commit.

3 and 4 compare with bare ``apply_async``; P10 sends 10,000 tasks on one
commit and compares with the fastest way to put as many messages of the
same bytes on Redis: ``LPUSH`` in pipelines.
"""

import os
import time
import uuid

import redis
import transaction
from celery import Celery
from pyramid.config import Configurator

from pyramid_tasks import ScheduleOnCommitTask

from .harness import Scenario, alternate, timed

REDIS_URL = os.environ.get("PYRAMID_TASKS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def noop(*args):
    """The task both sides send; nothing consumes it here."""


def plain_task(queue):
    app = Celery("bench_plain", broker=REDIS_URL, set_as_current=False)
    app.conf.task_default_queue = queue
    return app.task(name="bench.noop", shared=False, lazy=False)(noop)


def our_task(queue):
    config = Configurator(
        settings={"celery.broker_url": REDIS_URL, "celery.task_default_queue": queue}
    )
    config.include("pyramid_tasks")
    config.add_task(noop, base=ScheduleOnCommitTask, name="bench.noop")
    config.commit()
    return config.registry.celery_app.tasks["bench.noop"]


def run(quick):
    rounds, calls = (5, 200) if quick else (15, 1000)
    queues = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    client = redis.Redis.from_url(REDIS_URL)
    plain, ours = plain_task(queues[0]), our_task(queues[1])
    tm = transaction.TransactionManager(explicit=True)

    def bare_after_commit():
        tm.begin()
        tm.commit()
        plain.apply_async((1,))

    def on_commit():
        tm.begin()
        ours.apply_async((1,), tm=tm)
        tm.commit()

    def bare_100():
        for _ in range(100):
            plain.apply_async((1,))

    def on_commit_100():
        tm.begin()
        for _ in range(100):
            ours.apply_async((1,), tm=tm)
        tm.commit()

    def measure(operation, count):
        def one_round():
            result = timed(operation, count)
            client.delete(*queues)
            return result

        return one_round

    for operation in (bare_after_commit, on_commit):  # warm both up
        operation()
    one = Scenario("3. dispatch 1 task on commit", "<= 1.05")
    one.baseline, one.ours = alternate(
        rounds, measure(bare_after_commit, calls), measure(on_commit, calls)
    )
    hundred = Scenario(
        "4. dispatch 100 tasks in one transaction",
        "<= 0.10 (10x faster)",
        unit="ms per 100",
    )
    hundred.baseline, hundred.ours = alternate(
        rounds, measure(bare_100, calls // 100), measure(on_commit_100, calls // 100)
    )
    client.delete(*queues)
    return [one, hundred, bulk(client, ours, tm, rounds=3 if quick else 5)]


# P10: tasks a commit, and the LPUSH pipeline's chunk (publish's own).
BULK, CHUNK = 10_000, 1000


def bulk(client, task, tm, rounds, count=BULK):
    """P10: ``count`` tasks on one commit, from the first ``apply_async`` to
    the last message in Redis (the commit returns once the pipelines ran),
    against ``count`` LPUSHes of the same bytes in pipelines of ``CHUNK``."""
    queue = f"bench_bulk_{uuid.uuid4().hex[:10]}"

    def on_commit():
        start = time.perf_counter()
        tm.begin()
        for n in range(count):
            task.apply_async((n,), tm=tm, queue=queue)
        tm.commit()
        elapsed = time.perf_counter() - start
        sent = client.llen(queue)
        if sent != count:
            raise RuntimeError(f"P10: {count} tasks committed, {sent} in Redis")
        return elapsed

    on_commit()  # warm-up, and a message to copy
    payload = client.lindex(queue, 0)
    client.delete(queue)

    def lpush():
        start = time.perf_counter()
        for first in range(0, count, CHUNK):
            pipeline = client.pipeline(transaction=False)
            for _ in range(first, min(first + CHUNK, count)):
                pipeline.lpush(queue, payload)
            pipeline.execute()
        return time.perf_counter() - start

    def measure(operation):
        def one_round():
            try:
                return operation()
            finally:
                client.delete(queue)

        return one_round

    scenario = Scenario(
        f"P10. {count} tasks on one commit vs LPUSH",
        "(report)",
        unit=f"s per {count}",
    )
    scenario.baseline, scenario.ours = alternate(
        rounds, measure(lpush), measure(on_commit)
    )
    scenario.note = (
        f"on commit {count / scenario.median('ours'):,.0f} tasks/s, LPUSH "
        f"pipeline {count / scenario.median('baseline'):,.0f} messages/s "
        f"({len(payload)} bytes each)"
    )
    return scenario
