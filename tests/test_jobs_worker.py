"""Durable mode, worker side: real ``tasks-celery`` workers record each run
of a job in its row (``pyramid_tasks_job``, in the test's own schema).

The probe app's tasks (tests/jobs_probe_app.py) count their runs in Redis,
outside any transaction, and leave their effect in the database: an
``orders`` row whose email is the test's key.
"""

import time
import uuid

import pytest
import sqlalchemy
import transaction
from celery.utils import uuid as task_id
from pyramid.paster import get_app
from sqlalchemy import event, func, select

from demo_app.models import Order, get_tm_session

from .conftest import overlay_ini, wait_for

SECTION = "jobs_probe"


def web_app(tmp_path, ini_vars, name, settings=None, **values):
    """The probe app's Celery app, as a web process of its own loads it."""
    values = {**ini_vars, **values}
    settings = {"probe.redis_url": ini_vars["redis_url"], **(settings or {})}
    ini = overlay_ini(tmp_path / f"{name}.ini", SECTION, values, settings)
    return get_app(str(ini)).registry.celery_app


def worker_starter(start_worker, ini_vars):
    """Start workers on ``conf/test.ini#jobs_probe`` (the test gets their app
    too); their logs are printed at teardown, shown when the test fails."""
    workers = []

    def start(*args):
        settings = {"probe.redis_url": ini_vars["redis_url"]}
        workers.append(start_worker(*args, section=SECTION, settings=settings))
        return workers[-1]

    yield start
    for worker in workers:
        print(f"--- the log of {worker.node} ends:\n{worker.log[-5000:]}")


@pytest.fixture
def jobs_worker(start_worker, ini_vars):
    yield from worker_starter(start_worker, ini_vars)


class Probe:
    """The test's side of the probe app: send jobs, read rows and effects."""

    def __init__(self, app, redis_client):
        self.app = app
        self.redis = redis_client
        registry = app.pyramid_registry
        self.store = registry.pyramid_tasks_jobs.store
        self.session_factory = registry["dbsession_factory"]
        self.schema = registry.settings["demo.schema"]
        self.keys = []

    def key(self):
        """A key of this test's own: the effect's email, and Redis keys."""
        key = f"jobs:{uuid.uuid4().hex}"
        self.keys.append(key)
        return key

    def task(self, name):
        return self.app.tasks[f"tests.jobs_probe_app.{name}"]

    def commit(self, name, *calls, web_key=None, **options):
        """One web transaction: an ``orders`` row ``web_key`` (if given) and
        one job per item of ``calls`` (its args, and ``options``), sent on
        commit; their ids."""
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            if web_key is not None:
                get_tm_session(self.session_factory, tm).add(Order(email=web_key))
            task = self.task(name)
            ids = [task.apply_async(args, tm=tm, **options).id for args in calls]
        # The rows the broker took are marked queued by the marker thread.
        assert self.app.pyramid_registry.pyramid_tasks_jobs.flush(10)
        return ids

    def job(self, job_id):
        return self.store.get(job_id)

    def wait_state(self, job_id, *states, timeout=30):
        """The job's row, once its state is one of ``states``."""
        wait_for(
            lambda: self.store.state(job_id) in states,
            timeout=timeout,
            message=f"job {job_id} to be {'/'.join(states)}",
        )
        return self.job(job_id)

    def effects(self, email):
        """Rows of ``orders`` with this email: the effect, once per commit."""
        with self.store.engine.connect() as connection:
            return connection.scalar(
                select(func.count()).select_from(Order).where(Order.email == email)
            )

    def emails(self, prefix):
        with self.store.engine.connect() as connection:
            return sorted(
                connection.scalars(
                    select(Order.email).where(Order.email.startswith(prefix))
                )
            )

    def runs(self, key):
        """Runs of the body (counted in Redis: never rolled back)."""
        return int(self.redis.get(f"{key}:runs") or 0)

    def xmin(self, table, column, value):
        """PostgreSQL's id of the transaction that last wrote the row."""
        sql = f'SELECT xmin::text FROM "{self.schema}".{table} WHERE {column} = :v'
        with self.store.engine.connect() as connection:
            return connection.scalar(sqlalchemy.text(sql), {"v": value})

    def close(self):
        suffixes = (":runs", ":ready", ":go", ":started")
        self.redis.delete(*[key + end for key in self.keys for end in suffixes])


