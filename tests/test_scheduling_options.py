"""Scheduling options for operators: ``tasks.default_time_limit``,
``tasks.queue_prefix`` on ``send_task`` and the worker's ``-Q``, and rate
limits in the INI."""

import uuid

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_tasks.jobs import workflow
from pyramid_tasks.settings import TasksSettings, parse_tasks_settings

from .conftest import ROOT, wait_for
from .test_config import commit_error, make_config
from .test_jobs_store import noop
from .test_jobs_web import own_redis  # noqa: F401 (a fixture)
from .test_jobs_worker import SECTION, Probe

# -- tasks.default_time_limit ------------------------------------------------


def test_default_time_limit_is_celerys_task_time_limit():
    config = make_config(**{"tasks.default_time_limit": "90s"})
    config.add_task(noop, bind=True, name="plain")
    config.add_task(noop, bind=True, name="own", time_limit=5)
    app = config.get_celery_app()
    assert app.conf.task_time_limit == 90.0
    assert app.conf.task_soft_time_limit is None  # no soft limit comes with it
    assert (app.tasks["plain"].time_limit, app.tasks["own"].time_limit) == (90, 5)


def test_default_time_limit_is_unset_by_default():
    assert TasksSettings().default_time_limit is None
    assert make_config().get_celery_app().conf.task_time_limit is None


def test_default_time_limit_and_celerys_own_are_not_both_set():
    config = make_config(
        **{"tasks.default_time_limit": "5m", "celery.task_time_limit": "300"}
    )
    assert str(commit_error(config)) == (
        "Settings tasks.default_time_limit and celery.task_time_limit are both "
        "set: keep one (tasks.default_time_limit sets celery.task_time_limit)."
    )


def test_a_soft_limit_must_fire_before_the_default_time_limit():
    config = make_config(
        **{"tasks.default_time_limit": "1m", "celery.task_soft_time_limit": "60"}
    )
    assert str(commit_error(config)) == (
        "Setting celery.task_soft_time_limit = 60 is not below "
        "tasks.default_time_limit = 60 s: the task would be killed before its "
        "soft limit is raised in it."
    )
    config = make_config(
        **{"tasks.default_time_limit": "1m", "celery.task_soft_time_limit": "50"}
    )
    conf = config.get_celery_app().conf
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (50, 60)


@pytest.mark.parametrize("value", ["soon", "0", "-5s", "5 minutes"])
def test_a_bad_default_time_limit_is_named(value):
    expected = "a duration such as 0.2, 200ms, 10s, 5m, 2h or 7d"
    if value == "0":
        expected += ", above zero"
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({"tasks.default_time_limit": value})
    assert str(info.value) == (
        f"Invalid setting tasks.default_time_limit = {value!r}: expected {expected}."
    )


def test_a_job_past_the_default_time_limit_is_killed_and_failed(
    start_worker, ini_vars, redis_client
):
    """Prefork kills the child at 1 s; the worker's main process marks the
    job failed, naming the limit, and sends JobFailed; the message is
    acknowledged, so the job never runs again.  The next job runs."""
    settings = {
        "probe.redis_url": ini_vars["redis_url"],
        "tasks.default_time_limit": "1s",
    }
    worker = start_worker(
        "-P", "prefork", "-c", "1", section=SECTION, settings=settings
    )
    probe = Probe(worker.celery_app, redis_client)
    try:
        held, after = probe.key(), probe.key()
        [held_id] = probe.commit("held", (held,))  # waits 30 s for <key>:go
        probe.wait_state(held_id, "failed", timeout=30)
        [after_id] = probe.commit("record_once", (after,))
        probe.wait_state(after_id, "succeeded", timeout=30)
        row = probe.job(held_id)
        assert (row["state"], row["attempts"], row["error"]) == (
            "failed",
            1,
            "TimeLimitExceeded: killed at its hard time limit of 1 s "
            "(tasks.default_time_limit)",
        )
        assert redis_client.lrange(f"{held}:started", 0, -1) == [held_id.encode()]
        assert probe.effects(held) == 0  # its transaction died with the child
        # The line and JobFailed follow the mark, from a thread of the
        # worker's main process.
        events = [
            f"event:{held_id}:JobFailed:TimeLimitExceeded",
            f"event:{held_id}:JobStarted",
        ]
        wait_for(
            lambda: probe.emails(f"event:{held_id}:") == events,
            message="JobStarted and JobFailed",
        )
        log = worker.log
        assert (
            log.count(f"Hard time limit (1.0s) exceeded for {probe.task('held').name}")
            == 1
        )
        failed = (
            f"Job tests.jobs_probe_app.held[{held_id}] failed (TimeLimitExceeded: "
            f"killed at its hard time limit of 1 s (tasks.default_time_limit)): "
            f"queue {ini_vars['queue']}"
        )
        assert log.count(failed) == 1, log
        # A workflow's step killed so: the workflow fails with it, naming it.
        killed = probe.key()
        step = probe.task("held").si(killed)
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            workflow_id = workflow(step, title="Held").apply_async(tm=tm).id
        row = probe.wait_state(workflow_id, "failed", timeout=30)
        assert row["error"] == (
            "step 1 of 1 (tests.jobs_probe_app.held): TimeLimitExceeded: killed "
            "at its hard time limit of 1 s (tasks.default_time_limit)"
        )
    finally:
        probe.close()


