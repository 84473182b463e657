"""The job page's children and retries, through WebTest, with a real worker
where the rows come from one: chain steps and jobs sent from a run name
their parent; the retries of a job (an operator's, Celery's ``retry()``)
are on its timeline."""

import re

from celery import chain

from pyramid_tasks.jobs.model import RETRY_HEADER

from .test_dashboard import PREFIX, dashboard, text  # noqa: F401 (fixture)
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, queue  # noqa: F401 (fixtures)
from .test_jobs_worker import Probe


def labels(page):
    return re.findall(r'<span class="label">([^<]+)</span>', page.text)


def children(page):
    """The job ids the page's children table links to, in its order."""
    table = page.html.find("table", class_="children")
    return [code.text for code in table.find_all("code")] if table else []


def test_chain_steps_and_jobs_sent_from_a_run_are_its_children(
    dashboard,  # noqa: F811 (the fixture imported above)
    start_worker,
    ini_vars,
    redis_client,
):
    worker = start_worker("-P", "solo", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ini_vars["queue"]})
    probe = Probe(worker.celery_app, redis_client)
    first, second, fan, retried = (probe.key() for _ in range(4))
    record = probe.task("record")
    # Sent at once from here: the first step's row is written after the
    # send; the worker sends the second step when the first succeeded.
    steps = chain(record.si(first), record.si(second)).apply_async()
    second_id, first_id = steps.id, steps.parent.id
    [fan_id] = probe.commit("fan_out", (fan, 3))
    [retried_id] = probe.commit("retried", (retried,))

    for job_id in (first_id, second_id, fan_id, retried_id):
        probe.wait_state(job_id, "succeeded", "failed")
    sent = worker.celery_app.AsyncResult(fan_id).get(timeout=30)
    for job_id in sent:
        probe.wait_state(job_id, "succeeded", "failed")
    parents = {
        job_id: probe.job(job_id)["parent_id"]
        for job_id in (first_id, second_id, fan_id, *sent)
    }
    assert parents == {
        first_id: None,
        second_id: first_id,
        fan_id: None,
        **dict.fromkeys(sent, fan_id),
    }

    page = board.get(f"/jobs/{first_id}")
    assert children(page) == [second_id]
    page = board.get(f"/jobs/{fan_id}")
    assert sorted(children(page)) == sorted(sent)
    assert "The newest" not in text(page)  # all of them are listed
    link = page.html.find("a", string="All its children in the list")["href"]
    assert link == f"{PREFIX}/jobs?parent={fan_id}"
    listed = board.get("/jobs", parent=fan_id)
    rows = listed.html.find("tbody").find_all("tr")
    assert sorted(tr.find("code").text for tr in rows) == sorted(sent)
    assert f"children of {fan_id}" in text(listed)
    # The filter form keeps the parent: filtering narrows its children.
    form = listed.forms[0]
    assert form["parent"].value == fan_id
    assert "No job matches" in text(board.get("/jobs", parent=fan_id, state="failed"))
    assert children(board.get(f"/jobs/{second_id}")) == []

    # Celery's retry(): the time the run asked for it, between its runs.
    row = probe.job(retried_id)
    assert row["options"]["headers"][RETRY_HEADER]["by"] == "task"
    page = board.get(f"/jobs/{retried_id}")
    assert labels(page) == [
        "created",
        "published",
        "retried by the task",
        "started",
        "last heartbeat",
        "finished",
    ]
    probe.close()


def test_an_operators_retry_is_on_the_timeline(dashboard):  # noqa: F811
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "f", "name": "echo", "args": [1], "state": "failed"}
        | {"queue": board.d.queue, "created_at": ago(60), "started_at": ago(50)}
        | {"options": {"headers": {"x-app": "kept"}}},
    )
    board.post("/jobs/f/retry")
    row = board.service.get("f")
    mark = row["options"]["headers"][RETRY_HEADER]
    assert (mark["by"], row["options"]["headers"]["x-app"]) == ("operator", "kept")
    page = board.get("/jobs/f")
    # Its last start is the failed run's, before the retry.
    assert labels(page) == ["created", "started", "retried by an operator", "published"]
    assert "s ago" in page.html.find_all("li")[2].text


def test_many_children_are_listed_newest_first_and_counted_up_to_the_cap(
    dashboard,  # noqa: F811
):
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "few", "state": "succeeded", "created_at": ago(9000)},
        {"id": "many", "state": "succeeded", "created_at": ago(9000)},
        *[
            {"id": f"few-{i:02}", "parent_id": "few", "created_at": ago(900 - i)}
            | {"state": "failed" if i % 2 else "succeeded", "title": f"Part {i}"}
            for i in range(25)
        ],
        *[
            {"id": f"many-{i:04}", "parent_id": "many", "created_at": ago(5000 - i)}
            | {"state": "succeeded"}
            for i in range(1001)
        ],
    )
    page = board.get("/jobs/few")
    assert children(page) == [f"few-{i:02}" for i in range(24, 4, -1)]
    assert "The newest 20 of 25. All its children in the list" in text(page)
    assert "Part 24" in text(page)
    page = board.get("/jobs/many")
    assert children(page) == [f"many-{i:04}" for i in range(1000, 980, -1)]
    assert "The newest 20 of 1000+." in text(page)
    # The list of one parent's children, filtered by state.
    failed = board.get("/jobs", parent="few", state="failed")
    assert len(failed.html.find("tbody").find_all("tr")) == 12


def test_a_job_started_before_its_publish_was_marked_shows_it(
    dashboard,  # noqa: F811
):
    """The worker often starts a job before the web side marks it queued:
    that mark leaves its state alone and records when it was published."""
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "fast", "state": "started", "created_at": ago(3), "started_at": ago(1)},
        {"id": "slow", "state": "pending", "created_at": ago(3)},
        {"id": "again", "state": "pending", "created_at": ago(3)}
        | {"published_at": ago(2)},
    )
    store = board.service.store
    assert store.mark_published([("fast", None), ("slow", None)]) == 1
    assert store.mark_published([("again", ago(-60))]) == 1
    rows = {job_id: store.get(job_id) for job_id in ("fast", "slow", "again")}
    assert {k: row["state"] for k, row in rows.items()} == {
        "fast": "started",
        "slow": "queued",
        "again": "scheduled",
    }
    # Published before it started: when it started, at the latest.
    assert rows["fast"]["published_at"] == rows["fast"]["started_at"]
    assert rows["slow"]["published_at"] > rows["fast"]["started_at"]
    assert labels(board.get("/jobs/fast")) == ["created", "published", "started"]
