"""The test suite's probe app: demo models plus tasks reporting on their process."""

import os

import redis
from pyramid.config import Configurator
from pyramid.threadlocal import get_current_request
from sqlalchemy import text
from transaction.interfaces import TransientError

from pyramid_tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    retryable,
    task,
)


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks")
        config.include("demo_app.routes")
        config.scan("demo_app.tasks")
        config.scan("tests.probe_app")
    registry = config.registry
    # Leave a connection in the parent's pool, as an app that queries the
    # database at start-up does: forked children must not reuse it.
    engine = registry["dbsession_factory"].kw["bind"]
    with engine.connect() as connection:
        registry["startup_backend_pid"] = connection.scalar(
            text("SELECT pg_backend_pid()")
        )
    return config.make_wsgi_app()


def _redis(request):
    return redis.Redis.from_url(request.registry.settings["probe.redis_url"])


@task(bind=True)
def whoami(self, barrier_key, parties):
    """Report process and database connection, once ``parties`` run at once."""
    request = self.get_request()
    with request.tm:
        sql = text("SELECT pg_backend_pid()")
        backend_pid = request.dbsession.execute(sql).scalar()
    # A barrier in Redis: the last to arrive releases everyone.
    client = _redis(request)
    if client.incr(barrier_key) == parties:
        client.rpush(f"{barrier_key}:go", *["go"] * parties)
    released = client.blpop([f"{barrier_key}:go"], timeout=30) is not None
    return {
        "pid": os.getpid(),
        "backend_pid": backend_pid,
        "startup_backend_pid": request.registry["startup_backend_pid"],
        "released": released,
    }


@task(bind=True, base=TransactionalTask)
def tick(self):
    """The one-second beat entry: count the runs, and schedule ``tock`` on commit."""
    request = self.get_request()
    _redis(request).incr(request.registry.settings["probe.key"])
    tock.apply_async(tm=request.tm)


@task(bind=True, base=ScheduleOnCommitTask)
def tock(self):
    request = self.get_request()
    _redis(request).incr(request.registry.settings["probe.key"] + ":tock")


@task(bind=True, base=ScheduleOnCommitTask, default_retry_delay=0)
def retry_once(self, key):
    """Celery's own retry(): fails the first time, succeeds on redelivery."""
    runs = _redis(self.get_request()).incr(key)
    if runs == 1:
        raise self.retry()
    return {"runs": runs, "retries": self.request.retries}


@task(
    bind=True,
    base=RetryableTransactionTask,
    autoretry_for=(KeyError,),
    max_retries=2,
    default_retry_delay=0,
)
def autoretried(self, key):
    """autoretry_for on a transactional task: KeyError twice, then success."""
    runs = _redis(self.get_request()).incr(key)
    if runs < 3:
        raise KeyError(f"run {runs}")
    return runs


@task(bind=True, base=RetryableTransactionTask)
def conflicted(self, key):
    """A retryable error on the first attempt, on a real worker."""
    request = self.get_request()
    _redis(request).incr(key)
    if request.transaction_attempt == 1:
        raise TransientError("conflict")
    return {"attempt": request.transaction_attempt, "task_id": self.request.id}


@task(bind=True)
def batch(self, key, items):
    """``retryable`` on a worker: one transaction per item, the first conflicts."""
    request = self.get_request()
    client = _redis(request)
    done = []

    @retryable(tm=request.tm)
    def one(item):
        if client.incr(key) == 1:
            raise TransientError("first attempt conflicts")
        done.append((item, request.tm.get().status))

    for item in items:
        one(item)
    return done


@task(bind=True)
def rendezvous(self, key, parties):
    """Wait until ``parties`` executions run at once (greenlets under gevent)."""
    request = self.get_request()
    client = _redis(request)
    if client.incr(key) == parties:
        client.rpush(f"{key}:go", *["go"] * parties)
    released = client.blpop([f"{key}:go"], timeout=15) is not None
    return {"released": released, "own_request": get_current_request() is request}


@task(bind=True)
def hold(self, key):
    """Run until the test says go: the killed-worker measurements.

    Each run appends its process id to ``<key>:started``, waits for the
    ``<key>:go`` token (and puts it back for the next run), then counts
    itself in ``<key>:completed``.
    """
    client = _redis(self.get_request())
    client.rpush(f"{key}:started", os.getpid())
    client.blmove(f"{key}:go", f"{key}:go", timeout=30)
    client.incr(f"{key}:completed")


@task(bind=True)
def query_outside_tm(self):
    """The mistake of a plain task: the session used outside ``request.tm``."""
    return self.get_request().dbsession.execute(text("SELECT 1")).scalar()


@task(bind=True, base=TransactionalTask)
def nested_tm(self):
    """The mistake of a transactional body: ``with request.tm:`` inside it,
    whose first step is this ``begin()``."""
    self.get_request().tm.begin()
