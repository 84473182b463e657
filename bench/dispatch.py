"""Scenarios 3 and 4: the web side, sending tasks on commit vs bare apply_async."""

import os
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
        "<= 0.50 (2x faster)",
        unit="ms per 100",
    )
    hundred.baseline, hundred.ours = alternate(
        rounds, measure(bare_100, calls // 100), measure(on_commit_100, calls // 100)
    )
    client.delete(*queues)
    return [one, hundred]