def test_transactional_jobs_mark_succeeded_in_their_own_transaction(
    jobs_worker, ini_vars, redis_client
):
    """The effect and the ``succeeded`` mark are one commit (one PostgreSQL
    transaction id); a failure rolls the effect back and records the error
    and its traceback; a job sent by name, with no row, gets one."""
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    ok, once, failing, named = (probe.key() for _ in range(4))
    ok_id, fail_id = probe.commit("record", (ok,), (failing, "it fails"))
    [once_id] = probe.commit("record_once", (once,))
    named_id = worker.celery_app.send_task(
        "tests.jobs_probe_app.record_once", args=[named]
    ).id

    for job_id, key in ((ok_id, ok), (once_id, once), (named_id, named)):
        row = probe.wait_state(job_id, "succeeded", "failed")
        assert (row["state"], row["attempts"], row["error"]) == ("succeeded", 1, None)
        assert (probe.runs(key), probe.effects(key), row["progress"]) == (1, 1, 100)
        assert row["finished_at"] >= row["started_at"]
        assert probe.xmin("orders", "email", key) == probe.xmin(
            "pyramid_tasks_job", "id", job_id
        )
    row = probe.wait_state(fail_id, "failed", "succeeded")
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert row["error"] == "ValueError: it fails"
    assert row["traceback"].startswith("Traceback (most recent call last):")
    assert "jobs_probe_app.py" in row["traceback"]
    assert row["traceback"].rstrip().endswith("ValueError: it fails")
    assert (probe.runs(failing), probe.effects(failing)) == (1, 0)
    # Sent by name: the worker made the row as it started the job.
    row = probe.job(named_id)
    assert (row["name"], row["args"], row["published_at"]) == (
        "tests.jobs_probe_app.record_once",
        [named],
        None,
    )
    assert row["queue"] == ini_vars["queue"]
    assert row["created_at"] == row["started_at"]
    probe.close()


def test_a_long_transactional_run_shows_started_while_it_runs(
    jobs_worker, redis_client
):
    """A transactional run with ``acks_late`` does not wait for its started
    mark: the worker's heartbeat thread writes it for a run still going half
    a second later, so the row shows ``started`` within about a second, and
    the succeeded mark keeps its start."""
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    [job_id] = probe.commit("watched_in_tm", (key,))
    wait_for(lambda: redis_client.llen(f"{key}:ready"), message="the task to run")
    running = time.monotonic()  # the body runs: its lock read the row
    row = probe.wait_state(job_id, "started", timeout=10)
    waited = time.monotonic() - running
    print(f"started shown {waited:.2f} s after the body began")
    assert waited < 2
    assert (row["attempts"], row["finished_at"]) == (1, None)
    assert row["worker"] and row["heartbeat_at"] >= row["started_at"]
    redis_client.rpush(f"{key}:go", "go")
    done = probe.wait_state(job_id, "succeeded")
    assert (done["attempts"], done["started_at"]) == (1, row["started_at"])
    assert probe.effects(key) == 1
    probe.close()


def test_celery_retry_marks_the_job_retrying_then_succeeded(jobs_worker, redis_client):
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    [job_id] = probe.commit("retried", (key,))

    row = probe.wait_state(job_id, "retrying")  # for the second of countdown
    assert (row["attempts"], row["error"]) == (1, "KeyError: 'first run'")
    assert probe.effects(key) == 0
    row = probe.wait_state(job_id, "succeeded")
    assert row["attempts"] == 2
    assert (probe.runs(key), probe.effects(key)) == (2, 1)
    probe.close()


def test_a_plain_task_shows_its_progress_and_job_while_it_runs(
    jobs_worker, redis_client
):
    """The classes that are not transactional are marked in short
    transactions of their own: started and the progress are visible while
    the task runs, succeeded after."""
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key, plain = probe.key(), probe.key()
    [job_id] = probe.commit("watched", (key,))

    wait_for(lambda: redis_client.llen(f"{key}:ready"), message="the task to run")
    row = probe.job(job_id)
    assert (row["state"], row["attempts"]) == ("started", 1)
    # The second call came within the throttle's half second: not written.
    assert (row["progress"], row["progress_message"]) == (25, "one of four")
    assert row["heartbeat_at"] == row["started_at"]
    assert row["worker"]
    redis_client.rpush(f"{key}:go", "go")
    result = worker.celery_app.AsyncResult(job_id).get(timeout=30)
    # self.job, read by the task: its row as it ran.
    assert result == {
        "id": job_id,
        "state": "started",
        "attempts": 1,
        "progress": 25,
        "cancel_requested": False,
    }
    row = probe.wait_state(job_id, "succeeded")
    # Its last report (25 %, "one of four") is not its end: the message goes.
    assert (row["attempts"], row["progress"], row["progress_message"]) == (
        1,
        100,
        None,
    )

    plain_id = probe.task("plain").delay(plain).id  # its row written after the send
    row = probe.wait_state(plain_id, "succeeded", "failed")
    assert (row["state"], probe.effects(plain)) == ("succeeded", 1)
    # Its own transaction for the effect, another for the mark.
    assert probe.xmin("orders", "email", plain) != probe.xmin(
        "pyramid_tasks_job", "id", plain_id
    )
    probe.close()


