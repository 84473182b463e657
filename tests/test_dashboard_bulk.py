"""Run a scheduled job now, and act on everything matching the list's
filters through a bulk job: WebTest for the routes, real workers for the
jobs, exact counts."""

import logging

import pytest
import sqlalchemy
from sqlalchemy import select

from pyramid_tasks.cli import main
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs import bulk as jobs_bulk
from pyramid_tasks.jobs.bulk import BULK_TASK
from pyramid_tasks.jobs.service import TEST_TASK, JobService

from .conftest import wait_for
from .test_dashboard import AUDIT, PREFIX, dashboard, text  # noqa: F401 (fixture)
from .test_jobs_api import add_jobs, ago, api  # noqa: F401 (fixture)
from .test_jobs_web import durable, own_redis, queue  # noqa: F401 (fixtures)
from .test_jobs_worker import Probe

# The service logs its run-now lines; the bulk job a line per batch.
SERVICE = "pyramid_tasks.jobs.service"


def audit_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == AUDIT]


def scheduled(job_id, queue_name, **row):
    return {
        "id": job_id,
        "name": "echo",
        "queue": queue_name,
        "state": "scheduled",
        "created_at": ago(30),
        "eta": ago(-3600),
        "published_at": ago(29),
        "args": [1],
        "options": {"eta": "2999-01-01T00:00:00+00:00", "queue": queue_name},
        **row,
    }


def test_the_new_routes_need_a_manager_a_token_and_a_writable_dashboard(
    dashboard,  # noqa: F811
    caplog,
):
    events = []
    board = dashboard(events=events)
    q = board.d.queue
    add_jobs(
        board.d.engine,
        scheduled("s", q),
        {"id": "f", "state": "failed", "created_at": ago(9), "queue": q},
    )
    before = board.states()
    caplog.set_level(logging.INFO, AUDIT)
    unsafe = ["/jobs/s/run", "/actions/run"]
    unsafe += [f"/bulk/{action}" for action in ("retry", "cancel", "delete")]
    for path in unsafe:
        ids = {"id": ["s", "f"]}
        board.post(path, role=None, status=403, **ids)
        board.post(path, role="viewer", status=403, **ids)
        board.post(path, token=False, status=400, **ids)
        board.app.post(
            PREFIX + path,
            {"csrf_token": "wrong", **ids},
            headers={"X-Role": "manager"},
            status=400,
        )
        if path.startswith("/bulk/"):  # its confirmation: for managers only
            board.get(path, role=None, status=403)
            board.get(path, role="viewer", status=403)
    # A viewer sees no Run now, nor the links to everything matching.
    assert "Run now" not in board.get("/jobs/s").text
    assert "All matching" not in board.get("/jobs").text
    read_only = dashboard(**{"tasks.dashboard.read_only": "true"})
    assert "Run now" not in read_only.get("/jobs/s", role="manager").text
    read_only.post("/jobs/s/run", status=403)
    read_only.post("/actions/run", status=403, id="s")
    read_only.post("/bulk/retry?state=failed", status=403)
    read_only.get("/bulk/retry", role="manager", status=403, state="failed")
    assert board.states() == before
    assert events == []
    assert audit_lines(caplog) == [
        "manager refused: run of job(s) s (read-only)",
        "manager refused: run of job(s) s (read-only)",
        "manager refused: retry of every job matching state 'failed' (read-only)",
    ]


