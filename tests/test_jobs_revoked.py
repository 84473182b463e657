"""A retried job meets a worker that still holds its revoke, and a job
revoked through Celery (pyramid_tasks.jobs.revoked): real workers, Redis and
PostgreSQL.

``jobs retry`` asks the workers to forget the revoke before it sends the
job, but nothing orders that broadcast before the message.  The tests make
the race certain: the broadcast is not sent at all.
"""

import json
import logging
from datetime import timedelta

import pytest
import sqlalchemy
from celery import signals
from celery.app.task import Context
from celery.worker import state as worker_state
from sqlalchemy import update

from pyramid_tasks.jobs import revoked as revoked_module
from pyramid_tasks.jobs.model import RETRY_HEADER, Job, utcnow
from pyramid_tasks.jobs.relay import Relay
from pyramid_tasks.jobs.revoked import RETRIED_HEADER, send_again
from pyramid_tasks.jobs.service import JobService
from pyramid_tasks.publish import publish

from .conftest import free_port, wait_for
from .test_jobs_service import add_jobs, service_of
from .test_jobs_worker import Probe, web_app, worker_starter

RECORD_ONCE = "tests.jobs_probe_app.record_once"
PLAIN = "tests.jobs_probe_app.plain"


@pytest.fixture
def jobs_worker(start_worker, ini_vars):
    yield from worker_starter(start_worker, ini_vars)


@pytest.fixture
def no_unrevoke(monkeypatch):
    """``retry`` as if its broadcast reached the workers after its message."""
    monkeypatch.setattr(JobService, "_unrevoke", lambda self, ids: None)


def held_and_cancelled(worker, probe, service):
    """A job the worker holds (an eta ahead), cancelled: revoked there."""
    key = probe.key()
    [job_id] = probe.commit("record_once", (key,), countdown=120)
    wait_for(lambda: f"[{job_id}] received" in worker.log, message="the eta job")
    assert service.cancel([job_id])[0]["state_before"] == "scheduled"
    wait_for(lambda: f"Tasks flagged as revoked: {job_id}" in worker.log)
    return key, job_id


def discarded(worker, job_id):
    return worker.log.count(f"Discarding revoked task: {RECORD_ONCE}[{job_id}]")


def test_a_retried_job_a_worker_still_holds_the_revoke_of_runs_once(
    jobs_worker, redis_client, no_unrevoke
):
    worker = jobs_worker("-P", "prefork", "-c", "1")
    app = worker.celery_app
    probe, service = Probe(app, redis_client), service_of(app)
    key, job_id = held_and_cancelled(worker, probe, service)

    assert service.retry([job_id]) == [
        {"id": job_id, "state_before": "cancelled", "state": "queued"}
    ]
    row = probe.wait_state(job_id, "succeeded")
    assert (row["attempts"], probe.runs(key), probe.effects(key)) == (1, 1, 1)
    assert discarded(worker, job_id) == 1  # the retried message, then sent again
    assert worker.log.count(f"[{job_id}] was retried after its cancel") == 1
    assert "this worker still held the revoke: sent again." in worker.log
    probe.close()


def test_the_message_of_a_cancelled_job_stays_dropped(jobs_worker, redis_client):
    worker = jobs_worker("-P", "solo")
    app = worker.celery_app
    probe, service = Probe(app, redis_client), service_of(app)
    key, job_id = held_and_cancelled(worker, probe, service)

    # Its message again, as a late duplicate would come (the relay's).
    sends, _unknown = Relay(app).sends([probe.job(job_id)])
    assert publish(app, sends, durable=True) == sends
    wait_for(
        lambda: (
            f"[{job_id}] is cancelled: its revoked message stays dropped." in worker.log
        )
    )
    assert discarded(worker, job_id) == 1
    row = probe.job(job_id)
    assert (row["state"], row["attempts"], probe.runs(key)) == ("cancelled", 0, 0)
    assert "was retried after its cancel" not in worker.log
    probe.close()


@pytest.fixture
def revoked():
    """Ids this test puts in this process's revokes (as a worker holds them)."""
    ids = []

    def revoke(job_id):
        ids.append(job_id)
        worker_state.revoked.add(job_id)
        return job_id

    yield revoke
    for job_id in ids:
        worker_state.revoked.discard(job_id)


def test_a_job_the_broker_refuses_again_is_left_pending_for_the_relay(
    tmp_path, ini_vars, revoked, caplog
):
    down = web_app(
        tmp_path, ini_vars, "down", broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    service = service_of(down)
    job_id = revoked(add_jobs(service, {"state": "retrying"})[0])
    task = down.tasks[PLAIN]
    with caplog.at_level(logging.INFO, "pyramid_tasks"):
        assert send_again(down, task, job_id, eta=None, retries=2)
        # A revoked task without a row (sent by name, or a plain Celery
        # revoke): left dropped.
        assert not send_again(down, task, revoked("no-such-job"))
    assert "[no-such-job] is not in the job table: its revoked message stays " in (
        caplog.text
    )
    assert "no-such-job" in worker_state.revoked
    assert service.store.state(job_id) == "pending"
    assert job_id not in worker_state.revoked
    assert caplog.text.count(f"[{job_id}] is committed; the broker did not take") == 1
    assert "the revoke: left pending for the relay." in caplog.text
    down.close()


def test_a_database_down_is_logged_and_keeps_the_revoke(
    tmp_path, ini_vars, revoked, caplog, monkeypatch
):
    app = web_app(tmp_path, ini_vars, "web")
    down = sqlalchemy.create_engine(
        f"postgresql+psycopg://user:secret@127.0.0.1:{free_port()}/test"
    )
    monkeypatch.setattr(app.pyramid_registry.pyramid_tasks_jobs.store, "engine", down)
    job_id = revoked("a-job-id")
    task = app.tasks[PLAIN]
    with caplog.at_level(logging.ERROR, "pyramid_tasks"):
        assert not send_again(app, task, job_id)
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"Job tests.jobs_probe_app.plain[{job_id}] was dropped as revoked and its "
        "row could not be read or written ("
    )
    assert "secret" not in record.getMessage()
    assert job_id in worker_state.revoked
    app.close()