def test_a_running_task_sees_its_job_cancelled(jobs_worker, redis_client):
    """Cooperative cancellation: cancel_requested() turns true within about a
    second; the task returns (or raises) and its row stays cancelled; a
    transactional task that returns normally is rolled back all the same.
    Neither JobSucceeded nor JobFailed is sent for a cancelled job."""
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    runs = {}
    for case, name, fail in (
        ("returns", "cancellable", False),
        ("raises", "cancellable", True),
        ("in_tm", "watched_in_tm", False),
    ):
        key = probe.key()
        [job_id] = probe.commit(name, (key, fail) if fail else (key,))
        wait_for(lambda k=key: redis_client.llen(f"{k}:ready"), message=case)
        assert probe.store.cancel([job_id]) == [job_id]
        redis_client.rpush(f"{key}:go", "go")
        result = worker.celery_app.AsyncResult(job_id)
        if case == "in_tm":  # Ignore: no result is stored
            wait_for(
                lambda i=job_id: f"[{i}] became cancelled while it ran" in worker.log,
                message=case,
            )
        else:
            result.get(timeout=30, propagate=False)
        runs[case] = (result, probe.job(job_id), key)

    result, row, _ = runs["returns"]
    assert result.result == {"before": False, "cancelled": True}
    assert (row["state"], row["attempts"], row["error"]) == ("cancelled", 1, None)
    result, row, _ = runs["raises"]
    assert repr(result.result) == "RuntimeError('stopped: cancelled')"
    assert (row["state"], row["attempts"], row["error"]) == ("cancelled", 1, None)
    # The body saw the cancellation and returned True; the commit found the
    # job cancelled: rolled back, and Celery's Ignore (no result, no callback).
    result, row, key = runs["in_tm"]
    assert result.state == "PENDING"  # nothing stored
    assert (row["state"], row["attempts"]) == ("cancelled", 1)
    assert (probe.runs(key), probe.effects(key)) == (1, 0)
    assert f"[{row['id']}] became cancelled while it ran: rolled back." in worker.log
    # Each run's JobStarted, and nothing after it.
    assert probe.emails("event:") == sorted(
        f"event:{row['id']}:JobStarted" for _, row, _ in runs.values()
    )
    probe.close()


def test_job_events_run_on_the_worker_with_a_working_request(jobs_worker, redis_client):
    """JobStarted, JobSucceeded and JobFailed subscribers write through the
    event's request.tm and dbsession; one that raises is rolled back and
    logged, and changes nothing else."""
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    ok, failing = probe.key(), probe.key()
    ok_id, fail_id = probe.commit("evented", (ok,), (failing, True))

    assert probe.wait_state(ok_id, "succeeded", "failed")["state"] == "succeeded"
    assert probe.wait_state(fail_id, "failed", "succeeded")["state"] == "failed"
    assert (probe.effects(ok), probe.effects(failing)) == (1, 0)
    wait_for(
        lambda: len(probe.emails("event:")) == 4, message="the events' rows"
    )  # JobFailed runs after the failed mark
    assert probe.emails("event:") == sorted(
        [
            f"event:{ok_id}:JobStarted",
            f"event:{ok_id}:JobSucceeded",
            f"event:{fail_id}:JobStarted",
            f"event:{fail_id}:JobFailed:ValueError",
        ]
    )
    assert probe.emails("raised:") == []
    log = worker.log
    for name, job_id in (
        ("JobStarted", ok_id),
        ("JobSucceeded", ok_id),
        ("JobStarted", fail_id),
        ("JobFailed", fail_id),
    ):
        assert (
            f"A subscriber of {name} for job tests.jobs_probe_app.evented"
            f"[{job_id}] failed; the job goes on." in log
        )
    probe.close()


def test_a_row_committed_as_the_worker_starts_the_job_does_not_skip_it(
    ini_vars, redis_client, tmp_path
):
    """A task sent without tm= (delay(), beat) gets its row after the send:
    it may commit between the worker's UPDATE, which found no row, and its
    read of the state.  The job is started, not skipped as if finished."""
    app = web_app(tmp_path, ini_vars, "web")
    jobs = app.pyramid_registry.pyramid_tasks_jobs
    task = app.tasks["tests.jobs_probe_app.plain"]
    job_id = task_id()
    sender_row = jobs.row(task, job_id, ("k",), {}, {}, state="queued")
    committed = []

    def sender_commits(conn, cursor, statement, parameters, context, many):
        if statement.startswith("UPDATE") and not committed:
            jobs.store.insert_missing([sender_row])  # another connection
            committed.append(job_id)

    event.listen(jobs.store.engine, "after_cursor_execute", sender_commits)
    try:
        started = jobs.store.start(
            {"id": job_id, "name": task.name, "args": ["k"], "kwargs": {}}
        )
    finally:
        event.remove(jobs.store.engine, "after_cursor_execute", sender_commits)
    assert committed == [job_id]
    assert started == (1, "started", None)  # attempt, state, title
    row = jobs.store.get(job_id)
    assert (row["state"], row["attempts"]) == ("started", 1)
    app.close()