def test_run_a_scheduled_job_now_from_its_page_the_list_cli_and_api(
    dashboard,  # noqa: F811
    api,  # noqa: F811
    redis_client,
    caplog,
):
    events = []
    board = dashboard(events=events)
    q = board.d.queue
    add_jobs(
        board.d.engine,
        scheduled("s-1", q, title="Reminder"),
        scheduled("s-2", q),
        scheduled("s-3", q),
        {"id": "f", "state": "failed", "created_at": ago(9), "queue": q},
    )
    page = board.get("/jobs/s-1", role="manager")
    assert [f.action for f in page.forms.values()] == [
        f"{PREFIX}/jobs/s-1/run",
        f"{PREFIX}/jobs/s-1/cancel",
    ]
    caplog.set_level(logging.INFO)
    done = page.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(f"{PREFIX}/jobs/s-1?done=now")
    shown = text(done.follow(headers={"X-Role": "viewer"}))
    assert "Sent: the job runs now, not at its due time." in shown
    job = board.service.get("s-1")
    assert (job["state"], job["eta"], job["options"]) == ("queued", None, {"queue": q})
    assert redis_client.llen(q) == 1  # its new message, without an eta
    # Checked rows: a job not scheduled refuses the lot.
    page = board.post("/actions/run", status=409, id=["s-2", "f"])
    assert "job f is failed: only a scheduled job is run now" in text(page)
    done = board.post("/actions/run", id=["s-2"])
    assert done.location.endswith(f"{PREFIX}/jobs?done=run&count=1")
    assert "1 job sent to run now." in text(done.follow(headers={"X-Role": "viewer"}))
    page = board.post("/jobs/s-2/run", status=409)
    assert "job s-2 is queued: only a scheduled job is run now" in text(page)
    assert audit_lines(caplog) == [
        "manager: run of job(s) s-1: scheduled -> queued",
        "manager refused: run of job(s) s-2, f: job f is failed: only a scheduled "
        "job is run now",
        "manager: run of job(s) s-2: scheduled -> queued",
        "manager refused: run of job(s) s-2: job s-2 is queued: only a scheduled "
        "job is run now",
    ]
    assert [(e.action, e.job_ids, e.results) for e in events] == [
        (
            "run",
            ["s-1"],
            [{"id": "s-1", "state_before": "scheduled", "state": "queued"}],
        ),
        (
            "run",
            ["s-2"],
            [{"id": "s-2", "state_before": "scheduled", "state": "queued"}],
        ),
    ]
    service_lines = [r.getMessage() for r in caplog.records if r.name == SERVICE]
    assert service_lines[0].startswith(
        "Job echo[s-1] run now by an operator (it was due "
    )
    assert service_lines[0].endswith("): queued.")
    # The JSON API: the same service.
    client = api()
    add_jobs(client.d.engine, scheduled("a-1", client.d.queue))
    assert client.post("/run-now", {"ids": ["a-1"]}) == {
        "jobs": [{"id": "a-1", "state_before": "scheduled", "state": "queued"}]
    }


def test_run_now_and_a_broker_that_does_not_take_it(
    dashboard,  # noqa: F811
    own_redis,  # noqa: F811
):
    board = dashboard(broker_url=own_redis.url)
    add_jobs(board.d.engine, scheduled("s", board.d.queue))
    own_redis.stop()
    # The row waits pending, without eta, for the relay.
    assert board.service.run_now(["s"]) == [
        {"id": "s", "state_before": "scheduled", "state": "pending"}
    ]
    assert board.service.get("s")["eta"] is None


def test_run_now_refuses_a_job_changed_meanwhile_and_changes_nothing(
    durable,  # noqa: F811
):
    d = durable()
    service = JobService.from_registry(d.registry)
    add_jobs(d.engine, scheduled("a", d.queue), scheduled("b", d.queue))
    updates = []

    def someone_cancels_b(conn, cursor, statement, parameters, *args):
        if statement.startswith("UPDATE"):
            updates.append(statement)
            if len(updates) == 2:
                with d.engine.begin() as other:
                    other.execute(
                        sqlalchemy.update(Job.__table__)
                        .where(Job.id == "b")
                        .values(state="cancelled")
                    )

    sqlalchemy.event.listen(d.engine, "before_cursor_execute", someone_cancels_b)
    try:
        with pytest.raises(ValueError, match=r"^job b changed meanwhile: try again$"):
            service.run_now(["a", "b"])
    finally:
        sqlalchemy.event.remove(d.engine, "before_cursor_execute", someone_cancels_b)
    assert d.states() == {"a": "scheduled", "b": "cancelled"}


def test_run_now_on_a_worker_runs_once_and_the_old_message_does_nothing(
    dashboard,  # noqa: F811
    start_worker,
    ini_vars,
    redis_client,
    restore_logging,
    capsys,
):
    worker = start_worker("-c", "1", section="jobs_probe")
    probe = Probe(worker.celery_app, redis_client)
    # The app that sends a job again must know its task: the probe app's.
    service = JobService.from_registry(worker.celery_app.pyramid_registry)
    key, other = probe.key(), probe.key()
    # Due in 8 s: the worker takes the message and holds it until then.
    [job_id] = probe.commit("record_once", (key,), countdown=8)
    [other_id] = probe.commit("record_once", (other,), countdown=8)
    assert probe.store.state(job_id) == "scheduled"
    assert service.run_now([job_id]) == [
        {"id": job_id, "state_before": "scheduled", "state": "queued"}
    ]
    job = probe.wait_state(job_id, "succeeded", timeout=6)
    assert (probe.runs(key), probe.effects(key), job["attempts"]) == (1, 1, 1)
    # The CLI does the same.
    assert main([str(worker.ini_path), "jobs", "run-now", other_id]) == 0
    assert capsys.readouterr().out == (
        f"Job {other_id} (it was scheduled) is queued to run now.\n"
    )
    probe.wait_state(other_id, "succeeded", timeout=6)
    # At its eta the old message is delivered: the lock finds the job done.
    for done_id in (job_id, other_id):
        wait_for(
            lambda done_id=done_id: (
                f"Job tests.jobs_probe_app.record_once[{done_id}] is succeeded: "
                in worker.log
            ),
            timeout=20,
            message="the old message to be delivered",
        )
    assert (probe.runs(key), probe.effects(key)) == (1, 1)
    assert (probe.runs(other), probe.effects(other)) == (1, 1)
    assert probe.job(job_id)["attempts"] == 1
    assert probe.job(other_id)["attempts"] == 1
    probe.close()


