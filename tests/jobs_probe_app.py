"""The durable-mode probe app: demo models, ``pyramid_tasks.jobs``, and tasks
that count their runs in Redis (outside any transaction) and leave their
effect in the database (an ``orders`` row whose email is the test's key)."""

import json
import time

import redis
from pyramid.config import Configurator
from pyramid.events import subscriber

from demo_app.models import Order
from pyramid_tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    task,
)
from pyramid_tasks.jobs import JobFailed, JobStarted, JobSucceeded, metadata


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks")
        config.include("pyramid_tasks.jobs")
        config.scan("tests.jobs_probe_app")
    registry = config.registry
    engine = registry["dbsession_factory"].kw["bind"]
    with engine.begin() as connection:  # in the schema of demo.schema
        metadata.create_all(connection)
    return config.make_wsgi_app()


def _redis(request):
    return redis.Redis.from_url(request.registry.settings["probe.redis_url"])


def _effect(request, key):
    """Count the run (Redis) and add the effect (the task's transaction)."""
    _redis(request).incr(f"{key}:runs")
    request.dbsession.add(Order(email=key))
    request.dbsession.flush()


@task(bind=True, base=RetryableTransactionTask)
def record(self, key, fail=None):
    """The effect, then ``ValueError(fail)`` if asked: rolled back."""
    _effect(self.get_request(), key)
    if fail:
        raise ValueError(fail)
    return key


@task(bind=True, base=TransactionalTask)
def record_once(self, key):
    _effect(self.get_request(), key)
    return key


@task(bind=True, base=RetryableTransactionTask)
def retried(self, key):
    """Celery's retry() on the first run (in a second); the effect on the next."""
    request = self.get_request()
    if int(_redis(request).get(f"{key}:runs") or 0) == 0:
        _redis(request).incr(f"{key}:runs")
        raise self.retry(exc=KeyError("first run"), countdown=1)
    _effect(request, key)


@task(bind=True)
def plain(self, key):
    """A PyramidTask (sent at once): its own short transaction."""
    request = self.get_request()
    with request.tm:
        _effect(request, key)


@task(bind=True, base=TransactionalTask)
def held(self, key):
    """The effect, then wait for ``<key>:go`` (put back for the next run);
    ``<key>:started`` lists the runs that got this far."""
    request = self.get_request()
    _effect(request, key)
    client = _redis(request)
    client.rpush(f"{key}:started", self.request.id)
    client.blmove(f"{key}:go", f"{key}:go", timeout=30)
    return key


@task(bind=True, base=ScheduleOnCommitTask)
def watched(self, key):
    """Progress, then wait for the test (``<key>:go``); report what the task
    sees of its job then."""
    client = _redis(self.get_request())
    self.set_progress(1, 4, "one of four")
    self.set_progress(2, 4, "two of four")  # within the throttle: not written
    client.rpush(f"{key}:ready", "1")
    client.blpop([f"{key}:go"], timeout=30)
    job = self.job
    return {
        "id": job["id"],
        "state": job["state"],
        "attempts": job["attempts"],
        "progress": job["progress"],
        "cancel_requested": self.cancel_requested(),
    }


@task(bind=True, base=ScheduleOnCommitTask)
def cancellable(self, key, fail=False):
    """Work in small steps until cancel_requested() (read once before the
    test is told it runs, then as the loop asks); raise then if ``fail``."""
    before = self.cancel_requested()
    _redis(self.get_request()).rpush(f"{key}:ready", "1")
    deadline = time.monotonic() + 30
    while not self.cancel_requested() and time.monotonic() < deadline:
        time.sleep(0.05)
    if fail:
        raise RuntimeError("stopped: cancelled")
    result = {"before": before, "cancelled": self.cancel_requested()}
    # Also where a test reads it: a duplicate message (the relay re-sends a
    # job whose "queued" mark lags behind a test's short grace) that a revoke
    # drops makes the result backend say REVOKED.
    _redis(self.get_request()).rpush(f"{key}:result", json.dumps(result))
    return result


@task(bind=True, base=TransactionalTask)
def watched_in_tm(self, key):
    """The effect in the task's transaction, then wait for the test; ends
    with what cancel_requested() says."""
    request = self.get_request()
    _effect(request, key)
    client = _redis(request)
    client.rpush(f"{key}:ready", "1")
    client.blpop([f"{key}:go"], timeout=30)
    return self.cancel_requested()


EVENTED = tuple(
    f"tests.jobs_probe_app.{name}"
    for name in ("evented", "held", "cancellable", "watched_in_tm")
)


@task(bind=True, base=TransactionalTask)
def evented(self, key, fail=False):
    _effect(self.get_request(), key)
    if fail:
        raise ValueError(f"{key} fails")


@subscriber(JobStarted, JobSucceeded, JobFailed)
def event_fails(event):
    """Writes, then raises: rolled back, logged, and nothing else changes."""
    if event.task_name not in EVENTED:
        return
    request = event.request
    with request.tm:
        request.dbsession.add(Order(email=f"raised:{event.job_id}"))
        raise RuntimeError("this subscriber fails")


@subscriber(JobStarted, JobSucceeded, JobFailed)
def event_recorded(event):
    """One row per event, through the event's request."""
    if event.task_name not in EVENTED:
        return
    name = type(event).__name__
    error = getattr(event, "exception", None)
    if error is not None:
        name += f":{type(error).__name__}"
    request = event.request
    with request.tm:
        request.dbsession.add(Order(email=f"event:{event.job_id}:{name}"))


@task(bind=True, base=ScheduleOnCommitTask)
def fan_out(self, key, count):
    """Send ``count`` ``record`` jobs at once from the run (no tm): their
    rows are made by the workers that start them, naming this job."""
    return [record.delay(f"{key}:{i}").id for i in range(count)]


@task(bind=True, base=RetryableTransactionTask)
def step(self, key, name):
    """A workflow's step: its effect (an order ``key:name``) and its name
    added to the workspace's ``done``, in its transaction; it fails while
    Redis holds ``key:fail:name``."""
    request = self.get_request()
    _effect(request, f"{key}:{name}")
    self.workspace.setdefault("done", []).append(name)
    if _redis(request).get(f"{key}:fail:{name}"):
        raise ValueError(f"step {name} was told to fail")
    return name
