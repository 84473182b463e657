"""A three-step workflow through a real worker (``tasks-celery ... worker``,
Redis, PostgreSQL): the workspace passed and updated across the steps; the
second step failing stops the third, and ``jobs retry`` on the workflow
resumes at the second; a step's message delivered twice takes effect once.

Each step (``tests.jobs_probe_app.step``) adds an order ``key:name`` (its
effect, in its transaction) and its name to the workspace's ``done``.
"""

import pytest
import transaction

from pyramid_tasks.jobs import workflow
from pyramid_tasks.jobs.service import JobService
from pyramid_tasks.sqlalchemy import get_tm_session

from .conftest import wait_for
from .test_jobs_faults import counts
from .test_jobs_worker import Probe, worker_starter

pytestmark = pytest.mark.counts

STEPS = ("a", "b", "c")
# Three steps, each run once, each effect once.
ONCE = {"scheduled": 3, "run": 3, "effects": 3, "duplicates": 0, "lost": 0}


@pytest.fixture
def jobs_worker(start_worker, ini_vars):
    yield from worker_starter(start_worker, ini_vars)


def send(probe, key, title="Import"):
    """The workflow of three steps, sent on a commit; its id."""
    task = probe.task("step")
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        get_tm_session(probe.session_factory, tm)  # the view's session
        result = workflow(
            *(task.si(key, name) for name in STEPS),
            title=title,
            workspace={"user_id": 42},
        ).apply_async(tm=tm)
    assert probe.app.pyramid_registry.pyramid_tasks_jobs.flush(10)
    return result.id


def figures(probe, key):
    """The counts of the workflow of ``key``, printed."""
    found = counts(probe, [f"{key}:{name}" for name in STEPS])
    print(found)
    return found


def steps(probe, workflow_id):
    service = JobService.from_registry(probe.app.pyramid_registry)
    jobs = service.list(parent=workflow_id, limit=10)
    return [(job["args"][1], job["state"]) for job in reversed(jobs)]


def test_a_workflow_runs_its_steps_in_order_with_one_workspace(
    jobs_worker, redis_client
):
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    workflow_id = send(probe, key)
    row = probe.wait_state(workflow_id, "succeeded")
    assert figures(probe, key) == ONCE
    assert row["name"] == "pyramid_tasks.workflow"
    assert row["title"] == "Import"
    assert row["workspace"] == {"user_id": 42, "done": ["a", "b", "c"]}
    assert (row["progress"], row["progress_message"]) == (100, "3 steps done")
    assert steps(probe, workflow_id) == [(n, "succeeded") for n in STEPS]


def test_a_failed_step_stops_the_workflow_and_retry_resumes_there(
    jobs_worker, redis_client
):
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    redis_client.set(f"{key}:fail:b", "1")
    workflow_id = send(probe, key)
    row = probe.wait_state(workflow_id, "failed")
    assert row["error"] == (
        "step 2 of 3 (tests.jobs_probe_app.step): ValueError: step b was told to fail"
    )
    assert steps(probe, workflow_id) == [("a", "succeeded"), ("b", "failed")]
    # b's run rolled back with its transaction: its effect and its workspace.
    assert row["workspace"] == {"user_id": 42, "done": ["a"]}
    assert [probe.effects(f"{key}:{n}") for n in STEPS] == [1, 0, 0]

    redis_client.delete(f"{key}:fail:b")
    service = JobService.from_registry(probe.app.pyramid_registry)
    [answer] = service.retry([workflow_id])
    b_id = answer["step"]
    assert answer == {
        "id": workflow_id,
        "state_before": "failed",
        "state": "queued",
        "step": b_id,
    }
    row = probe.wait_state(workflow_id, "succeeded")
    assert figures(probe, key) == {**ONCE, "run": 4}  # b twice, rolled back once
    assert row["workspace"] == {"user_id": 42, "done": ["a", "b", "c"]}
    assert steps(probe, workflow_id) == [(n, "succeeded") for n in STEPS]
    assert probe.job(b_id)["attempts"] == 2


def test_a_steps_message_delivered_twice_takes_effect_once(jobs_worker, redis_client):
    worker = jobs_worker("-P", "solo")
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    workflow_id = send(probe, key)
    probe.wait_state(workflow_id, "succeeded")
    # Each step's message again, as a broker's redelivery would bring it.
    for step_id, name in [(j, n) for n, j in step_ids(probe, workflow_id)]:
        probe.task("step").apply_async(
            (key, name), task_id=step_id, headers=step_headers(probe, step_id)
        )
    wait_for(
        lambda: worker.log.count("is succeeded: not run.") == 3,
        message="the three copies to be skipped",
    )
    assert figures(probe, key) == ONCE
    row = probe.job(workflow_id)
    assert (row["state"], row["workspace"]["done"]) == ("succeeded", ["a", "b", "c"])


def step_ids(probe, workflow_id):
    service = JobService.from_registry(probe.app.pyramid_registry)
    return [(job["args"][1], job["id"]) for job in service.list(parent=workflow_id)]


def step_headers(probe, step_id):
    return probe.job(step_id)["options"].get("headers")