# -- tasks.queue_prefix: send_task and the worker's -Q -----------------------


@pytest.fixture
def prefixed_app(own_redis):  # noqa: F811 (the fixture imported above)
    """An app with ``tasks.queue_prefix`` on a Redis of its own (the
    unprefixed queues it checks stay empty whatever else runs)."""
    prefix = f"site{uuid.uuid4().hex[:8]}"
    config = Configurator(
        settings={"celery.broker_url": own_redis.url, "tasks.queue_prefix": prefix}
    )
    config.include("pyramid_tasks")
    config.add_task(noop, bind=True, name="routed", queue="mail")
    config.add_task(noop, bind=True, name="plain")
    app = config.get_celery_app()
    yield app, prefix, own_redis.client
    app.close()


def test_send_task_takes_the_queue_prefix(prefixed_app):
    """By name with ``queue=``, routed by name, and a name that has the
    prefix already: each message lands in the prefixed queue."""
    app, prefix, client = prefixed_app
    app.send_task("anything", queue="reports")
    app.send_task(f"{prefix}.anything", queue=f"{prefix}.reports")
    app.send_task("routed")
    app.send_task("plain")
    app.tasks["plain"].apply_async(queue="reports")
    lengths = {
        name: client.llen(name)
        for name in (
            "reports",
            "mail",
            "celery",
            *(f"{prefix}.{q}" for q in ("reports", "mail", "celery")),
        )
    }
    assert lengths == {
        "reports": 0,
        "mail": 0,
        "celery": 0,
        f"{prefix}.reports": 3,
        f"{prefix}.mail": 1,
        f"{prefix}.celery": 1,
    }


def test_the_workers_queues_take_the_prefix(prefixed_app):
    """``-Q a,b -X PREFIX.b``, as Celery's command line hands them to the
    worker (its ``setup_queues``; a whole worker sets process-wide state)."""
    app, prefix, _client = prefixed_app
    worker = object.__new__(app.Worker)
    worker.setup_queues("a,b", f"{prefix}.b")
    assert sorted(app.amqp.queues.consume_from) == [f"{prefix}.a"]
    worker.setup_queues(None)  # no -Q, no -X: the selection stays
    assert sorted(app.amqp.queues.consume_from) == [f"{prefix}.a"]


def test_a_worker_started_with_q_consumes_the_prefixed_queue(
    start_worker, ini_vars, redis_client
):
    prefix = f"site{uuid.uuid4().hex[:8]}"
    other = f"{ini_vars['queue']}_other"
    worker = start_worker(
        "-P",
        "solo",
        "-Q",
        f"{other},{prefix}.third",
        settings={"tasks.queue_prefix": prefix},
    )
    try:
        node = worker.node
        active = worker.celery_app.control.inspect([node], timeout=5).active_queues()
        assert sorted(q["name"] for q in active[node]) == [
            f"{prefix}.{other}",
            f"{prefix}.third",
        ]
        tock = worker.celery_app.tasks["tests.probe_app.tock"]
        result = tock.apply_async(queue=other)
        key = f"{ini_vars['probe_key']}:tock"
        wait_for(lambda: redis_client.get(key) == b"1", message="tock to run")
        assert result.get(timeout=10) is None
        assert redis_client.llen(other) == 0
    finally:
        redis_client.delete(f"{ini_vars['probe_key']}:tock")


# -- rate limits -------------------------------------------------------------


def documented_rate_limit_settings():
    """The INI lines of docs/jobs.rst's "Rate limits", as settings."""
    text = (ROOT / "docs" / "jobs.rst").read_text()
    block = text[text.index("Rate limits\n~~~") :].split(".. code-block:: ini")[1]
    lines = [line.strip() for line in block.split("\n\n")[1].splitlines()]
    return dict(line.split(" = ", 1) for line in lines)


def test_rate_limits_in_the_ini_as_documented():
    """django-db-queue's ``--rate_limit``: Celery's, per task or for all; the
    INI's annotation wins over the task's own."""
    settings = documented_rate_limit_settings()
    assert settings == {
        "celery.task_annotations": (
            '{"myapp.tasks.send_newsletter": {"rate_limit": "10/m"}}'
        ),
        "celery.task_default_rate_limit": "100/s",
    }
    config = make_config(**settings)
    name = "myapp.tasks.send_newsletter"
    config.add_task(noop, bind=True, name=name, rate_limit="1/s")
    config.add_task(noop, bind=True, name="plain")
    config.add_task(noop, bind=True, name="own", rate_limit="1/h")
    app = config.get_celery_app()
    limits = {n: app.tasks[n].rate_limit for n in (name, "plain", "own")}
    assert limits == {name: "10/m", "plain": "100/s", "own": "1/h"}


def test_a_bad_rate_limit_annotation_is_named():
    config = make_config(**{"celery.task_annotations": '{"mail": {"rate_limit": }'})
    assert str(commit_error(config)) == (
        'Invalid setting celery.task_annotations = \'{"mail": {"rate_limit": }\': '
        "expected valid JSON."
    )
