"""Durable mode under worker faults: real ``tasks-celery`` workers killed,
duplicated, and a PostgreSQL restarted under them.

Every test schedules its jobs the way a view does (``apply_async(...,
tm=tm)`` and a commit), counts what happened and prints the figures:
scheduled, body runs started and completed, effects in the database (order
rows, one per job when all is well), duplicates (effects beyond one a job)
and lost jobs (no effect), then asserts them exactly.  The app is
``conf/test.ini#jobs_kill`` (:mod:`tests.jobs_kill_app`): a two-second lease,
a relay round every 200 ms, a one-message prefetch.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from contextlib import contextmanager

import pytest
import redis
import transaction
from sqlalchemy import func, select, text

from demo_app.models import Order
from pyramid_tasks.sqlalchemy import get_tm_session

from .conftest import free_port, wait_for

EFFECT = "tests.jobs_kill_app.effect"
EFFECT_ACKED_EARLY = "tests.jobs_kill_app.effect_acked_early"
RETRYABLE_EFFECT = "tests.jobs_kill_app.retryable_effect"


@pytest.fixture
def ini_vars(ini_vars, private_redis):
    # kombu keeps one unacked hash per Redis database, shared by every queue:
    # the test counts the copies of its message there.
    return {**ini_vars, "redis_url": private_redis}


@pytest.fixture
def start(start_worker, ini_vars):
    """A worker of the jobs_kill app running one task at a time in a thread
    of its main process, so one SIGKILL ends the run and the worker.  (Not
    the solo pool: on Redis it leaves even an early-acknowledged message in
    kombu's unacked hash until the task returns.)"""

    def start(*args, **settings):
        settings = {"probe.redis_url": ini_vars["redis_url"], **settings}
        return start_worker(
            "-P", "threads", "-c", "1", *args, section="jobs_kill", settings=settings
        )

    return start


class Jobs:
    """The jobs of one test, scheduled and counted through the test's own
    copy of the app."""

    def __init__(self, worker, redis_url):
        self.app = worker.celery_app
        self.registry = self.app.pyramid_registry
        self.store = self.registry.pyramid_tasks_jobs.store
        self.engine = self.registry["dbsession_factory"].kw["bind"]
        self.client = redis.Redis.from_url(redis_url)
        self.token = uuid.uuid4().hex[:12]

    def key(self, index=0):
        return f"{self.token}:{index}"

    def schedule(self, name, keys, **kwargs):
        """One committed transaction scheduling ``name`` once per key, as a
        view does: its session joined first, so the job rows commit with it."""
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            session = get_tm_session(self.registry["dbsession_factory"], tm)
            session.execute(text("SELECT 1"))
            results = [
                self.app.tasks[name].apply_async((key,), kwargs, tm=tm) for key in keys
            ]
        return [result.id for result in results]

    def started(self, key):
        """The process ids of the body runs started for ``key``."""
        return [int(pid) for pid in self.client.lrange(f"{key}:started", 0, -1)]

    def go(self, key):
        self.client.rpush(f"{key}:go", "go")

    def effects(self, key):
        with self.engine.connect() as connection:
            query = select(func.count()).select_from(Order).where(Order.email == key)
            return connection.scalar(query)

    def row(self, job_id):
        return self.store.get(job_id)

    def copies(self, queue):
        """Copies of messages at the broker: queued, and delivered unacked."""
        return self.client.llen(queue), self.client.hlen("unacked")

    def close(self):
        self.client.close()


def kill(worker):
    """SIGKILL the worker (threads pool: the process running the task)."""
    worker.process.kill()
    worker.process.wait()


def figures(scheduled, started, completed, effects):
    """The counts every test prints: ``duplicates`` are effects beyond one a
    job, ``lost`` the jobs without one."""
    counts = {
        "scheduled": scheduled,
        "runs started": started,
        "effects": sum(effects),
        "duplicates": sum(max(0, n - 1) for n in effects),
        "lost": sum(1 for n in effects if n == 0),
    }
    if completed is not None:
        counts["runs completed"] = completed
    print(" ".join(f"{name}={value}" for name, value in counts.items()))
    return counts


def test_worker_killed_mid_task_with_acks_late_is_redelivered_once(
    start, ini_vars, amqp_url
):
    """RabbitMQ gives the unacknowledged message to the other worker as soon
    as the dead worker's connection closes; the job's lock died with the dead
    worker's database session, so the rerun goes through, and the first
    run's effect was rolled back with it."""
    ini_vars["broker_url"] = amqp_url
    first, second = start(), start()
    jobs = Jobs(first, ini_vars["redis_url"])
    key = jobs.key()
    [job_id] = jobs.schedule(EFFECT, [key])

    [pid] = wait_for(lambda: jobs.started(key), message="the first run")
    victim = first if pid == first.process.pid else second
    survivor = second if victim is first else first
    assert jobs.row(job_id)["state"] == "started"
    kill(victim)
    wait_for(lambda: len(jobs.started(key)) == 2, message="the redelivered run")
    jobs.go(key)
    wait_for(lambda: jobs.row(job_id)["state"] == "succeeded", message="success")

    runs = jobs.started(key)
    assert runs == [victim.process.pid, survivor.process.pid]
    counts = figures(1, len(runs), None, [jobs.effects(key)])
    assert counts == {
        "scheduled": 1,
        "runs started": 2,
        "effects": 1,
        "duplicates": 0,
        "lost": 0,
    }
    row = jobs.row(job_id)
    print(f"row: state={row['state']} attempts={row['attempts']}")
    assert (row["state"], row["attempts"]) == ("succeeded", 2)
    jobs.close()


def test_worker_killed_mid_task_without_acks_late_is_requeued_by_the_relay(
    start, ini_vars
):
    """The message was acknowledged as the run started, so nothing is left
    at the broker (Celery alone: the task is lost, 0 runs complete); the
    job's row stays ``started`` without a heartbeat, and once its lease
    expires a relay sends it again."""
    first = start()
    jobs = Jobs(first, ini_vars["redis_url"])
    key = jobs.key()
    [job_id] = jobs.schedule(EFFECT_ACKED_EARLY, [key])
    wait_for(lambda: jobs.started(key), message="the first run")
    kill(first)
    copies = jobs.copies(ini_vars["queue"])
    print(f"copies at the broker after the kill (queued, unacked): {copies}")
    assert copies == (0, 0)

    jobs.go(key)  # the rerun goes straight through
    second = start()
    wait_for(lambda: jobs.row(job_id)["state"] == "succeeded", message="the rerun")
    assert f"Job {job_id} was started by" in second.log
    assert "which sent no heartbeat for 2 s: re-queued." in second.log
    assert f"Job {EFFECT_ACKED_EARLY}[{job_id}] was committed but not" in second.log
    counts = figures(1, len(jobs.started(key)), None, [jobs.effects(key)])
    assert counts == {
        "scheduled": 1,
        "runs started": 2,
        "effects": 1,
        "duplicates": 0,
        "lost": 0,
    }
    row = jobs.row(job_id)
    print(f"row: state={row['state']} attempts={row['attempts']}")
    assert (row["state"], row["attempts"]) == ("succeeded", 2)
    jobs.close()


def lock_waiters(engine, job_id):
    """Sessions waiting for the advisory lock of ``job_id``."""
    sql = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND NOT granted AND objsubid = 1 "
        "AND classid::bigint = (hashtextextended(:id, 0) >> 32) & 4294967295 "
        "AND objid::bigint = hashtextextended(:id, 0) & 4294967295"
    )
    with engine.connect() as connection:
        return connection.scalar(sql, {"id": job_id})


