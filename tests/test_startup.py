"""What a worker and beat say at start: unenforced time limits, banners."""

import os
import subprocess
import types

import pytest
from celery import Celery
from celery.concurrency import get_implementation
from celery.concurrency.base import BasePool

from pyramid_tasks.malformed import Consumer
from pyramid_tasks.startup import ConsumerCheck, unenforced_time_limits

from .conftest import ROOT, tasks_celery, wait_for

WARNING = "Time limits are not enforced by this worker's pool"


def _noop():
    return "ran"


@pytest.fixture(scope="module")
def app():
    """Tasks that inherit the settings' limits, and one with its own."""
    app = Celery(set_as_current=False)
    app.conf.task_time_limit = 30
    limited = app.task(
        name="limited", shared=False, time_limit=60, soft_time_limit=45.5
    )(_noop)
    inherited = app.task(name="inherited", shared=False)(_noop)
    assert limited() == inherited() == "ran"
    app.finalize()
    return app


@pytest.mark.parametrize(
    "pool, name",
    [("threads", "threads"), ("solo", "solo"), ("eventlet", "eventlet")],
)
def test_pools_that_enforce_no_limit_name_every_limit(app, pool, name):
    # eventlet's module is never imported: the pool class is known by name.
    pool_cls = type(
        "TaskPool", (BasePool,), {"__module__": f"celery.concurrency.{pool}"}
    )
    if pool != "eventlet":
        pool_cls = get_implementation(pool)

    assert unenforced_time_limits(pool_cls, 30, 20, app) == (
        name,
        [
            "celery.task_time_limit (--time-limit) = 30 s",
            "celery.task_soft_time_limit (--soft-time-limit) = 20 s",
            "task limited time_limit = 60 s",
            "task limited soft_time_limit = 45.5 s",
        ],
    )


def test_gevent_enforces_hard_limits_only(app):
    gevent_pool = get_implementation("gevent")

    assert unenforced_time_limits(gevent_pool, 30, None, app) == (
        "gevent",
        ["task limited soft_time_limit = 45.5 s"],
    )


def test_prefork_and_its_subclasses_enforce_both(app):
    class MyPool(get_implementation("prefork")):
        pass

    assert unenforced_time_limits(MyPool, 30, 20, app) == ("prefork", [])


def test_an_unknown_pool_is_not_judged(app):
    class CustomPool(BasePool):
        pass

    assert unenforced_time_limits(CustomPool, 30, 20, app) == ("CustomPool", [])


def test_no_limits_no_warning():
    app = Celery(set_as_current=False)

    assert unenforced_time_limits(get_implementation("solo"), None, 0, app) == (
        "solo",
        [],
    )


LIMITS = {"celery.task_time_limit": "30", "celery.task_soft_time_limit": "20"}


def test_a_threads_worker_warns_at_start_and_a_prefork_worker_does_not(
    start_worker,
):
    threads = start_worker("-P", "threads", "-c", "2", settings=LIMITS)
    prefork = start_worker("-P", "prefork", "-c", "1", settings=LIMITS)
    threads.stop()
    prefork.stop()

    [warning] = [line for line in threads.log.splitlines() if WARNING in line]
    assert " WARNI [pyramid_tasks.startup]" in warning
    assert warning.endswith(
        "(-P threads): celery.task_time_limit (--time-limit) = 30 s, "
        "celery.task_soft_time_limit (--soft-time-limit) = 20 s; a task running "
        "past them is neither interrupted nor killed: use -P prefork (hard and "
        "soft limits) or -P gevent (hard limits, at the task's next I/O), or "
        "bound the task's own waits (socket and statement timeouts)."
    )
    assert WARNING not in prefork.log