def failed_test_jobs(queue_name, count, start=0):
    return [
        {"id": f"f-{i:05d}", "name": TEST_TASK, "queue": queue_name}
        | {"state": "failed"}
        | {"created_at": ago(7200 - i), "finished_at": ago(3600), "attempts": 1}
        | {"error": "OSError: down", "options": {"queue": queue_name}}
        for i in range(start, start + count)
    ]


# A thousand jobs on one worker: never beside the other such test (xdist's
# --dist loadgroup runs a group's tests one after the other on one worker).
@pytest.mark.xdist_group("many_jobs")
def test_bulk_retry_of_1001_failed_jobs_on_a_worker(
    dashboard,  # noqa: F811
    start_worker,
    ini_vars,
    caplog,
):
    """One more than the confirmation counts (1000): six batches, the last
    one of a single job."""
    ours = ini_vars["queue"]
    worker = start_worker("-c", "1", section="jobs_probe")
    events = []
    board = dashboard(events=events, **{"celery.task_default_queue": ours})
    matching = failed_test_jobs(ours, 1001)
    add_jobs(
        board.d.engine,
        *matching,
        # Not matching: another task, another state.
        *[
            {"id": f"o-{i}", "name": "echo", "queue": ours, "state": "failed"}
            | {"created_at": ago(60 + i)}
            for i in range(3)
        ],
        {"id": "ok", "name": TEST_TASK, "queue": ours, "state": "succeeded"}
        | {"created_at": ago(30)},
    )
    filters = {"state": "failed", "queue": ours, "name": TEST_TASK}
    page = board.get("/jobs", role="manager", **filters)
    link = page.html.find("a", string="retry…")
    assert link["href"] == (
        f"{PREFIX}/bulk/retry?state=failed&queue={ours}&name={TEST_TASK}"
    )
    ask = board.get("/bulk/retry", role="manager", **filters)
    shown = text(ask)
    assert "Retry every job matching these filters?" in shown
    assert f"state 'failed', queue '{ours}', name '{TEST_TASK}'" in shown
    assert "jobs now more than 1000" in shown
    caplog.set_level(logging.INFO, AUDIT)
    done = ask.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    bulk_id = done.location.split("/jobs/")[1].split("?")[0]
    assert done.location.endswith(f"{PREFIX}/jobs/{bulk_id}?done=bulk")
    shown = text(done.follow(headers={"X-Role": "viewer"}))
    assert "Sent: this job does the work in batches; its progress shows here." in shown
    bulk = board.service.get(bulk_id)
    assert (bulk["name"], bulk["title"]) == (
        BULK_TASK,
        f"Retry the jobs matching state 'failed', queue '{ours}', name '{TEST_TASK}'",
    )
    ids = [row["id"] for row in matching]
    wait_for(
        lambda: board.service.get(bulk_id)["state"] == "succeeded",
        timeout=60,
        message="the bulk job to succeed",
    )
    bulk = board.service.get(bulk_id)
    assert (bulk["progress"], bulk["progress_message"]) == (
        100,
        "1001 of 1001 jobs, 1001 retried",
    )

    def states():
        with board.d.engine.connect() as connection:
            return dict(connection.execute(select(Job.id, Job.state)).all())

    wait_for(
        lambda: [states()[i] for i in ids] == ["succeeded"] * 1001,
        timeout=180,  # a loaded machine (a deadline; 15 s quiet)
        message="the 1001 retried jobs to succeed",
    )
    log = worker.log
    # (A message the relay sent again meanwhile finds its job done.)
    assert [log.count(f"Test job {i} ran") for i in ids] == [1] * 1001
    with board.d.engine.connect() as connection:
        attempts = dict(connection.execute(select(Job.id, Job.attempts)).all())
    assert {attempts[i] for i in ids} == {2}
    assert {k: v for k, v in states().items() if not k.startswith("f-")} == {
        "o-0": "failed",
        "o-1": "failed",
        "o-2": "failed",
        "ok": "succeeded",
        bulk_id: "succeeded",
    }
    assert [
        line[line.index("Bulk ") :] for line in log.splitlines() if "Bulk " in line
    ] == [
        f"Bulk retry {bulk_id}: 200 of a batch of 200 retried; {n} of 1001 done."
        for n in range(200, 1001, 200)
    ] + [f"Bulk retry {bulk_id}: 1 of a batch of 1 retried; 1001 of 1001 done."]
    assert audit_lines(caplog) == [
        f"manager: retry of every job matching state 'failed', queue '{ours}', "
        f"name '{TEST_TASK}' (more than 1000 job(s)): bulk job {bulk_id}"
    ]
    assert [(e.action, e.job_ids, e.results) for e in events] == [
        ("bulk", [bulk_id], {"action": "retry", "filters": filters, "matching": 1001})
    ]


