"""The end-to-end suite on each broker: Redis and RabbitMQ.

One real ``tasks-celery`` worker a broker (``conf/test.ini#jobs_probe``, the
job table and its relay, plus :mod:`tests.brokers_e2e_app`), shared by the
module's tests, on a queue and a PostgreSQL schema of the module's own; on
Redis, a redis-server of the module's own as the broker.  Each test
schedules as a view does, from the same INI loaded in this process, and
counts what happened: schedule on commit (run after a commit, never after
an abort), a deadlock retried by ``RetryableTransactionTask``, a beat entry
firing from a ``beat`` subprocess (started with the workers), the relay
sending a job committed while the broker was unreachable, and an
``acks_late`` job of a SIGKILLed worker run again by the shared one, its
effect once.
"""

import os
import signal
import subprocess
import uuid
from contextlib import ExitStack, suppress

import kombu
import pytest
import redis
import sqlalchemy
import transaction
from pyramid.paster import get_app
from sqlalchemy import func, insert, select, text

from demo_app.models import Order
from pyramid_tasks.jobs import Job
from pyramid_tasks.sqlalchemy import get_tm_session

from .conftest import (
    ROOT,
    Worker,
    free_port,
    overlay_ini,
    redis_server,
    tasks_celery,
    wait_for,
)

pytestmark = pytest.mark.counts

RECORD = "tests.jobs_probe_app.record"
HELD = "tests.jobs_probe_app.held"
DEADLOCKED = "tests.brokers_e2e_app.deadlocked"


class Site:
    """One broker's module: its INI, worker, app copy and counters."""

    def __init__(self, broker, broker_url, redis_url, database_url, folder):
        self.broker = broker
        self.token = uuid.uuid4().hex[:10]
        self.folder = folder
        self.queue = f"pyramid_tasks_test_{self.token}"
        self.values = {
            "broker_url": broker_url,
            "redis_url": redis_url,
            "database_url": database_url,
            "schema": f"pt_{self.token}",
            "queue": self.queue,
        }
        self.settings = {
            "probe.redis_url": redis_url,
            "pyramid.includes": "tests.brokers_e2e_app",
            "tasks.beat.e2e_tick.task": "tests.brokers_e2e_app.tick",
            "tasks.beat.e2e_tick.schedule": "0.5",
            "tasks.beat.e2e_tick.args": f'["{self.token}:tick"]',
        }
        if broker == "redis":
            # A killed worker's message comes back after this (an hour by
            # default): short, and the job's lock fences a live duplicate;
            # and the worker looks for such messages every second.  (kombu's
            # unacked hash is one a database: the broker is a redis-server
            # of the module's own, so no other test's messages come back.)
            options = "celery.broker_transport_options"
            self.settings[f"{options}.visibility_timeout"] = "2"
            self.settings[f"{options}.unacked_restore_interval"] = "1"
            self.settings[f"{options}.unacked_restore_throttle"] = "1"
        self.ini = self.write_ini("site")
        self.app = get_app(str(self.ini)).registry.celery_app
        self.registry = self.app.pyramid_registry
        self.engine = self.registry["dbsession_factory"].kw["bind"]
        self.client = redis.Redis.from_url(redis_url)
        self.processes = []

    def write_ini(self, name, **values):
        path = self.folder / f"{name}.ini"
        return overlay_ini(path, "jobs_probe", {**self.values, **values}, self.settings)

    def start(self, name, *arguments, ini=None):
        """A ``tasks-celery`` subprocess (worker or beat), in a session of
        its own; its output in ``<name>.log``."""
        command = [tasks_celery(), str(ini or self.ini), "--", *arguments]
        log_path = self.folder / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=self.folder,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process, log_path

    def worker(self, name, *arguments):
        """A worker started; :meth:`Worker.ping` says when it is up."""
        node = f"{name}_{self.token}@localhost"
        process, log_path = self.start(
            name,
            "worker",
            "-n",
            node,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-P",
            "threads",
            *arguments,
        )
        return Worker(process, node, log_path, self.app, self.ini, session=True)

    def key(self):
        return f"{self.token}:{uuid.uuid4().hex[:8]}"

    def schedule(self, name, *keys, abort=False, app=None, **options):
        """One transaction scheduling ``name`` once a key, as a view does
        (its session joined first); committed unless ``abort``."""
        app = app or self.app
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        session = get_tm_session(app.pyramid_registry["dbsession_factory"], tm)
        session.execute(text("SELECT 1"))
        ids = [app.tasks[name].apply_async((key,), tm=tm, **options).id for key in keys]
        if abort:
            tm.abort()
        else:
            tm.commit()
        return ids

    def effects(self, key):
        with self.engine.connect() as connection:
            query = select(func.count()).select_from(Order).where(Order.email == key)
            return connection.scalar(query)

    def state(self, job_id):
        with self.engine.connect() as connection:
            return connection.scalar(select(Job.state).where(Job.id == job_id))

    def runs(self, key):
        return int(self.client.get(f"{key}:runs") or 0)

    def close(self):
        running = [process for process in self.processes if process.poll() is None]
        for process in running:  # a warm shutdown saves its coverage
            process.terminate()
        # An idle worker on RabbitMQ sees the signal when its event loop next
        # wakes, up to 10 s later: a message wakes it now.
        self.app.control.ping(timeout=0.1)
        for process in self.processes:
            process.wait(timeout=60)
            with suppress(ProcessLookupError):  # what it left of its session
                os.killpg(process.pid, signal.SIGKILL)
        self.app.close()
        self.engine.dispose()
        if self.broker == "amqp":  # a private redis-server goes with its data
            with kombu.Connection(self.values["broker_url"]) as connection:
                channel = connection.default_channel
                for name in (self.queue, f"{self.queue}_kill"):
                    channel.queue_delete(name)
        self.client.delete(*self.client.scan_iter(f"{self.token}:*"))
        self.client.close()
        engine = sqlalchemy.create_engine(self.values["database_url"])
        with engine.begin() as connection:
            schema = self.values["schema"]
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="module", params=["redis", "amqp"])
def site(request, redis_url, database_url, tmp_path_factory):
    """The broker's site with its shared worker (``site.shared``)."""
    broker = request.param
    folder = tmp_path_factory.mktemp(broker)
    with ExitStack() as stack:
        if broker == "redis":
            url, _ = stack.enter_context(redis_server(folder))
        else:
            url = request.getfixturevalue("amqp_url")
        site = Site(broker, url, redis_url, database_url, folder)
        stack.callback(site.close)
        # All start at once: the victim is test_a_killed_workers...'s, the
        # beat test_a_beat_entry_fires's.
        site.shared = site.worker("shared", "-c", "4")
        site.victim = site.worker("victim", "-c", "1", "-Q", f"{site.queue}_kill")
        site.beat, _ = site.start("beat", "beat", "-s", str(folder / "beat"))
        for worker in (site.shared, site.victim):
            wait_for(worker.ping, timeout=60, message=f"worker {worker.node}")
        yield site


