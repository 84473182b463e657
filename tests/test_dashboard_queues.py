"""The dashboard's queues page: counts, consumers, pause and resume, through
WebTest, with real workers on a queue of the test's own."""

import logging

from pyramid_tasks.dashboard.queues import consumers

from .conftest import wait_for
from .test_dashboard import AUDIT, PREFIX, dashboard, text  # noqa: F401 (fixture)
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, own_redis, queue  # noqa: F401 (fixtures)
from .test_jobs_worker import Probe


def rows_of(page):
    return [
        [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        for tr in page.html.find("tbody").find_all("tr")
    ]


def test_pause_and_resume_need_a_manager_a_token_and_a_writable_dashboard(
    dashboard,  # noqa: F811
    caplog,
):
    events = []
    board = dashboard(events=events)
    q = board.d.queue
    board.get("/queues", role=None, status=403)
    page = board.get("/queues")
    assert page.forms == {}  # a viewer: no action
    assert "<button" not in page.text and "clear…" not in page.text
    caplog.set_level(logging.INFO, AUDIT)
    for action in ("pause", "resume"):
        path = f"/queues/{q}/{action}"
        board.post(path, role=None, status=403)
        board.post(path, role="viewer", status=403)
        board.post(path, token=False, status=400)
        board.app.post(
            PREFIX + path,
            {"csrf_token": "wrong"},
            headers={"X-Role": "manager"},
            status=400,
        )
        board.app.get(PREFIX + path, headers={"X-Role": "manager"}, status=404)
    assert events == []
    assert [r for r in caplog.records if r.name == AUDIT] == []
    read_only = dashboard(**{"tasks.dashboard.read_only": "true"})
    assert read_only.get("/queues", role="manager").forms == {}
    read_only.post(f"/queues/{q}/pause", status=403)
    read_only.post(f"/queues/{q}/resume", status=403)
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        f"manager refused: pause of queue {q} (read-only)",
        f"manager refused: resume of queue {q} (read-only)",
    ]
    # An unknown queue.
    page = board.post("/queues/nowhere/pause", status=404)
    assert "unknown queue 'nowhere': not configured and no job has it" in text(page)
    assert events == []


def test_a_queue_paused_then_resumed_on_a_worker(
    dashboard,  # noqa: F811
    start_worker,
    ini_vars,
    redis_client,
    caplog,
):
    ours = ini_vars["queue"]
    worker = start_worker("-c", "1", section="jobs_probe")
    events = []
    board = dashboard(events=events, **{"celery.task_default_queue": ours})
    add_jobs(
        board.d.engine,
        {"id": "f-1", "state": "failed", "created_at": ago(9), "queue": ours},
        {"id": "w-1", "state": "queued", "created_at": ago(65), "queue": ours},
    )
    page = board.get("/queues", role="manager")
    # Other tests' workers may share the broker: ours is the row of our queue.
    [row] = [r for r in rows_of(page) if r[0] == ours]
    assert row[:8] == [ours, "1", "0", "0", "1", "0", "1 min", worker.node]
    assert page.html.find("a", string="clear…")["href"] == (
        f"{PREFIX}/queues/{ours}/clear"
    )
    caplog.set_level(logging.INFO, AUDIT)
    [form] = [
        f for f in page.forms.values() if f.action == f"{PREFIX}/queues/{ours}/pause"
    ]
    done = form.submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(f"{PREFIX}/queues?done=pause&queue={ours}&count=1")
    shown = text(done.follow(headers={"X-Role": "viewer"}))
    assert f"Queue {ours} paused: 1 worker(s) stopped consuming it" in shown
    assert consumers(board.service)[0].get(ours) is None
    [row] = [r for r in rows_of(board.get("/queues")) if r[0] == ours]
    assert row[7] == "no worker"
    # Paused: a job sent now waits in the queue.
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    [job_id] = probe.commit("record_once", (key,))
    wait_for(lambda: redis_client.llen(ours) >= 1, message="the message to wait")
    assert probe.store.state(job_id) == "queued"
    # Resumed on our worker only (the select names each worker that answers).
    page = board.get("/queues", role="manager")
    [form] = [
        f for f in page.forms.values() if f.action == f"{PREFIX}/queues/{ours}/resume"
    ]
    assert worker.node in [value for value, _selected, _text in form["worker"].options]
    form["worker"] = worker.node
    done = form.submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(f"{PREFIX}/queues?done=resume&queue={ours}&count=1")
    probe.wait_state(job_id, "succeeded")
    assert probe.effects(key) == 1
    assert consumers(board.service)[0][ours] == [worker.node]
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        f"manager: pause of queue {ours}: 1 worker(s) answered ({worker.node})",
        f"manager: resume of queue {ours}: 1 worker(s) answered ({worker.node})",
    ]
    assert [(e.action, e.job_ids, e.queues, e.results) for e in events] == [
        ("pause", [], [ours], {"queue": ours, "workers": [worker.node]}),
        ("resume", [], [ours], {"queue": ours, "workers": [worker.node]}),
    ]
    # Paused again with no worker consuming it: nobody to tell.
    board.post(f"/queues/{ours}/pause")
    done = board.post(f"/queues/{ours}/pause")
    assert done.location.endswith(f"done=pause&queue={ours}&count=0")
    probe.close()


def test_the_queues_page_and_its_actions_with_the_broker_stopped(
    dashboard,  # noqa: F811
    own_redis,  # noqa: F811
    caplog,
):
    board = dashboard(broker_url=own_redis.url)
    q = board.d.queue
    add_jobs(
        board.d.engine,
        {"id": "w", "state": "queued", "created_at": ago(5), "queue": q},
    )
    own_redis.stop()
    page = board.get("/queues", role="manager")
    assert "The broker did not answer: " in text(page)
    [row] = [r for r in rows_of(page) if r[0] == q]
    assert row[1] == "1" and row[7] == "unknown"
    caplog.set_level(logging.INFO, AUDIT)
    for action in ("pause", "resume"):
        page = board.post(f"/queues/{q}/{action}", status=503)
        assert "The broker did not answer: " in text(page)
    messages = [r.getMessage() for r in caplog.records if r.name == AUDIT]
    assert [m.split(" failed: ")[0] for m in messages] == [
        f"manager: pause of queue {q}",
        f"manager: resume of queue {q}",
    ]
    assert board.states() == {"w": "queued"}


def test_the_queue_is_named_as_the_workers_know_it(dashboard, caplog):  # noqa: F811
    """With ``tasks.queue_prefix`` the command names the prefixed queue, as
    the job service names it."""
    events = []
    board = dashboard(events=events, **{"tasks.queue_prefix": "shop"})
    q = board.d.queue
    prefixed = f"shop.{q}"
    add_jobs(
        board.d.engine,
        {"id": "w", "state": "queued", "created_at": ago(5), "queue": prefixed},
    )
    caplog.set_level(logging.INFO, AUDIT)
    # Resumed on a worker nobody runs: sent, and no answer.
    done = board.post(f"/queues/{q}/resume", worker="nobody@nowhere")
    assert done.location.endswith(
        f"{PREFIX}/queues?done=resume&queue={prefixed}&count=0"
    )
    assert [(e.action, e.queues, e.results) for e in events] == [
        ("resume", [prefixed], {"queue": prefixed, "workers": []})
    ]
    assert audit_lines(caplog) == [
        f"manager: resume of queue {prefixed}: 0 worker(s) answered"
    ]


def audit_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == AUDIT]
