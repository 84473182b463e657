"""The jobs dashboard in a real browser: Playwright driving Debian's Chromium.

The app (durable mode, real PostgreSQL and Redis, the dashboard) is served
from a thread on a free port; the role comes from the ``X-Role`` header the
browser sends (the test security policy of ``test_jobs_api``).  Each test
saves a screenshot of each page it sees under ``tests/screenshots/`` (or
``$PYRAMID_TASKS_SCREENSHOTS``), for CI to keep.
"""

import os
import re
import socketserver
import threading
from contextlib import contextmanager
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from playwright.sync_api import expect, sync_playwright

from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.model import retry_mark
from pyramid_tasks.jobs.service import TEST_TASK

from . import conftest
from .conftest import ROOT, unavailable, wait_for
from .test_dashboard import BEAT, dashboard, failed_rows  # noqa: F401 (fixture)
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, own_redis, queue  # noqa: F401 (fixtures)

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(
    os.environ.get("PYRAMID_TASKS_SCREENSHOTS", ROOT / "tests" / "screenshots")
)


def check_chromium(path):
    """``path`` if Chromium is there; else skip (fail under CI=true)."""
    if not os.access(path, os.X_OK):
        unavailable("Chromium", f"{path} is missing (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def chromium():
    path = check_chromium(CHROMIUM)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def served(app):
    """``app`` served on a free port from a thread: its base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_Server, handler_class=_Quiet
    )
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def browsing(chromium, board, role="manager", javascript=True, width=1200):
    """A page of a browser whose requests say ``role``, and the base URL."""
    with served(board.app.app) as url:
        context = chromium.new_context(
            extra_http_headers={"X-Role": role},
            viewport={"width": width, "height": 800},
            java_script_enabled=javascript,
        )
        try:
            yield context.new_page(), url + board.prefix
        finally:
            context.close()


def shoot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def state_of(page):
    return page.locator("h1 .state").inner_text()


def test_filter_open_a_failed_job_and_retry_it_on_a_worker(
    dashboard,  # noqa: F811 (the fixture imported above)
    start_worker,
    ini_vars,
    chromium,
):
    worker = start_worker(section="jobs_probe")
    ours = ini_vars["queue"]
    board = dashboard(**{"celery.task_default_queue": ours})
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "app/tasks.py", line 12, in send_invoice\n'
        "    smtp.send(message)\n"
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    add_jobs(
        board.d.engine,
        *[
            {"id": f"ok-{i}", "name": "app.tasks.send_invoice", "queue": ours}
            | {"state": "succeeded", "created_at": ago(600 - i), "attempts": 1}
            | {"title": f"Invoice #{100 + i}", "finished_at": ago(590 - i)}
            for i in range(6)
        ],
        {"id": "run-1", "name": "app.tasks.build_report", "queue": ours}
        | {"state": "started", "created_at": ago(40), "started_at": ago(30)}
        | {"progress": 60, "progress_message": "3 of 5 sheets", "attempts": 1},
        {"id": "wait-1", "name": "app.tasks.send_invoice", "queue": ours}
        | {"state": "queued", "created_at": ago(75), "title": "Invoice #120"},
        {"id": "failed-1", "name": TEST_TASK, "queue": ours, "state": "failed"}
        | {"created_at": ago(300), "started_at": ago(299), "finished_at": ago(298)}
        | {"title": "Invoice #99", "attempts": 3, "worker": "celery@web-1"}
        | {"error": "ConnectionRefusedError: [Errno 111] Connection refused"}
        | {"traceback": traceback, "published_at": ago(299.5)},
    )
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/")
        expect(page.locator("h1")).to_have_text("Overview")
        row = page.locator("tbody tr", has_text=ours)
        expect(row.locator("td")).to_have_text(
            [ours, "1", "1", "0", "1", "0", "1 min", "clear…"]
        )
        shoot(page, "overview")

        page.get_by_role("link", name="All jobs").click()
        expect(page.locator("tbody tr")).to_have_count(9)
        shoot(page, "jobs")
        page.locator("select[name=state]").select_option("failed")
        page.locator("select[name=queue]").select_option(ours)
        page.get_by_role("button", name="Filter").click()
        assert re.search(r"[?&]state=failed&queue=", page.url)
        expect(page.locator("tbody tr")).to_have_count(1)
        shoot(page, "jobs-failed")

        page.get_by_role("link", name="Invoice #99").click()
        expect(page.locator("h1 .state")).to_have_text("failed")
        expect(page.locator("pre.traceback")).to_contain_text("smtp.send(message)")
        shoot(page, "job-failed")

        page.get_by_role("button", name="Retry").click()
        expect(page.get_by_role("status")).to_have_text(
            "Sent again: the job runs anew."
        )

        def succeeded():
            page.reload()
            return state_of(page) == "succeeded"

        wait_for(succeeded, message="the retried job to succeed in the browser")
        expect(page.get_by_role("button")).to_have_text(["Delete"])
        shoot(page, "job-retried")
    assert "Test job failed-1 ran" in worker.log


def test_cancel_a_scheduled_job(dashboard, chromium):  # noqa: F811
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "later-1", "name": "app.tasks.remind", "queue": board.d.queue}
        | {"args": ["bob@example.com"], "kwargs": {"api_token": "tok-123", "n": 2}}
        | {"state": "scheduled", "created_at": ago(20), "eta": ago(-3600)}
        | {"title": "Reminder to Bob", "published_at": ago(19)},
    )
    with browsing(chromium, board) as (page, base):
        page.goto(f"{base}/jobs?state=scheduled")
        page.get_by_role("link", name="Reminder to Bob").click()
        expect(page.locator(".timeline .label")).to_have_text(
            ["created", "due", "published"]
        )
        expect(page.locator("pre.json").nth(1)).to_have_text(
            '{\n  "api_token": "***",\n  "n": 2\n}'
        )
        assert "tok-123" not in page.content()
        shoot(page, "job-scheduled")
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_role("status")).to_have_text("Cancelled.")
        expect(page.locator("h1 .state")).to_have_text("cancelled")
        expect(page.get_by_role("button")).to_have_text(["Retry", "Delete"])
        shoot(page, "job-cancelled")
    assert board.states() == {"later-1": "cancelled"}


def test_the_pages_work_with_the_broker_stopped(dashboard, chromium, own_redis):  # noqa: F811
    board = dashboard(broker_url=own_redis.url)
    add_jobs(
        board.d.engine,
        {"id": "q-1", "name": "echo", "queue": board.d.queue, "args": [1]}
        | {"state": "queued", "created_at": ago(50), "title": "Waiting"},
    )
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/workers")
        expect(page.locator("tbody")).to_have_text("No worker answered within 1.0 s.")
    own_redis.stop()
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/workers")
        expect(page.get_by_role("alert")).to_contain_text(
            "The broker did not answer: Error 111 connecting to 127.0.0.1:"
        )
        shoot(page, "workers-broker-stopped")
        page.goto(base + "/")
        expect(page.locator("tbody tr", has_text=board.d.queue)).to_contain_text(
            re.compile(r"\b5\d s\b")  # the oldest waiting job's age
        )
        page.goto(base + "/jobs")
        page.get_by_role("link", name="Waiting").click()
        expect(page.locator("h1 .state")).to_have_text("queued")
        # The row is cancelled; the revoke the broker missed costs a warning
        # (the broker is waited for 2 s at most).
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("h1 .state")).to_have_text("cancelled")
        shoot(page, "broker-stopped")
    assert board.states() == {"q-1": "cancelled"}


def test_check_rows_then_retry_or_cancel_them(dashboard, chromium):  # noqa: F811
    board = dashboard()
    ours = board.d.queue
    add_jobs(
        board.d.engine,
        *[
            {"id": f"f-{i}", "name": "echo", "queue": ours, "args": [i]}
            | {"state": "failed", "created_at": ago(90 - i), "title": f"Sync #{i}"}
            | {"error": f"TimeoutError: shop {i} did not answer", "attempts": 3}
            for i in range(4)
        ],
    )
    with browsing(chromium, board) as (page, base):
        page.goto(f"{base}/jobs?state=failed")
        page.get_by_label("check f-1").check()
        page.get_by_label("check f-3").check()
        shoot(page, "jobs-checked")
        page.get_by_role("button", name="Retry checked").click()
        expect(page.get_by_role("status")).to_have_text("2 jobs sent again.")
        assert "state=failed" in page.url
        expect(page.locator("tbody tr")).to_have_count(2)  # still failed
        page.goto(f"{base}/jobs?state=queued")
        page.get_by_label("check f-1").check()
        page.get_by_role("button", name="Cancel checked").click()
        expect(page.get_by_role("status")).to_have_text("1 job cancelled.")
    assert board.states() == {
        "f-0": "failed",
        "f-1": "cancelled",
        "f-2": "failed",
        "f-3": "queued",
    }


def test_purge_a_queue_after_confirming(dashboard, chromium, redis_client):  # noqa: F811
    board = dashboard()
    d = board.d
    with d.tm:
        for i in range(5):
            d.echo.apply_async((i,), tm=d.tm)
    assert redis_client.llen(d.queue) == 5
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/")
        row = page.locator("tbody tr", has_text=d.queue)
        expect(row.locator("td").nth(1)).to_have_text("5")
        row.get_by_role("link", name="clear…").click()
        expect(page.locator("h1")).to_have_text(f"Clear the queue {d.queue}?")
        shoot(page, "queue-clear")
        page.get_by_role("button", name=f"Clear {d.queue}").click()
        expect(page.get_by_role("status")).to_have_text(
            f"Queue {d.queue} cleared: 5 waiting jobs cancelled, its messages purged."
        )
        expect(row.locator("td").nth(1)).to_have_text("0")
    assert redis_client.llen(d.queue) == 0
    assert set(d.states().values()) == {"cancelled"}


def test_run_a_periodic_task_now(dashboard, chromium):  # noqa: F811
    board = dashboard(**BEAT)
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/")
        page.get_by_role("link", name="Periodic").click()
        row = page.locator("tbody tr", has_text="ping")
        expect(row.locator("td").nth(2)).to_have_text("never")
        shoot(page, "periodic")
        row.get_by_role("button", name="Run now").click()
        expect(page.get_by_role("status")).to_have_text(
            "Sent: the periodic task runs now."
        )
        expect(page.locator("h1 .state")).to_have_text("queued")
        page.get_by_role("link", name="Periodic").click()
        expect(row.locator("td").nth(2)).to_contain_text("queued")
    assert list(board.states().values()) == ["queued"]


def test_bulk_retry_a_failure_group(dashboard, chromium):  # noqa: F811
    board = dashboard()
    add_jobs(board.d.engine, *failed_rows(board.d.queue))
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/")
        page.get_by_role("link", name="Failures").click()
        row = page.locator("tbody tr").first
        expect(row).to_contain_text("ValueError: card <n> of <id> declined")
        shoot(page, "failures")
        row.get_by_role("button", name="Retry all").click()
        expect(page.get_by_role("status")).to_have_text("3 jobs sent again.")
        expect(page.locator("tbody tr")).to_have_count(2)
    states = board.states()
    assert [states[k] for k in ("c0", "c1", "c2", "k1", "p1")] == [
        "queued",
        "queued",
        "queued",
        "failed",
        "failed",
    ]


def test_live_refresh_moves_the_progress_bar_without_reloading(
    dashboard,  # noqa: F811
    chromium,
):
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "run-1", "name": "app.tasks.build_report", "queue": board.d.queue}
        | {"state": "started", "created_at": ago(30), "started_at": ago(29)}
        | {"progress": 20, "progress_message": "part 1 of 5", "attempts": 1},
    )
    with browsing(chromium, board) as (page, base):
        page.goto(f"{base}/jobs/run-1")
        bar = page.locator(".progress progress")
        expect(bar).to_have_attribute("value", "20")
        page.evaluate("window.notReloaded = true")
        page.locator("#refresh").select_option("2")
        with board.d.engine.begin() as connection:
            connection.execute(
                Job.__table__.update()
                .where(Job.id == "run-1")
                .values(progress=70, progress_message="part 4 of 5")
            )
        expect(bar).to_have_attribute("value", "70", timeout=10_000)
        expect(page.locator(".progress .message")).to_have_text("part 4 of 5")
        assert page.evaluate("window.notReloaded") is True
        shoot(page, "job-running")
        # The choice holds on the next page; "off" stops it.
        page.get_by_role("link", name="All jobs").first.click()
        expect(page.locator("#refresh")).to_have_value("2")
        page.locator("#refresh").select_option("0")
        page.reload()
        expect(page.locator("#refresh")).to_have_value("0")


def test_without_javascript_the_pages_read_and_filter(dashboard, chromium):  # noqa: F811
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "f-1", "state": "failed", "created_at": ago(9), "title": "Broken"},
        {"id": "ok-1", "state": "succeeded", "created_at": ago(5), "title": "Fine"},
    )
    with browsing(chromium, board, javascript=False) as (page, base):
        page.goto(f"{base}/jobs")
        expect(page.locator(".refresh")).to_be_hidden()
        expect(page.locator("tbody tr")).to_have_count(2)
        page.locator("select[name=state]").select_option("failed")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("tbody tr")).to_have_count(1)
        page.get_by_role("link", name="Broken").click()
        expect(page.locator("h1 .state")).to_have_text("failed")


def test_empty_and_on_a_narrow_window(dashboard, chromium):  # noqa: F811
    """An empty table says so; on a phone's width the page never scrolls
    sideways (a wide table scrolls inside it)."""
    board = dashboard()
    with browsing(chromium, board) as (page, base):
        for path, name, says in (
            ("/jobs", "jobs", "No job."),
            ("/failures", "failures", "No failed job."),
        ):
            page.goto(base + path)
            expect(page.locator("main")).to_contain_text(says)
            shoot(page, f"empty-{name}")
    add_jobs(
        board.d.engine,
        *[
            {"id": f"n-{i}", "state": "failed", "created_at": ago(i), "title": "Due"}
            for i in range(3)
        ],
        # n-1 was retried, and sent two jobs of its own.
        *[
            {"id": f"n-1-{i}", "parent_id": "n-1", "state": state}
            | {"name": "app.tasks.send_receipt", "created_at": ago(60 - i)}
            | {"title": f"Receipt #{i}" if i else None}
            for i, state in enumerate(("succeeded", "queued"))
        ],
    )
    retried = retry_mark({}, "operator", ago(30))
    with board.d.engine.begin() as connection:
        connection.execute(
            Job.__table__.update()
            .where(Job.id == "n-1")
            .values(options=retried, created_at=ago(90), started_at=ago(80))
        )
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/jobs/n-1")
        expect(page.locator(".timeline .label")).to_have_text(
            ["created", "started", "retried by an operator"]
        )
        children = page.locator("table.children tbody tr")
        expect(children).to_have_text([re.compile("Receipt #1"), re.compile("n-1-0")])
        shoot(page, "job-children")
        page.get_by_role("link", name="All its children in the list").click()
        expect(page.locator(".filters .parent")).to_have_text("children of n-1")
        expect(page.locator("tbody tr")).to_have_count(2)
        shoot(page, "jobs-children")
    with browsing(chromium, board, width=390) as (page, base):
        for path, name in (("/", "overview"), ("/jobs", "jobs"), ("/jobs/n-1", "job")):
            page.goto(base + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert (name, width) == (name, 390)
            shoot(page, f"narrow-{name}")


@pytest.mark.parametrize("in_ci, outcome", [(False, "skip"), (True, "fail")])
def test_without_chromium_the_tests_skip_locally_and_fail_in_ci(
    monkeypatch, tmp_path, in_ci, outcome
):
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    expected = pytest.skip.Exception if outcome == "skip" else pytest.fail.Exception
    with pytest.raises(expected, match=r"Chromium is unreachable: .* is missing"):
        check_chromium(str(tmp_path / "chromium"))