def test_a_task_runs_after_the_commit_never_after_an_abort(site):
    committed, aborted, after = site.key(), site.key(), site.key()
    [job_id] = site.schedule(RECORD, committed)
    [dropped] = site.schedule(RECORD, aborted, abort=True)
    [last] = site.schedule(RECORD, after)
    wait_for(lambda: site.state(last) == "succeeded", message="the last job")
    wait_for(lambda: site.state(job_id) == "succeeded", message="the first job")
    counts = {
        "committed effects": site.effects(committed),
        "aborted runs": site.runs(aborted),
        "aborted effects": site.effects(aborted),
        "aborted rows": int(site.state(dropped) is not None),
    }
    print(site.broker, counts)
    assert counts == {
        "committed effects": 1,
        "aborted runs": 0,
        "aborted effects": 0,
        "aborted rows": 0,
    }


def test_a_deadlocked_transaction_is_run_again(site):
    key = site.key()
    with site.engine.begin() as connection:
        connection.execute(
            insert(Order), [{"email": f"{key}:a"}, {"email": f"{key}:b"}]
        )
    [job_id] = site.schedule(DEADLOCKED, key)
    wait_for(lambda: site.state(job_id) == "succeeded", message="the retried job")
    attempts = [int(a) for a in site.client.lrange(f"{key}:attempts", 0, -1)]
    with site.engine.connect() as connection:
        query = select(Order.email, Order.status).where(Order.email.like(f"{key}:%"))
        statuses = dict(connection.execute(query).all())
    print(site.broker, "attempts:", attempts, "statuses:", statuses)
    assert attempts == [1, 2]
    assert statuses == {f"{key}:a": "task 2", f"{key}:b": "task 2"}
    assert "DeadlockDetected" in site.shared.log


def test_a_beat_entry_fires(site):
    """The module's beat subprocess sends the INI's 0.5 s entry; the shared
    worker runs it, again and again."""
    tick = f"{site.token}:tick"
    wait_for(lambda: int(site.client.get(tick) or 0) >= 2, message="two ticks")
    site.beat.terminate()
    site.beat.wait(timeout=30)
    print(site.broker, "ticks run:", int(site.client.get(tick)))


def test_the_relay_sends_a_job_committed_while_the_broker_was_down(site):
    """An app whose broker does not answer commits the job: its row stays
    ``pending``; a worker's relay sends it after the grace."""
    scheme = "redis://" if site.broker == "redis" else "amqp://guest:guest@"
    down = f"{scheme}127.0.0.1:{free_port()}/"
    web = get_app(str(site.write_ini("down", broker_url=down))).registry.celery_app
    key = site.key()
    try:
        [job_id] = site.schedule(RECORD, key, app=web)
        assert site.state(job_id) == "pending"
    finally:
        web.close()
    wait_for(lambda: site.state(job_id) == "succeeded", message="the relayed job")
    print(site.broker, "effects:", site.effects(key), "runs:", site.runs(key))
    assert (site.effects(key), site.runs(key)) == (1, 1)
    sent = f"Job {RECORD}[{job_id}] was committed but not at the broker: the relay"
    # A relay in each worker and in beat: one of them sent it.
    logs = site.shared.log + site.victim.log + (site.folder / "beat.log").read_text()
    assert f"{sent} sent it." in logs


def test_a_killed_workers_acks_late_job_runs_again_once(site):
    """The job runs on a worker of its own queue, which is SIGKILLed
    mid-run; then the shared worker consumes that queue too and gets the
    unacknowledged message: at once from RabbitMQ, after the visibility
    timeout from Redis.  The dead run's effect was rolled back."""
    kill_queue, victim = f"{site.queue}_kill", site.victim
    key = site.key()
    [job_id] = site.schedule(HELD, key, queue=kill_queue)
    wait_for(lambda: site.client.llen(f"{key}:started") == 1, message="the first run")
    victim.process.kill()
    victim.process.wait()
    site.app.control.add_consumer(
        kill_queue, destination=[site.shared.node], reply=True
    )
    site.client.rpush(f"{key}:go", "go")
    try:
        wait_for(lambda: site.state(job_id) == "succeeded", message="the rerun")
    finally:
        site.app.control.cancel_consumer(
            kill_queue, destination=[site.shared.node], reply=True
        )
    counts = {
        "runs started": site.client.llen(f"{key}:started"),
        "effects": site.effects(key),
    }
    print(site.broker, counts)
    assert counts == {"runs started": 2, "effects": 1}