def test_banners_show_the_ini_logging_level(start_worker, redis_client, ini_vars):
    """conf/test.ini sets the celery logger to INFO; no --loglevel is given."""
    worker = start_worker("-P", "solo")
    log_path = worker.log_path.with_suffix(".beat.log")
    command = [tasks_celery(), str(worker.ini_path), "--", "beat"]
    command += ["--schedule", str(log_path.with_suffix(".schedule"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        beat = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ticking():
        assert beat.poll() is None, log_path.read_text()
        return "Sending due task tick" in log_path.read_text()

    try:
        # Stopped once in its loop: a SIGTERM at beat's start-up, just after
        # the banner, was once ignored on a loaded machine (beat ran on).
        wait_for(ticking, message="beat's banner and first tick")
    finally:
        beat.terminate()
        try:
            beat.wait(timeout=30)
        finally:
            beat.kill()  # nothing if it stopped
            beat.wait()
        redis_client.delete(ini_vars["probe_key"], ini_vars["probe_key"] + ":tock")

    assert "    . logfile -> [stderr]@%INFO\n" in log_path.read_text()
    tasks = worker.log.split("\n[tasks]\n")[1].split("\n\n")[0].splitlines()
    assert "  . tests.probe_app.tock" in tasks
    assert "  . demo_app.tasks.confirm_order" in tasks
    assert not [task for task in tasks if task.startswith("  . celery.")], "at DEBUG"


def test_limits_shared_by_many_tasks_are_grouped_and_built_ins_counted():
    """``task_annotations = {"*": ...}`` gives every task, Celery's own too,
    the same limit: one entry, Celery's ``celery.*`` tasks counted."""
    app = Celery(set_as_current=False)
    app.conf.task_annotations = {"*": {"soft_time_limit": 4}, "b": {"time_limit": 9}}
    for name in ("b", "a", "c"):
        app.task(name=name, shared=False)(_noop)
    app.finalize()
    builtin = len([name for name in app.tasks if name.startswith("celery.")])
    assert builtin > 1

    assert unenforced_time_limits(get_implementation("threads"), None, None, app) == (
        "threads",
        [
            f"tasks a, b, c and {builtin} built-in tasks soft_time_limit = 4 s",
            "task b time_limit = 9 s",
        ],
    )


def test_limits_of_built_in_tasks_alone_are_counted():
    app = Celery(set_as_current=False)
    app.conf.task_annotations = {"celery.chord_unlock": {"time_limit": 5}}
    app.conf.task_annotations["celery.backend_cleanup"] = {"time_limit": 5}
    app.conf.task_annotations["celery.chain"] = {"soft_time_limit": 2}
    app.finalize()

    assert unenforced_time_limits(get_implementation("solo"), None, None, app) == (
        "solo",
        ["2 built-in tasks time_limit = 5 s", "1 built-in task soft_time_limit = 2 s"],
    )


FOREIGN = "Malformed messages are not set aside by this worker"


def test_a_worker_consumer_not_derived_from_ours_is_warned_about(start_worker):
    # Celery's own consumer, by a path the loader does not replace.
    own = {"celery.worker_consumer": "celery.worker.consumer.consumer:Consumer"}
    worker = start_worker("-P", "solo", settings=own)
    worker.stop()

    [warning] = [line for line in worker.log.splitlines() if FOREIGN in line]
    assert " WARNI [pyramid_tasks.startup]" in warning
    assert warning.endswith(
        "its consumer celery.worker.consumer.consumer.Consumer "
        "(celery.worker_consumer) does not derive from "
        "pyramid_tasks.malformed.Consumer, so a message Celery cannot read stops "
        "the worker (Unrecoverable error); derive it from "
        "pyramid_tasks.malformed.Consumer."
    )


class _Derived(Consumer):
    pass


@pytest.mark.parametrize("consumer_cls", [_Derived, "pyramid_tasks.malformed:Consumer"])
def test_a_consumer_derived_from_ours_is_not_warned_about(consumer_cls, caplog):
    worker = types.SimpleNamespace(consumer_cls=consumer_cls)

    ConsumerCheck(worker).start(worker)

    assert not [r for r in caplog.records if FOREIGN in r.getMessage()]
