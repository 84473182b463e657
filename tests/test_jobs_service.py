"""The job service (pyramid_tasks.jobs.service) against real PostgreSQL, Redis
(and RabbitMQ for its broker counts), and real workers for what a worker
must see: a cancelled job never runs, a retried one runs again, the test job
is logged.

Rows that only the table must hold (old, finished, in other queues) are
inserted directly; jobs at the broker are committed through the probe app.
"""

import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, update

from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import (
    JOB_KEYS,
    BadParameter,
    JobError,
    JobService,
    UnknownJob,
    _route_queues,
    job_json,
)

from .conftest import free_port, wait_for
from .test_jobs_worker import Probe, web_app, worker_starter

PLAIN = "tests.jobs_probe_app.plain"
NOW = datetime.now(UTC)


def service_of(app):
    return JobService.from_registry(app.pyramid_registry)


@pytest.fixture
def jobs_worker(start_worker, ini_vars):
    yield from worker_starter(start_worker, ini_vars)


@pytest.fixture
def app(tmp_path, ini_vars):
    app = web_app(tmp_path, ini_vars, "web")
    yield app
    app.close()


@pytest.fixture
def service(app):
    return service_of(app)


def add_jobs(service, *rows):
    """Insert rows (dicts of column values over a queued ``plain`` job of
    the app's default queue); their ids."""
    jobs = service.jobs
    task = service.app.tasks[PLAIN]
    made = []
    for values in rows:
        job_id = values.get("id") or str(uuid.uuid4())
        row = jobs.row(task, job_id, ("k",), {}, {}, state="queued", now=NOW)
        row.update({"lost": 0, **values})
        made.append(row)
    keys = {key for row in made for key in row}  # one statement: the same keys
    made = [{key: row.get(key) for key in keys} for row in made]
    with service.store.engine.begin() as connection:
        service.store.insert(connection, made)
    return [row["id"] for row in made]


SERVICE_LOGGER = "pyramid_tasks.jobs.service"