def test_a_delayed_job_goes_again_with_its_eta_and_retries(
    tmp_path, ini_vars, revoked, redis_client
):
    """The receiver Celery calls as it drops a delivery: a retried job
    retrying (Celery's retry() sent it with an eta) goes again with that eta,
    its retries and its mark; a run terminated, a message expired or revoked
    by a stamped header (its id not in the revokes), or a cancelled job, is
    left alone.
    One thread takes the drops in order: once the last one is sent, the
    others were seen."""
    app = web_app(tmp_path, ini_vars, "web")
    service, task = service_of(app), app.tasks[PLAIN]
    terminated, expired, by_header, cancelled, delayed = add_jobs(
        service, *[{"state": "retrying"}] * 3, {"state": "cancelled"}, {}
    )
    for job_id in (terminated, expired, cancelled, delayed):
        revoked(job_id)
    eta = (utcnow() + timedelta(minutes=5)).replace(microsecond=0)
    on_revoked = revoked_module.install(app)
    try:
        on_revoked(sender=task, request=Context(id=terminated), terminated=True)
        on_revoked(sender=task, request=Context(id=expired), expired=True)
        on_revoked(sender=task, request=Context(id=by_header))
        on_revoked(sender=task, request=Context(id=cancelled))
        request = Context(
            id=delayed, eta=eta.isoformat(), retries=3, **{RETRIED_HEADER: True}
        )
        on_revoked(sender=task, request=request, terminated=False, expired=False)
        row = Probe(app, redis_client).wait_state(delayed, "scheduled")
    finally:
        signals.task_revoked.disconnect(on_revoked)
    assert row["publish_after"] is None
    [message] = [json.loads(m) for m in redis_client.lrange(ini_vars["queue"], 0, -1)]
    headers = message["headers"]
    assert (headers["id"], headers["eta"], headers["retries"]) == (
        delayed,
        eta.isoformat(),
        3,
    )
    assert headers[RETRIED_HEADER] is True
    assert [service.store.state(i) for i in (terminated, expired, by_header)] == [
        "retrying"
    ] * 3
    assert service.store.state(cancelled) == "cancelled"
    assert {terminated, expired, cancelled} <= set(worker_state.revoked)
    assert delayed not in worker_state.revoked
    app.close()


def test_a_job_revoked_through_celery_while_queued_is_cancelled_not_run(
    jobs_worker, redis_client, ini_vars
):
    """``AsyncResult.revoke()`` of a queued job, its message delivered
    after: dropped, and the row says so (no retry mark: not sent again)."""
    worker = jobs_worker("-P", "solo")
    app = worker.celery_app
    probe = Probe(app, redis_client)
    later = f"{ini_vars['queue']}_later"  # the worker consumes it only later
    key = probe.key()
    [job_id] = probe.commit("record_once", (key,), queue=later)
    assert probe.job(job_id)["state"] == "queued"

    app.AsyncResult(job_id).revoke()
    wait_for(lambda: f"Tasks flagged as revoked: {job_id}" in worker.log)
    app.control.add_consumer(later, destination=[worker.node], reply=True)
    row = probe.wait_state(job_id, "cancelled")
    wait_for(lambda: "(revoked through Celery while it waited)" in worker.log)
    assert (row["attempts"], probe.runs(key), probe.effects(key)) == (0, 0, 0)
    assert row["finished_at"] is not None
    assert discarded(worker, job_id) == 1
    assert worker.log.count(f"[{job_id}] cancelled (revoked through Celery") == 1
    assert "was retried after its cancel" not in worker.log
    assert redis_client.llen(later) == 0  # not sent again
    probe.close()


def test_the_relay_sends_a_retried_job_again_with_its_mark(
    tmp_path, ini_vars, redis_client
):
    """A retry the broker refused: the relay sends the row's options, the
    retry mark among them (a worker that drops it sends it again)."""
    down = web_app(
        tmp_path, ini_vars, "down", broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    [job_id] = add_jobs(service_of(down), {"state": "failed"})
    assert service_of(down).retry([job_id])[0]["state"] == "pending"
    down.close()
    app = web_app(tmp_path, ini_vars, "web")
    store = service_of(app).store
    with store.engine.begin() as connection:  # its backoff over
        connection.execute(
            update(Job.__table__).where(Job.id == job_id).values(publish_after=None)
        )
    assert Relay(app).run_once()[1] == 1
    [message] = [json.loads(m) for m in redis_client.lrange(ini_vars["queue"], 0, -1)]
    assert (message["headers"]["id"], message["headers"][RETRIED_HEADER]) == (
        job_id,
        True,
    )
    headers = store.get(job_id)["options"]["headers"]
    assert (headers[RETRIED_HEADER], headers[RETRY_HEADER]["by"]) == (True, "operator")
    app.close()
