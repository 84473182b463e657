"""Durable mode's fault-test app (tests/test_jobs_kill.py): the demo models,
the job table, and tasks whose one effect is an order row.

Each task inserts ``Order(email=key)`` in its own transaction, says in Redis
that its body started (``<key>:started``, the process id) and, when told to,
waits for the test's ``<key>:go`` token before its transaction commits.
"""

import os

import redis
from pyramid.config import Configurator

from demo_app.models import Order
from pyramid_tasks import RetryableTransactionTask, TransactionalTask, task
from pyramid_tasks.jobs import metadata


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks")
        config.include("pyramid_tasks.jobs")
        config.scan("tests.jobs_kill_app")
    # The job table next to the demo's tables, in the test's own schema.
    metadata.create_all(config.registry["dbsession_factory"].kw["bind"])
    return config.make_wsgi_app()


def _effect(task, key, wait, fail=False):
    request = task.get_request()
    request.dbsession.add(Order(email=key))
    request.dbsession.flush()
    if fail:
        raise RuntimeError(f"{key} failed")
    client = redis.Redis.from_url(request.registry.settings["probe.redis_url"])
    try:
        client.rpush(f"{key}:started", os.getpid())
        if wait:  # the token stays for the next run
            client.blmove(f"{key}:go", f"{key}:go", timeout=60)
    finally:
        client.close()


@task(bind=True, base=TransactionalTask)
def effect(self, key, wait=True, fail=False):
    """Durable defaults: ``acks_late`` and ``reject_on_worker_lost``."""
    _effect(self, key, wait, fail)


@task(bind=True, base=TransactionalTask, acks_late=False)
def effect_acked_early(self, key, wait=True):
    """The message is acknowledged as the run starts: a killed run leaves
    nothing at the broker."""
    _effect(self, key, wait)


@task(bind=True, base=RetryableTransactionTask)
def retryable_effect(self, key, wait=False):
    _effect(self, key, wait)