def service_lines(caplog):
    """The INFO lines of the service's logger."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == SERVICE_LOGGER and r.levelno == logging.INFO
    ]


def states(service, ids):
    return [service.store.state(job_id) for job_id in ids]


def error_of(func, *args, **kwargs):
    with pytest.raises(JobError) as info:
        func(*args, **kwargs)
    return info.value


# -- job_json ------------------------------------------------------------------


def test_job_json_is_every_column_times_in_utc_and_json_values():
    naive = datetime(2026, 12, 2, 3, 20, 11)  # SQLite's: UTC without tzinfo
    row = {
        "id": "j1",
        "name": "t",
        "args": [datetime(2026, 1, 2, tzinfo=UTC), 1],
        "kwargs": {"a": "b"},
        "options": {"queue": "q"},
        "created_at": naive,
        "finished_at": datetime(
            2026, 12, 2, 6, 20, 11, tzinfo=timezone(timedelta(hours=2))
        ),
        "state": "queued",
    }
    found = job_json(row)
    assert tuple(found) == JOB_KEYS == tuple(c.name for c in Job.__table__.columns)
    assert found["created_at"] == "2026-12-02T03:20:11.000000+00:00"
    assert found["finished_at"] == "2026-12-02T04:20:11.000000+00:00"
    assert found["started_at"] is None
    assert found["args"] == [
        {"__type__": "datetime", "__value__": "2026-01-02T00:00:00+00:00"},
        1,
    ]
    assert found["kwargs"] == {"a": "b"}
    assert found["options"] == {"queue": "q"}
    assert job_json(found) == found  # the JSON form of its JSON form


# -- list ------------------------------------------------------------------------


def test_list_pages_return_every_row_exactly_once_newest_first(service):
    """30 rows, three to a creation time; every page size walks them all,
    in (created_at, id) descending order, whatever the filters."""
    states_ = ["queued", "failed", "succeeded"]
    rows = [
        {
            "id": f"job-{i:02d}",
            "state": states_[i % 3],
            "created_at": NOW - timedelta(minutes=i // 3),
            "title": f"Report {i}" if i % 2 else None,
        }
        for i in range(30)
    ]
    add_jobs(service, *rows)
    expected = [
        r["id"]
        for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    ]

    def walk(limit, **filters):
        seen, before = [], None
        while True:
            page = service.list(before=before, limit=limit, **filters)
            assert len(page) <= limit
            seen += [job["id"] for job in page]
            if len(page) < limit:
                return seen
            before = page[-1]["id"]

    for limit in (1, 4, 7, 30, 1000):
        assert walk(limit) == expected, limit
    wanted = {"queued", "failed"}
    by_state = [i for i in expected if rows[int(i[4:])]["state"] in wanted]
    assert walk(4, state=sorted(wanted)) == by_state
    assert walk(3, state="succeeded") == [
        i for i in expected if rows[int(i[4:])]["state"] == "succeeded"
    ]
    titled = [
        i for i in expected if (rows[int(i[4:])]["title"] or "").startswith("Report 1")
    ]
    assert walk(2, title="RePoRt 1") == titled
    assert service.list(title="100%") == []  # % is a character, not a wildcard
    queue = service.app.conf.task_default_queue
    assert walk(8, queue=queue, name=[PLAIN]) == expected
    assert service.list(name="other.task") == []
    first = service.list(limit=1)[0]
    assert first == service.get("job-02")
    assert first["created_at"] == NOW.isoformat(timespec="microseconds")
    assert service.list(limit="2") == service.list(limit=2)


def test_list_with_no_rows(service):
    assert service.list() == []


@pytest.mark.parametrize(
    ("options", "parameter", "message"),
    [
        ({"state": "done"}, "state", "unknown state 'done': expected one of pending,"),
        ({"state": ["queued", 3]}, "state", "bad state 3: not a name"),
        ({"state": [""]}, "state", "bad state '': not a name"),
        ({"queue": "nowhere"}, "queue", "unknown queue 'nowhere': not configured"),
        ({"name": ""}, "name", "bad name '': not a name"),
        ({"title": 5}, "title", "bad title 5: not a string"),
        ({"limit": 0}, "limit", "bad limit 0: expected 1 to 1000"),
        ({"limit": 1001}, "limit", "bad limit 1001: expected 1 to 1000"),
        ({"limit": "ten"}, "limit", "bad limit 'ten': not a whole number"),
        ({"limit": True}, "limit", "bad limit True: not a whole number"),
        ({"before": "no-such-job"}, "before", "bad before 'no-such-job': no job"),
        ({"before": 12}, "before", "bad before 12"),
    ],
)
def test_list_refuses_bad_parameters(service, options, parameter, message):
    add_jobs(service, {})
    error = error_of(service.list, **options)
    assert isinstance(error, BadParameter)
    assert error.name == parameter
    assert str(error).startswith(message)
    assert "\n" not in str(error)


def test_get_an_unknown_id(service):
    error = error_of(service.get, "nope")
    assert isinstance(error, UnknownJob)
    assert (error.job_id, str(error)) == ("nope", "no job has the id 'nope'")


# -- queues ----------------------------------------------------------------------


def test_known_queues_are_the_configured_ones_and_those_of_the_table(
    tmp_path, ini_vars, redis_client, caplog
):
    site = f"site{uuid.uuid4().hex[:8]}"
    app = web_app(
        tmp_path,
        ini_vars,
        "routed",
        {
            "tasks.queue_prefix": site,
            "celery.task_routes": '{"reports.*": {"queue": "reports"}, '
            '"mail.send": "mail", "other": {"exchange": "x"}}',
        },
    )
    service = service_of(app)
    default = f"{site}.{ini_vars['queue']}"
    assert service.configured_queues() == [default, f"{site}.mail", f"{site}.reports"]
    add_jobs(
        service, {"queue": "legacy"}, {"queue": f"{site}.b"}, {"queue": f"{site}.b"}
    )
    with service.store.engine.connect() as connection:
        assert service.table_queues(connection) == ["legacy", f"{site}.b"]
    # Given without the prefix, or with it; a queue only the table knows.
    caplog.set_level(logging.INFO, SERVICE_LOGGER)
    job_id = service.test("reports")
    assert service.get(job_id)["queue"] == f"{site}.reports"
    assert service_lines(caplog) == [f"Test job {job_id} sent."]
    assert redis_client.llen(f"{site}.reports") == 1
    redis_client.delete(f"{site}.reports")
    by_name = service.list(queue=[f"{site}.b", "b", "legacy"], limit=5)
    assert len(by_name) == 3
    assert by_name == service.list(queue=["legacy", f"{site}.b"], limit=5)
    assert str(error_of(service.list, queue="nowhere")) == (
        "unknown queue 'nowhere': not configured and no job has it"
    )
    app.close()


def test_route_queues_of_celery_routers():
    from celery.app.routes import MapRoute

    router = MapRoute({"a": {"queue": "one"}, "b.*": "two", "c": {"queue": None}})
    assert sorted(_route_queues(router, str.upper)) == ["one", "two"]
    assert _route_queues(lambda *a, **k: None, str.upper) == []


# -- cancel, retry ------------------------------------------------------------


def test_cancel_validates_every_id_first(service):
    queued, done = add_jobs(service, {}, {"state": "succeeded"})
    error = error_of(service.cancel, [queued, "nope"])
    assert isinstance(error, UnknownJob) and error.job_id == "nope"
    assert str(error_of(service.cancel, [])) == "no job id given"
    assert states(service, [queued, done]) == ["queued", "succeeded"]

    assert service.cancel([queued, done]) == [
        {
            "id": queued,
            "state_before": "queued",
            "state": "cancelled",
            "cancelled": True,
        },
        {
            "id": done,
            "state_before": "succeeded",
            "state": "succeeded",
            "cancelled": False,
        },
    ]
    row = service.get(queued)
    assert row["finished_at"] is not None
    assert service.cancel(queued) == [
        {
            "id": queued,
            "state_before": "cancelled",
            "state": "cancelled",
            "cancelled": False,
        }
    ]


def test_cancel_takes_the_state_the_job_moved_to_meanwhile(service):
    """Read queued, started by a worker before the UPDATE: the UPDATE naming
    queued changes nothing, and the job is cancelled as started."""
    [job_id] = add_jobs(service, {})
    engine = service.store.engine
    moved = []

    def worker_starts_it(conn, cursor, statement, *args):
        if statement.startswith("UPDATE") and not moved:
            moved.append(job_id)
            with engine.begin() as other:
                other.execute(
                    update(Job.__table__)
                    .where(Job.id == job_id)
                    .values(state="started", attempts=1)
                )

    event.listen(engine, "before_cursor_execute", worker_starts_it)
    try:
        result = service.cancel([job_id])
    finally:
        event.remove(engine, "before_cursor_execute", worker_starts_it)
    assert moved == [job_id]
    assert result == [
        {
            "id": job_id,
            "state_before": "started",
            "state": "cancelled",
            "cancelled": True,
        }
    ]


def test_retry_takes_only_failed_cancelled_or_dead_jobs(service):
    ids = add_jobs(
        service,
        {"state": "failed"},
        {"state": "queued"},
        {"state": "dead"},
    )
    error = error_of(service.retry, ids)
    assert (type(error), error.name, error.value) == (BadParameter, "id", ids[1])
    assert str(error) == (
        f"job {ids[1]} is queued: only a failed, cancelled or dead job is retried"
    )
    error = error_of(service.retry, [ids[0], "nope"])
    assert isinstance(error, UnknownJob)
    assert states(service, ids) == ["failed", "queued", "dead"]


def test_retry_refuses_a_job_changed_meanwhile_and_changes_nothing(service):
    first, second = add_jobs(service, {"state": "failed"}, {"state": "dead"})
    engine = service.store.engine
    seen = []

    def someone_retries_the_second(conn, cursor, statement, parameters, *args):
        if statement.startswith("UPDATE"):
            seen.append(statement)
            if len(seen) == 2:
                with engine.begin() as other:
                    other.execute(
                        update(Job.__table__)
                        .where(Job.id == second)
                        .values(state="pending")
                    )

    event.listen(engine, "before_cursor_execute", someone_retries_the_second)
    try:
        error = error_of(service.retry, [first, second])
    finally:
        event.remove(engine, "before_cursor_execute", someone_retries_the_second)
    assert str(error) == f"job {second} changed meanwhile: try again"
    assert states(service, [first, second]) == ["failed", "pending"]


def test_retry_refuses_a_job_whose_unique_key_another_unfinished_job_holds(
    service,
):
    # Scheduled: three jobs, two sharing a key; the failed one's key is held by
    # a queued one.  Retried: none; changed: none.
    failed, holder, other = add_jobs(
        service,
        {"state": "failed", "unique_key": "report-7"},
        {"state": "queued", "unique_key": "report-7"},
        {"state": "dead"},
    )
    error = error_of(service.retry, [other, failed])
    assert (type(error), error.name, error.value) == (BadParameter, "id", failed)
    assert str(error) == (
        f"job {failed} has the unique_key 'report-7', which the unfinished job "
        f"{holder} holds: retry it once that one is finished"
    )
    assert states(service, [failed, holder, other]) == ["failed", "queued", "dead"]
    # Two jobs of one key retried together: refused by name, nothing changed.
    service.cancel([holder])
    error = error_of(service.retry, [other, holder, failed])
    assert (error.name, error.value, str(error)) == (
        "id",
        failed,
        f"jobs {holder} and {failed} have the same unique_key 'report-7': only "
        "one of them can be unfinished, retry one",
    )
    assert states(service, [failed, holder, other]) == ["failed", "cancelled", "dead"]
    # The holder cancelled, the key is free: the failed job runs again.
    service.cancel([holder])
    [retried] = service.retry([failed])
    assert retried["state"] == "queued"
    assert states(service, [failed, holder]) == ["queued", "cancelled"]


def test_ids_are_read_in_batches(service):
    service.batch_size = 2
    ids = add_jobs(service, *({} for _ in range(5)))
    assert [r["cancelled"] for r in service.cancel(ids)] == [True] * 5


# -- prune -------------------------------------------------------------------------


def test_prune_deletes_exactly_the_old_finished_rows_in_batches(service):
    old, young = NOW - timedelta(days=10), NOW - timedelta(hours=1)
    finished_old = {"created_at": old, "finished_at": old + timedelta(hours=1)}
    add_jobs(
        service,
        *({"state": "succeeded", **finished_old} for _ in range(250)),
        *({"state": "failed", **finished_old} for _ in range(3)),
        {"state": "cancelled", **finished_old},
        # Created long ago, finished an hour ago: kept.
        {"state": "succeeded", "created_at": old, "finished_at": young},
        {"state": "failed", "created_at": young, "finished_at": young},
        # Unfinished, however old: kept.
        {"state": "queued", "created_at": old},
        {"state": "started", "created_at": old},
    )
    service.batch_size = 100
    deletes = []

    def count(conn, cursor, statement, *args):
        deletes.append((statement.split()[0], cursor.rowcount))

    engine = service.store.engine
    event.listen(engine, "after_cursor_execute", count)
    try:
        assert service.prune("7d") == {
            "succeeded": 250,
            "failed": 3,
            "cancelled": 1,
            "dead": 0,
        }
    finally:
        event.remove(engine, "after_cursor_execute", count)
    # At most batch_size rows a statement: 100, 100, 50, then one per state.
    assert deletes == [("DELETE", n) for n in (100, 100, 50, 3, 1, 0)]
    left = sorted(job["state"] for job in service.list(limit=100))
    assert left == ["failed", "queued", "started", "succeeded"]
    assert service.prune(older_than=0, states="failed") == {"failed": 1}
    assert service.prune(timedelta(minutes=30), ["succeeded", "dead"]) == {
        "succeeded": 1,
        "dead": 0,
    }
    assert sorted(job["state"] for job in service.list()) == ["queued", "started"]


def test_prune_by_default_keeps_the_retention(service):
    created = NOW - timedelta(days=9)
    add_jobs(
        service,
        {
            "state": "succeeded",
            "created_at": created,
            "finished_at": NOW - timedelta(days=8),
        },
        {
            "state": "succeeded",
            "created_at": created,
            "finished_at": NOW - timedelta(days=6),
        },
    )
    assert service.jobs.settings.retention == 7 * 86400
    assert service.prune() == {"succeeded": 1, "failed": 0, "cancelled": 0, "dead": 0}


@pytest.mark.parametrize(
    ("options", "parameter", "message"),
    [
        (
            {"older_than": "3x"},
            "older_than",
            "bad older_than '3x': expected a duration",
        ),
        ({"older_than": -1}, "older_than", "bad older_than -1: expected a duration"),
        ({"older_than": True}, "older_than", "bad older_than True: expected"),
        ({"states": "queued"}, "state", "unknown finished state 'queued': expected"),
        ({"states": ["failed", "x"]}, "state", "unknown finished state 'x'"),
    ],
)
def test_prune_refuses_bad_parameters_and_deletes_nothing(
    service, options, parameter, message
):
    [job_id] = add_jobs(
        service, {"state": "failed", "finished_at": NOW - timedelta(days=30)}
    )
    error = error_of(service.prune, **options)
    assert (error.name, str(error)[: len(message)]) == (parameter, message)
    assert states(service, [job_id]) == ["failed"]


# -- the broker: depth, clear ----------------------------------------------------


def test_depth_shows_the_table_and_the_broker_side_by_side(app, service, redis_client):
    probe = Probe(app, redis_client)
    queue = app.conf.task_default_queue
    probe.commit("record_once", *((probe.key(),) for _ in range(3)))
    probe.commit("record_once", (probe.key(),), countdown=300)  # scheduled
    # Committed, never at the broker (the relay's to send); another queue
    # that only the table knows, and its broker does not.
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    add_jobs(
        service,
        {"state": "pending", "created_at": NOW - timedelta(seconds=90)},
        {"state": "queued", "queue": ghost, "created_at": datetime.now(UTC)},
        {"state": "retrying", "queue": ghost},
        {"state": "succeeded", "queue": ghost},
    )
    assert service.jobs.flush(10)  # the marks of the published: queued, scheduled
    found = service.depth(include_scheduled=True)
    assert found == [
        {
            "queue": ghost,
            "waiting": 1,
            "broker": 0,
            "oldest_waiting_age": found[0]["oldest_waiting_age"],
            "scheduled": 1,
        },
        {
            "queue": queue,
            "waiting": 4,
            "broker": 4,  # the scheduled job too, until a worker takes it
            "oldest_waiting_age": found[1]["oldest_waiting_age"],
            "scheduled": 1,
        },
    ]
    assert found[1]["oldest_waiting_age"] >= 90
    assert 0 <= found[0]["oldest_waiting_age"] < 90
    plain = service.depth()
    assert [
        {k: v for k, v in d.items() if k != "oldest_waiting_age"} for d in plain
    ] == [
        {"queue": ghost, "waiting": 1, "broker": 0},
        {"queue": queue, "waiting": 4, "broker": 4},
    ]
    redis_client.delete(queue)
    probe.close()


def test_clear_cancels_the_waiting_jobs_and_purges_the_broker(
    app, service, redis_client
):
    probe = Probe(app, redis_client)
    queue = app.conf.task_default_queue
    other = f"{queue}_other"
    mine = probe.commit("record_once", *((probe.key(),) for _ in range(3)))
    theirs = probe.commit(
        "record_once", *((probe.key(),) for _ in range(2)), queue=other
    )
    [pending, running] = add_jobs(service, {"state": "pending"}, {"state": "started"})
    service.batch_size = 2  # two batches for the four waiting jobs

    error = error_of(service.clear, [queue, "nowhere"])
    assert (error.name, str(error)) == (
        "queue",
        "unknown queue 'nowhere': not configured and no job has it",
    )
    assert redis_client.llen(queue) == 3

    assert service.clear(queue) == {
        "queues": {queue: 4},
        "purged": {queue: 3},
        "scheduled": {queue: 0},
    }
    assert states(service, [*mine, pending, running]) == ["cancelled"] * 4 + ["started"]
    assert states(service, theirs) == ["queued"] * 2
    assert (redis_client.llen(queue), redis_client.llen(other)) == (0, 2)

    assert service.clear() == {
        "queues": {queue: 0, other: 2},
        "purged": {queue: 0, other: 2},
        "scheduled": {queue: 0, other: 0},
    }
    assert states(service, theirs) == ["cancelled"] * 2
    probe.close()


def test_clear_leaves_a_queue_with_scheduled_jobs_unpurged(app, service, redis_client):
    """No worker holds a scheduled job's message yet: it waits in the queue,
    where a purge would delete it and leave the job scheduled for ever."""
    probe = Probe(app, redis_client)
    queue = app.conf.task_default_queue
    [later] = probe.commit("record_once", (probe.key(),), countdown=600)
    [waiting] = probe.commit("record_once", (probe.key(),))
    assert redis_client.llen(queue) == 2

    assert service.clear(queue) == {
        "queues": {queue: 1},
        "purged": {queue: None},
        "scheduled": {queue: 1},
    }
    assert states(service, [later, waiting]) == ["scheduled", "cancelled"]
    assert redis_client.llen(queue) == 2  # the workers drop the cancelled one
    probe.close()


def test_on_rabbitmq_depth_and_clear_count_the_messages(
    tmp_path, ini_vars, amqp_url, redis_client
):
    app = web_app(tmp_path, ini_vars, "amqp", broker_url=amqp_url)
    service, probe = service_of(app), Probe(app, redis_client)
    queue = app.conf.task_default_queue
    try:
        probe.commit("record_once", (probe.key(),), (probe.key(),))
        [ghost] = add_jobs(service, {"queue": f"ghost_{uuid.uuid4().hex[:8]}"})
        ghost_queue = service.get(ghost)["queue"]
        depth = {d["queue"]: (d["waiting"], d["broker"]) for d in service.depth()}
        assert depth == {queue: (2, 2), ghost_queue: (1, 0)}
        assert service.clear() == {
            "queues": {queue: 2, ghost_queue: 1},
            "purged": {queue: 2, ghost_queue: 0},
            "scheduled": {queue: 0, ghost_queue: 0},
        }
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)
        app.close()
        probe.close()


def test_a_dead_broker_costs_warnings_never_a_hang(tmp_path, ini_vars, caplog):
    """Broker down: the table's side of each action is done, the broker's
    reported as unknown (None) or left to the relay, within seconds."""
    app = web_app(
        tmp_path, ini_vars, "down", broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    service = service_of(app)
    queue = app.conf.task_default_queue
    queued, cancelled = add_jobs(service, {}, {"state": "cancelled"})
    caplog.set_level(logging.WARNING, "pyramid_tasks")
    started = time.monotonic()
    [depth] = service.depth()
    assert (depth["waiting"], depth["broker"]) == (1, None)
    assert service.cancel([queued])[0]["cancelled"] is True
    assert service.retry([cancelled]) == [
        {"id": cancelled, "state_before": "cancelled", "state": "pending"}
    ]
    # The relay leaves a retried job to the retry for its grace, however old
    # the job (no second message while the retry publishes it).
    with service.store.engine.begin() as connection:
        assert service.store.claim_pending(connection, 0, 10) == []
    assert service.get(cancelled)["publish_after"] is not None
    assert service.clear() == {
        "queues": {queue: 1},
        "purged": {queue: None},
        "scheduled": {queue: 0},
    }
    elapsed = time.monotonic() - started
    print(f"four actions on a dead broker: {elapsed:.2f} s")
    assert elapsed < 15
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for start in (
        "The broker did not tell its queue sizes: ",
        "1 cancelled job(s) could not be revoked at the broker",
        "The workers could not be told of the retry: ",
        f"The broker did not purge ['{queue}']: ",
    ):
        assert any(m.startswith(start) for m in messages), (start, messages)
    # The clear's own line says the broker did not answer (no "None").
    caplog.set_level(logging.INFO, "pyramid_tasks")
    service.clear()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"Queue {queue} cleared: 0 job(s) cancelled, the broker did not answer."
    ]
    # The broker refuses the test job: its row waits for the relay.
    caplog.clear()
    test_id = service.test()
    assert service.get(test_id)["state"] == "pending"
    assert service_lines(caplog) == [
        f"Test job {test_id} committed; the relay sends it when the broker is back."
    ]
    app.close()


# -- with a worker ------------------------------------------------------------------


def test_cancelled_pending_and_queued_jobs_never_run(
    jobs_worker, tmp_path, ini_vars, redis_client
):
    down = web_app(
        tmp_path, ini_vars, "down", broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    up = web_app(tmp_path, ini_vars, "up")
    probe_down, probe = Probe(down, redis_client), Probe(up, redis_client)
    service = service_of(up)
    pending, queued, neighbour = (probe.key() for _ in range(3))
    [pending_id] = probe_down.commit("record_once", (pending,))
    [queued_id] = probe.commit("record_once", (queued,))
    [neighbour_id] = probe.commit("record_once", (neighbour,))

    assert service.cancel([pending_id, queued_id]) == [
        {"id": i, "state_before": s, "state": "cancelled", "cancelled": True}
        for i, s in ((pending_id, "pending"), (queued_id, "queued"))
    ]
    worker = jobs_worker("-P", "solo")
    probe.wait_state(neighbour_id, "succeeded")  # behind the cancelled one
    wait_for(lambda: f"[{queued_id}] is cancelled: not run." in worker.log)
    assert [probe.runs(k) for k in (pending, queued, neighbour)] == [0, 0, 1]
    assert [probe.effects(k) for k in (pending, queued, neighbour)] == [0, 0, 1]
    for job_id in (pending_id, queued_id):
        row = probe.job(job_id)
        assert (row["state"], row["attempts"]) == ("cancelled", 0)
    assert pending_id not in worker.log  # the relay never sent it
    down.close()
    up.close()
    probe.close()


def test_a_running_worker_revokes_retries_and_logs_the_test_job(
    jobs_worker, redis_client
):
    """One worker: a scheduled job it holds is cancelled (revoked there) and
    retried (it runs, the revoke forgotten); a started one is asked to stop;
    a failed one runs again as attempt 2; the test job is logged."""
    worker = jobs_worker("-P", "solo")
    app = worker.celery_app
    probe, service = Probe(app, redis_client), service_of(app)

    held = probe.key()
    [held_id] = probe.commit("record_once", (held,), countdown=120)
    wait_for(lambda: f"[{held_id}] received" in worker.log, message="the eta job")
    assert service.cancel([held_id])[0]["state_before"] == "scheduled"
    wait_for(lambda: f"Tasks flagged as revoked: {held_id}" in worker.log)
    assert service.retry([held_id]) == [
        {"id": held_id, "state_before": "cancelled", "state": "queued"}
    ]
    row = probe.wait_state(held_id, "succeeded")
    assert (row["attempts"], row["eta"], probe.effects(held)) == (1, None, 1)
    assert "countdown" not in (row["options"] or {})

    running = probe.key()
    [running_id] = probe.commit("cancellable", (running,))
    wait_for(lambda: redis_client.llen(f"{running}:ready"), message="it to start")
    assert service.cancel([running_id])[0]["state_before"] == "started"
    # Its return value as the task saw it (not the result backend's: see
    # jobs_probe_app.cancellable).
    result = wait_for(lambda: redis_client.lpop(f"{running}:result"))
    assert json.loads(result) == {"before": False, "cancelled": True}
    assert probe.job(running_id)["state"] == "cancelled"

    failing = probe.key()
    [failing_id] = probe.commit("record", (failing, "it fails"))
    first = probe.wait_state(failing_id, "failed")
    assert service.retry([failing_id]) == [
        {"id": failing_id, "state_before": "failed", "state": "queued"}
    ]
    wait_for(lambda: probe.runs(failing) == 2, message="the second run")
    second = probe.wait_state(failing_id, "failed")
    assert (first["attempts"], second["attempts"]) == (1, 2)
    assert second["error"] == "ValueError: it fails"
    assert probe.effects(failing) == 0  # each run rolled back

    test_id = service.test()
    row = probe.wait_state(test_id, "succeeded")
    assert (row["name"], row["attempts"]) == ("pyramid_tasks.jobs.test", 1)
    wait_for(lambda: f"Test job {test_id} ran on {worker.node}" in worker.log)
    probe.close()