def test_bulk_cancel_then_delete_on_a_worker(
    dashboard,  # noqa: F811
    start_worker,
    ini_vars,
):
    ours = ini_vars["queue"]
    start_worker("-c", "1", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ours})
    # Scheduled rows without messages: nothing runs them.
    add_jobs(
        board.d.engine,
        *[scheduled(f"s-{i}", ours, created_at=ago(100 + i)) for i in range(7)],
        {"id": "f", "state": "failed", "created_at": ago(9), "queue": ours},
    )
    ask = board.get("/bulk/cancel", role="manager", queue=ours)
    assert "jobs now 7" in text(ask)
    done = ask.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    cancel_id = done.location.split("/jobs/")[1].split("?")[0]
    wait_for(
        lambda: board.service.get(cancel_id)["state"] == "succeeded",
        message="the bulk cancel to succeed",
    )
    # The bulk job matches its own filter (unfinished, in its queue): a bulk
    # job is never taken, nor counted.
    assert board.service.get(cancel_id)["progress_message"] == (
        "7 of 7 jobs, 7 cancelled"
    )
    states = board.states()
    assert [states[f"s-{i}"] for i in range(7)] == ["cancelled"] * 7
    ask = board.get("/bulk/delete", role="manager", queue=ours, state="cancelled")
    assert "jobs now 7" in text(ask)
    done = ask.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    delete_id = done.location.split("/jobs/")[1].split("?")[0]
    wait_for(
        lambda: board.service.get(delete_id)["state"] == "succeeded",
        message="the bulk delete to succeed",
    )
    assert board.states() == {
        "f": "failed",
        cancel_id: "succeeded",
        delete_id: "succeeded",
    }


def test_bulk_with_nothing_to_take_and_a_bad_filter(dashboard):  # noqa: F811
    board = dashboard()
    q = board.d.queue
    add_jobs(board.d.engine, {"id": "w", "state": "queued", "created_at": ago(5)})
    # Retry takes failed, cancelled and dead jobs: none is queued.
    ask = board.get("/bulk/retry", role="manager", state="queued")
    shown = text(ask)
    assert (
        "states taken none: the filters name only states it does not take "
        "(failed, cancelled, dead)"
    ) in shown
    assert "No job matching these filters is in a state this takes." in shown
    assert ask.forms == {}
    # Bad filters are refused as the list refuses them, even then.
    bad = board.get("/bulk/delete", role="manager", state="nope", status=400)
    assert "unknown state 'nope': expected one of" in text(bad)
    # Several states, comma-separated, as the overview's links give them.
    ask = board.get("/bulk/cancel", role="manager", state="queued,failed")
    assert "states taken queued" in text(ask) and "jobs now 1" in text(ask)
    page = board.get("/bulk/retry", role="manager", queue="nowhere", status=400)
    assert "unknown queue 'nowhere': not configured and no job has it" in text(page)
    page = board.post("/bulk/retry?queue=nowhere", status=400)
    assert "unknown queue 'nowhere'" in text(page)
    ask = board.get("/bulk/delete", role="manager", queue=q)
    assert "filters queue" in text(ask) and "jobs now 0" in text(ask)
    assert "filters none: every job" in text(board.get("/bulk/cancel", role="manager"))
    assert board.states() == {"w": "queued"}


