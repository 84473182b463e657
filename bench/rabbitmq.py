"""Scenario R: 100 tasks sent on one commit to RabbitMQ, three ways in one run.

- batch-confirmed: pyramid_tasks as it ships (``confirm_publish`` on): the
  commit's messages published back to back, then one wait for the broker's
  acks, each matched to its task by delivery tag;
- one at a time, confirmed: plain Celery with ``confirm_publish``, a bare
  ``apply_async`` loop after the commit, each publish waiting for its ack
  (kombu's own confirms);
- unconfirmed: pyramid_tasks with ``confirm_publish = false``;
- bare: plain Celery as it ships (unconfirmed), a bare ``apply_async`` loop
  after the commit: scenario 4 on RabbitMQ.

The four alternate round by round (who goes first rotating), on queues of
the run's own, purged after each round and deleted at the end.
"""

import os
import uuid

import kombu
import transaction
from celery import Celery
from pyramid.config import Configurator

from pyramid_tasks import ScheduleOnCommitTask

from .harness import Scenario, timed

AMQP_URL = os.environ.get(
    "PYRAMID_TASKS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
TASKS = 100


def noop(*args):
    """The task every variant sends; nothing consumes it here."""


def our_task(queue, confirm):
    config = Configurator(
        settings={
            "celery.broker_url": AMQP_URL,
            "celery.task_default_queue": queue,
            "celery.broker_transport_options.confirm_publish": confirm,
        }
    )
    config.include("pyramid_tasks")
    config.add_task(noop, base=ScheduleOnCommitTask, name="bench.noop")
    config.commit()
    return config.registry.celery_app.tasks["bench.noop"]


def plain_task(queue, confirm=True):
    app = Celery("bench_plain", broker=AMQP_URL, set_as_current=False)
    app.conf.task_default_queue = queue
    app.conf.broker_transport_options = {"confirm_publish": confirm}
    return app.task(name="bench.noop", shared=False, lazy=False)(noop)


def run(quick, tasks=TASKS, rounds=None):
    """Four scenarios from one run: batch-confirmed against one at a time
    confirmed and against unconfirmed; scenario 4 on RabbitMQ, unconfirmed
    and batch-confirmed, against bare ``apply_async``."""
    rounds = rounds or (5 if quick else 15)
    calls = 3 if quick else 10  # commits a round and variant
    queues = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(4)]
    batch, unconfirmed = our_task(queues[0], "true"), our_task(queues[1], "false")
    each, bare = plain_task(queues[2]), plain_task(queues[3], confirm=False)
    tm = transaction.TransactionManager(explicit=True)

    def on_commit(task):
        def commit():
            tm.begin()
            for _ in range(tasks):
                task.apply_async((1,), tm=tm)
            tm.commit()

        return commit

    def after_commit(task):
        def commit():
            tm.begin()
            tm.commit()
            for _ in range(tasks):
                task.apply_async((1,))

        return commit

    variants = {
        "batch": on_commit(batch),
        "each": after_commit(each),
        "unconfirmed": on_commit(unconfirmed),
        "bare": after_commit(bare),
    }
    figures = {name: [] for name in variants}
    with kombu.Connection(AMQP_URL) as connection:
        channel = connection.default_channel
        for operation in variants.values():  # warm up: connections, declares
            operation()
        for number in range(rounds):
            names = list(variants)
            names = names[number % 4 :] + names[: number % 4]
            for name in names:
                figures[name].append(timed(variants[name], calls))
            for queue in queues:
                channel.queue_purge(queue)
        for queue in queues:
            channel.queue_delete(queue)
    for task in (batch, unconfirmed, each, bare):
        task.app.close()
    on_commit = f"RabbitMQ {tasks} on commit"
    comparisons = (  # (name, ours, baseline)
        (f"R. {on_commit}: batch vs each confirmed", "batch", "each"),
        (f"R. {on_commit}: batch vs unconfirmed", "batch", "unconfirmed"),
        (f"4. {on_commit} vs bare (unconfirmed)", "unconfirmed", "bare"),
        (f"4. {on_commit} confirmed vs bare", "batch", "bare"),
    )
    return [
        Scenario(
            name,
            "(report)",
            ours=figures[ours],
            baseline=figures[baseline],
            unit=f"ms per {tasks}",
        )
        for name, ours, baseline in comparisons
    ]
