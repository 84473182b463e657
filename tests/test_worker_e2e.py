"""End to end: real ``tasks-celery ... -- worker`` subprocesses on Redis/PostgreSQL."""

import subprocess
import sys
import uuid

import sqlalchemy

from .conftest import wait_for


def test_task_writes_through_dbsession_and_builds_site_urls(
    start_worker, ini_vars, database_url
):
    worker = start_worker("-P", "solo", section="main")
    app = worker.celery_app
    engine = sqlalchemy.create_engine(database_url)
    schema = ini_vars["schema"]
    with engine.begin() as connection:
        order_id = connection.scalar(
            sqlalchemy.text(
                f'INSERT INTO "{schema}".orders (email, status) '
                "VALUES ('ann@example.com', 'new') RETURNING id"
            )
        )

    result = app.tasks["demo_app.tasks.confirm_order"].delay(order_id)

    expected = f"https://example.com/app/orders/{order_id}"
    assert result.get(timeout=30) == expected
    with engine.connect() as connection:
        row = connection.execute(
            sqlalchemy.text(
                f'SELECT status, confirmation_url FROM "{schema}".orders WHERE id = :id'
            ),
            {"id": order_id},
        ).one()
    engine.dispose()
    assert tuple(row) == ("confirmed", expected)


def test_prefork_children_get_fresh_connection_pools(start_worker, redis_client):
    worker = start_worker("-P", "prefork", "-c", "2")
    barrier = f"pyramid_tasks:barrier:{uuid.uuid4().hex}"
    whoami = worker.celery_app.tasks["tests.probe_app.whoami"]

    results = [whoami.delay(barrier, 2) for _ in range(2)]
    reports = [result.get(timeout=60) for result in results]
    redis_client.delete(barrier, f"{barrier}:go")

    assert all(report["released"] for report in reports), reports
    assert len({report["pid"] for report in reports}) == 2, "one child per task"
    backend_pids = {report["backend_pid"] for report in reports}
    assert len(backend_pids) == 2, f"children shared a connection: {reports}"
    assert reports[0]["startup_backend_pid"] not in backend_pids


def test_celery_retry_and_autoretry_work_with_our_task_classes(
    start_worker, redis_client
):
    worker = start_worker("-P", "solo")
    tasks = worker.celery_app.tasks
    keys = [f"pyramid_tasks:runs:{uuid.uuid4().hex}" for _ in range(4)]
    try:
        retried = tasks["tests.probe_app.retry_once"].delay(keys[0])
        autoretried = tasks["tests.probe_app.autoretried"].delay(keys[1])
        conflicted = tasks["tests.probe_app.conflicted"].delay(keys[2])
        batch = tasks["tests.probe_app.batch"].delay(keys[3], ["a", "b"])
        assert retried.get(timeout=60) == {"runs": 2, "retries": 1}
        assert autoretried.get(timeout=60) == 3
        assert conflicted.get(timeout=60) == {"attempt": 2, "task_id": conflicted.id}
        assert int(redis_client.get(keys[2])) == 2
        assert batch.get(timeout=60) == [["a", "Active"], ["b", "Active"]]
        assert int(redis_client.get(keys[3])) == 3  # a: 2 attempts, b: 1
    finally:
        redis_client.delete(*keys)


def test_embedded_beat_fires_the_ini_entry_repeatedly(
    start_worker, redis_client, ini_vars, tmp_path
):
    schedule = tmp_path / "beat-schedule"
    start_worker("-P", "solo", "-B", "--schedule", str(schedule))
    key = ini_vars["probe_key"]

    wait_for(
        lambda: int(redis_client.get(key) or 0) >= 2,
        timeout=60,
        message="the 1-second beat entry to run twice",
    )
    # Each tick (a TransactionalTask) scheduled a tock on its commit.
    wait_for(
        lambda: int(redis_client.get(key + ":tock") or 0) >= 2,
        timeout=60,
        message="the ticks' tocks, sent on commit",
    )
    redis_client.delete(key, key + ":tock")


def test_a_gevent_pool_is_patched_and_keeps_requests_apart(start_worker, redis_client):
    worker = start_worker("-P", "gevent", "-c", "4")
    key = f"pyramid_tasks:rendezvous:{uuid.uuid4().hex}"
    rendezvous = worker.celery_app.tasks["tests.probe_app.rendezvous"]
    try:
        results = [rendezvous.delay(key, 4) for _ in range(4)]
        reports = [result.get(timeout=60) for result in results]
    finally:
        redis_client.delete(key, f"{key}:go")
    # Unpatched, the first BLPOP would block the whole worker: no release.
    assert all(report["released"] for report in reports), reports
    assert all(report["own_request"] for report in reports), reports


def test_importing_the_package_loads_nothing_heavy():
    """So the console script can patch for gevent/eventlet first."""
    code = (
        "import sys, pyramid_tasks, pyramid_tasks.script;"
        "print([m for m in ('pyramid', 'sqlalchemy', 'celery.app')"
        " if m in sys.modules])"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