def test_a_batch_refused_is_done_job_by_job(durable):  # noqa: F811
    d = durable()
    service = JobService.from_registry(d.registry)
    add_jobs(
        d.engine,
        {"id": "f", "name": "echo", "state": "failed", "created_at": ago(9)}
        | {"queue": d.queue, "args": [1]},
        {"id": "s", "name": "echo", "state": "succeeded", "created_at": ago(8)}
        | {"queue": d.queue, "args": [2]},
    )
    # "s" succeeded since the page was read: the batch is refused, "f" is not.
    assert jobs_bulk._act(service, "retry", ["f", "s"]) == 1
    assert d.states() == {"f": "queued", "s": "succeeded"}
    with pytest.raises(ValueError, match="bad action 'explode': expected one of"):
        jobs_bulk.bulk_job(None, "explode", {})
    assert jobs_bulk.applicable("cancel", {"state": ["queued", "failed"]}) == {
        "state": ["queued"]
    }
    assert jobs_bulk.matching(service, "retry", {"state": "queued"}) == 0
    assert jobs_bulk.matching(service, "delete", {}, cap=0) == 1


def test_the_bulk_task_pages_by_keyset(durable, monkeypatch):  # noqa: F811
    """Pages of BATCH: 5 jobs in batches of 2, each once, newest first."""
    d = durable()
    service = JobService.from_registry(d.registry)
    add_jobs(
        d.engine,
        *[
            {"id": f"d-{i}", "name": "echo", "state": "succeeded"}
            | {"created_at": ago(100 - i), "queue": d.queue}
            for i in range(5)
        ],
    )
    monkeypatch.setattr(jobs_bulk, "BATCH", 2)
    seen = []
    real = service.delete
    monkeypatch.setattr(
        JobService, "delete", lambda self, ids: seen.append(ids) or real(ids)
    )

    class Run:  # the task's self: its request and progress
        app = d.app

        def __init__(self, job_id="the-bulk-job", cancelled_after=None):
            self.request = type("request", (), {"id": job_id})
            self.progress = []
            self.cancelled_after = cancelled_after

        def set_progress(self, *args):
            self.progress.append(args)

        def cancel_requested(self):
            return len(self.progress) == self.cancelled_after

    # Cancelled during its second batch: it stops after it.
    run = Run(cancelled_after=2)
    result = jobs_bulk.bulk_job(run, "delete", {"queue": d.queue})
    assert result == {"action": "delete", "matching": 4, "changed": 4}
    assert seen == [["d-4", "d-3"], ["d-2", "d-1"]]
    assert d.states() == {"d-0": "succeeded"}
    add_jobs(
        d.engine,
        *[
            {"id": f"d-{i}", "name": "echo", "state": "succeeded"}
            | {"created_at": ago(100 - i), "queue": d.queue}
            for i in range(1, 5)
        ],
    )
    seen.clear()
    run = Run()
    result = jobs_bulk.bulk_job(run, "delete", {"queue": d.queue})
    assert result == {"action": "delete", "matching": 5, "changed": 5}
    assert seen == [["d-4", "d-3"], ["d-2", "d-1"], ["d-0"]]
    assert run.progress == [
        (2, 5, "2 of 5 jobs, 2 deleted"),
        (4, 5, "4 of 5 jobs, 4 deleted"),
        (5, 5, "5 of 5 jobs, 5 deleted"),
        (100, None, "5 of 5 jobs, 5 deleted"),
    ]
    assert d.states() == {}
    # Nothing the action takes; only the bulk job itself.
    run = Run()
    result = jobs_bulk.bulk_job(run, "retry", {"state": "succeeded"})
    assert result == {"action": "retry", "matching": 0, "changed": 0}
    assert run.progress == [(100, None, "0 of 0 jobs, 0 retried")]
    add_jobs(d.engine, {"id": "me", "state": "started", "created_at": ago(1)})
    run = Run("me")
    result = jobs_bulk.bulk_job(run, "cancel", {})
    assert result == {"action": "cancel", "matching": 0, "changed": 0}
    assert run.progress == [(100, None, "0 of 1 jobs, 0 cancelled")]
    assert d.states() == {"me": "started"}
    # Given ids (a failure group): those, in their order, itself left out.
    add_jobs(
        d.engine,
        *[
            {"id": f"g-{i}", "name": "echo", "state": "failed"}
            | {"created_at": ago(100 - i), "queue": d.queue}
            for i in range(5)
        ],
    )
    seen.clear()
    run = Run()
    ids = ["g-0", "g-1", "the-bulk-job", "g-2", "g-3", "g-4", "g-4"]
    result = jobs_bulk.bulk_job(run, "delete", {}, ids=ids)
    assert result == {"action": "delete", "matching": 5, "changed": 5}
    assert seen == [["g-0", "g-1"], ["g-2", "g-3"], ["g-4"]]
    assert run.progress[-1] == (100, None, "5 of 5 jobs, 5 deleted")
    assert d.states() == {"me": "started"}  # the one left above