def test_one_message_delivered_to_two_workers_at_once_takes_effect_once(
    start, ini_vars
):
    """The same job's message twice, each copy held by its own worker at the
    same moment: the second waits for the job's lock while the first runs,
    then finds the job succeeded and changes nothing."""
    first, second = start(), start()
    jobs = Jobs(first, ini_vars["redis_url"])
    key = jobs.key()
    [job_id] = jobs.schedule(EFFECT, [key])
    [pid] = wait_for(lambda: jobs.started(key), message="the first run")
    # The second copy, by hand, as a broker redelivering it would.
    jobs.app.send_task(EFFECT, (key,), task_id=job_id)
    wait_for(lambda: lock_waiters(jobs.engine, job_id), message="the second copy")
    jobs.go(key)

    running, waiting = (first, second) if pid == first.process.pid else (second, first)
    wait_for(
        lambda: "this delivery changes nothing" in waiting.log,
        message="the second copy to finish",
    )
    runs = jobs.started(key)
    counts = figures(1, len(runs), None, [jobs.effects(key)])
    row = jobs.row(job_id)
    print(f"delivery 1 ({running.node}): ran the body, committed the effect")
    print(f"delivery 2 ({waiting.node}): waited on the lock, changed nothing")
    print(f"row: state={row['state']} attempts={row['attempts']}")
    assert counts == {
        "scheduled": 1,
        "runs started": 1,
        "effects": 1,
        "duplicates": 0,
        "lost": 0,
    }
    assert runs == [running.process.pid]
    assert (row["state"], row["attempts"]) == ("succeeded", 2)
    assert "this delivery changes nothing" not in running.log
    jobs.close()
