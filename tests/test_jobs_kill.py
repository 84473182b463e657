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
import pwd
import re
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
import transaction
from pyramid.paster import get_app
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from demo_app.models import Order
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.store import JobTableMissing
from pyramid_tasks.jobs.worker import _database_unreachable
from pyramid_tasks.sqlalchemy import get_tm_session

from .conftest import free_port, overlay_ini, wait_for

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


def figures(scheduled, started, effects):
    """The counts every test prints: ``duplicates`` are effects beyond one a
    job, ``lost`` the jobs without one."""
    counts = {
        "scheduled": scheduled,
        "runs started": started,
        "effects": sum(effects),
        "duplicates": sum(max(0, n - 1) for n in effects),
        "lost": sum(1 for n in effects if n == 0),
    }
    print(" ".join(f"{name}={value}" for name, value in counts.items()))
    return counts


def test_worker_killed_mid_task_with_acks_late_is_redelivered_once(
    start, ini_vars, amqp_url
):
    """RabbitMQ gives the unacknowledged message to the other worker as soon
    as the dead worker's connection closes; the job's lock died with the dead
    worker's database session, so the rerun goes through, and the first
    run's effect was rolled back with it.

    On Redis the copy comes back only after ``visibility_timeout`` (an hour
    by default), and a short one is a trap: kombu then restores the message
    of every task running longer than that, alive or not
    (tests/test_delivery.py).  In durable mode such a copy waits for the
    job's lock and changes nothing, as the two-worker test below shows."""
    ini_vars["broker_url"] = amqp_url
    first, second = start(), start()
    jobs = Jobs(first, ini_vars["redis_url"])
    key = jobs.key()
    [job_id] = jobs.schedule(EFFECT, [key])

    [pid] = wait_for(lambda: jobs.started(key), message="the first run")
    victim = first if pid == first.process.pid else second
    survivor = second if victim is first else first
    # A long run is marked started by its heartbeat thread within a second.
    wait_for(lambda: jobs.row(job_id)["state"] == "started", message="started")
    kill(victim)
    wait_for(lambda: len(jobs.started(key)) == 2, message="the redelivered run")
    jobs.go(key)
    wait_for(lambda: jobs.row(job_id)["state"] == "succeeded", message="success")

    runs = jobs.started(key)
    assert runs == [victim.process.pid, survivor.process.pid]
    counts = figures(1, len(runs), [jobs.effects(key)])
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
    print(
        f"copies at the broker after the kill (queued, unacked): {copies}; "
        "Celery alone stops here: 0 runs completed (tests/test_delivery.py)"
    )
    assert copies == (0, 0)

    jobs.go(key)  # the rerun goes straight through
    second = start()
    wait_for(lambda: jobs.row(job_id)["state"] == "succeeded", message="the rerun")
    assert f"Job {EFFECT_ACKED_EARLY}[{job_id}] was started by" in second.log
    assert "which sent no heartbeat for 2 s: re-queued." in second.log
    assert (
        f"Job {EFFECT_ACKED_EARLY}[{job_id}] was re-queued: the relay sent it again."
        in second.log
    )
    counts = figures(1, len(jobs.started(key)), [jobs.effects(key)])
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
    counts = figures(1, len(runs), [jobs.effects(key)])
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


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@contextmanager
def throwaway_postgres(tmp_path):
    """``(url, pg_ctl)`` of a PostgreSQL cluster of this test's own on a free
    port (trust authentication, no Unix socket, no fsync), removed at the end.

    ``pg_ctl("stop", "-m", "fast")`` and ``pg_ctl("start")`` stop and start
    it.  initdb refuses to run as root: as root, the cluster runs as the
    ``postgres`` user, in a folder that user can enter (pytest's folders are
    root's alone).
    """
    assert (PG_BIN / "initdb").exists(), f"PostgreSQL's initdb not in {PG_BIN}"
    # As root, the cluster's user is postgres: a folder of its own, outside
    # root's pytest folders, which it could not enter.
    root = os.geteuid() == 0
    as_user = ["runuser", "-u", "postgres", "--"] if root else []
    owner = pwd.getpwnam("postgres") if root else pwd.getpwuid(os.geteuid())
    folder = Path(tempfile.mkdtemp(prefix="pyramid_tasks_pg_"))
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def run(*command, check=True):
        return subprocess.run(
            [*as_user, *map(str, command)], check=check, capture_output=True
        )

    run(PG_BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
    options += " -c fsync=off"

    def pg_ctl(*args):
        return run(
            PG_BIN / "pg_ctl",
            "-D",
            data,
            "-o",
            options,
            "-l",
            folder / "log",
            "-w",
            *args,
        )

    pg_ctl("start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        run(PG_BIN / "pg_ctl", "-D", data, "stop", "-m", "immediate", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def sent_again(log):
    """The ids of the jobs the worker sent again, the database unreachable."""
    return set(re.findall(r"\[([-0-9a-f]+)\]: the database is unreachable", log))


def test_postgresql_restarted_under_a_running_worker(start, ini_vars, tmp_path):
    """Two batches of jobs, each behind a first job holding its transaction
    open.  Under the first, ``pg_ctl restart -m fast``: the held job's
    connection is gone when it commits.  Under the second the cluster stops,
    every job of the batch reaches the worker while it is down, then it
    starts.  Each job the database failed is sent again; every job takes
    effect once."""
    size = 10
    with throwaway_postgres(tmp_path) as (url, pg_ctl):
        ini_vars["database_url"] = url
        worker = start()
        jobs = Jobs(worker, ini_vars["redis_url"])
        keys = [jobs.key(index) for index in range(2 * size)]
        batches = [keys[:size], keys[size:]]
        ids = []

        def schedule(batch):
            ids.extend(jobs.schedule(RETRYABLE_EFFECT, batch[:1], wait=True))
            ids.extend(jobs.schedule(RETRYABLE_EFFECT, batch[1:]))

        def succeeded(batch):
            states = [jobs.row(ids[keys.index(key)])["state"] for key in batch]
            return states == ["succeeded"] * len(batch)

        # 1. Restarted under the held job; the batch drains behind it.
        schedule(batches[0])
        wait_for(lambda: jobs.started(batches[0][0]), message="the held job")
        pg_ctl("restart", "-m", "fast")
        jobs.engine.dispose()  # the test's own connections died too
        jobs.go(batches[0][0])
        wait_for(lambda: succeeded(batches[0]), message="the first batch")

        # 2. Stopped under the held job; the batch reaches a worker without
        # a database; started again.
        schedule(batches[1])
        wait_for(lambda: jobs.started(batches[1][0]), message="the second held job")
        pg_ctl("stop", "-m", "fast")
        jobs.go(batches[1][0])
        wait_for(
            lambda: set(ids[size:]) <= sent_again(worker.log),
            message="every job of the batch to meet the stopped database",
        )
        pg_ctl("start")
        jobs.engine.dispose()
        wait_for(lambda: succeeded(batches[1]), message="the second batch")

        again = sent_again(worker.log)
        counts = figures(
            len(ids),
            sum(len(jobs.started(key)) for key in keys),
            [jobs.effects(key) for key in keys],
        )
        rows = [jobs.row(job_id) for job_id in ids]
        print(
            f"sent again (the database unreachable): {len(again & set(ids[:size]))}"
            f" of the restart's batch, {len(again & set(ids[size:]))} of the"
            " stop's batch; rows succeeded:"
            f" {sum(row['state'] == 'succeeded' for row in rows)}"
        )
        # The two held jobs ran their bodies twice (the first run rolled
        # back); the others of the second batch never got past the start.
        assert counts == {
            "scheduled": 2 * size,
            "runs started": 2 * size + 2,
            "effects": 2 * size,
            "duplicates": 0,
            "lost": 0,
        }
        assert again == {ids[0], *ids[size:]}
        jobs.close()
        worker.stop()  # while its database is still there


def test_errors_that_are_no_outage_fail_the_run_as_before(ini_vars, tmp_path):
    """Only a refused or lost connection sends a job again, and only from a
    worker: the body's own error fails the job, and so does a job table
    that is not there."""
    settings = {"probe.redis_url": ini_vars["redis_url"]}
    ini = overlay_ini(tmp_path / "app.ini", "jobs_kill", ini_vars, settings)
    app = get_app(str(ini)).registry.celery_app
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    result = app.tasks[EFFECT].apply(("boom",), {"wait": False, "fail": True})
    assert isinstance(result.result, RuntimeError)
    row = store.get(result.id)
    assert (row["state"], row["error"]) == ("failed", "RuntimeError: boom failed")

    # Run eagerly, in the caller, a job is not sent again: the caller gets
    # the error.
    port = free_port()
    store.engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
    result = app.tasks[EFFECT].apply(("refused",), {"wait": False})
    assert isinstance(result.result, OperationalError)
    assert "Connection refused" in str(result.result)
    store.engine = app.pyramid_registry["dbsession_factory"].kw["bind"]

    Job.__table__.drop(store.engine)
    result = app.tasks[EFFECT].apply(("gone",), {"wait": False})
    assert isinstance(result.result, JobTableMissing)
    assert isinstance(result.result.__cause__, ProgrammingError)
    assert "jobs init-db" in str(result.result)


def _wrapped(error, invalidated=False):
    return DBAPIError.instance(
        "SELECT 1", {}, error, psycopg.Error, connection_invalidated=invalidated
    )


@pytest.mark.parametrize(
    "error, unreachable",
    [
        pytest.param(ValueError("no"), False, id="not-a-database-error"),
        pytest.param(
            _wrapped(psycopg.OperationalError("connection failed")),
            True,
            id="connection-refused",
        ),
        pytest.param(
            _wrapped(psycopg.errors.AdminShutdown("terminating"), True),
            True,
            id="connection-lost",
        ),
        pytest.param(
            _wrapped(psycopg.errors.QueryCanceled("statement timeout")),
            False,
            id="statement-timeout",
        ),
        pytest.param(
            _wrapped(psycopg.errors.UndefinedTable("no table")),
            False,
            id="programming-error",
        ),
        pytest.param(
            DBAPIError.instance(
                "SELECT 1",
                {},
                sqlite3.OperationalError("no such column: x"),
                sqlite3.Error,
            ),
            False,
            id="sqlite-statement",
        ),
        pytest.param(
            DBAPIError.instance(
                "UPDATE",
                {},
                sqlite3.OperationalError("database is locked"),
                sqlite3.Error,
            ),
            True,
            id="sqlite-locked",
        ),
    ],
)
def test_what_counts_as_the_database_unreachable(error, unreachable):
    assert _database_unreachable(error) is unreachable
