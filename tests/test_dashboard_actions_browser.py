"""The dashboard's queue and bulk actions in a real browser (Playwright on
Debian's Chromium), with a real worker: pause and resume a queue, run a
scheduled job now, retry every job matching a filter and watch the bulk
job's progress bar.  Screenshots under ``tests/screenshots/``."""

import pytest
import sqlalchemy
from playwright.sync_api import expect

from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import TEST_TASK

from .conftest import wait_for
from .test_dashboard import dashboard  # noqa: F401 (fixture)
from .test_dashboard_browser import (  # noqa: F401 (chromium: a fixture)
    SCREENSHOTS,
    browsing,
    chromium,
    shoot,
    state_of,
)
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, own_redis, queue  # noqa: F401 (fixtures)


def test_pause_and_resume_a_queue(
    dashboard,  # noqa: F811
    chromium,  # noqa: F811
    start_worker,
    ini_vars,
):
    ours = ini_vars["queue"]
    worker = start_worker("-c", "1", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ours})
    add_jobs(
        board.d.engine,
        {"id": "w-1", "state": "queued", "created_at": ago(65), "queue": ours},
        {"id": "f-1", "state": "failed", "created_at": ago(9), "queue": ours},
    )
    with browsing(chromium, board) as (page, base):
        page.goto(base + "/")
        page.get_by_role("link", name="Queues").click()
        expect(page.locator("h1")).to_have_text("Queues")
        row = page.locator("tbody tr", has_text=ours)
        expect(row.locator("td.consumers")).to_have_text(worker.node)
        shoot(page, "queues")
        row.get_by_role("button", name=f"pause {ours}").click()
        expect(page.get_by_role("status")).to_have_text(
            f"Queue {ours} paused: 1 worker(s) stopped consuming it"
        )
        expect(row.locator("td.consumers")).to_have_text("no worker")
        shoot(page, "queue-paused")
        row.get_by_label(f"resume {ours} on").select_option(worker.node)
        row.get_by_role("button", name=f"resume {ours}").click()
        expect(page.get_by_role("status")).to_have_text(
            f"Queue {ours} resumed: 1 worker(s) consume it"
        )
        expect(row.locator("td.consumers")).to_have_text(worker.node)
    with browsing(chromium, board, width=390) as (page, base):
        page.goto(base + "/queues")
        assert page.evaluate("document.documentElement.scrollWidth") == 390
        shoot(page, "narrow-queues")


def test_run_a_scheduled_job_now(
    dashboard,  # noqa: F811
    chromium,  # noqa: F811
    start_worker,
    ini_vars,
):
    ours = ini_vars["queue"]
    worker = start_worker("-c", "1", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ours})
    d = board.d
    with d.tm:
        job_id = (
            d.app.tasks[TEST_TASK]
            .apply_async(tm=d.tm, countdown=3600, title="Nightly report")
            .id
        )
    assert d.states() == {job_id: "scheduled"}
    with browsing(chromium, board) as (page, base):
        page.goto(f"{base}/jobs?state=scheduled")
        page.get_by_role("link", name="Nightly report").click()
        expect(page.locator("h1 .state")).to_have_text("scheduled")
        expect(page.get_by_role("button")).to_have_text(["Run now", "Cancel"])
        shoot(page, "job-run-now")
        page.get_by_role("button", name="Run now").click()
        expect(page.get_by_role("status")).to_have_text(
            "Sent: the job runs now, not at its due time."
        )

        def succeeded():
            page.reload()
            return state_of(page) == "succeeded"

        wait_for(succeeded, message="the job run now to succeed")
        expect(page.locator(".timeline .label")).not_to_contain_text(["due"])
        shoot(page, "job-run-now-done")
    assert worker.log.count(f"Test job {job_id} ran") == 1


# Hundreds of jobs on one worker: never beside the other such test (xdist's
# --dist loadgroup runs a group's tests one after the other on one worker).
@pytest.mark.xdist_group("many_jobs")
def test_bulk_retry_the_matching_jobs_and_watch_its_progress(
    dashboard,  # noqa: F811
    chromium,  # noqa: F811
    start_worker,
    ini_vars,
):
    ours = ini_vars["queue"]
    worker = start_worker("-c", "1", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ours})
    ids = [f"f-{i:04d}" for i in range(600)]
    add_jobs(
        board.d.engine,
        *[
            {"id": job_id, "name": TEST_TASK, "queue": ours, "state": "failed"}
            | {"created_at": ago(3600 - i), "attempts": 1}
            | {"title": f"Export #{i}", "error": "OSError: disk full"}
            for i, job_id in enumerate(ids)
        ],
    )
    # A job of the second batch (newest first, 200 a batch) locked: the bulk
    # job stops there, its first batch done, until the lock goes.
    holder = board.d.engine.connect()
    lock = holder.begin()
    holder.execute(
        sqlalchemy.select(Job.id).where(Job.id == "f-0300").with_for_update()
    )
    try:
        with browsing(chromium, board) as (page, base):
            page.goto(f"{base}/jobs?state=failed&name={TEST_TASK}")
            # The top of the list: its actions (the page holds 50 rows).
            page.screenshot(path=SCREENSHOTS / "jobs-matching.png")
            page.get_by_role("link", name="retry…").click()
            expect(page.locator("h1")).to_have_text(
                "Retry every job matching these filters?"
            )
            expect(page.locator(".matching-count")).to_have_text("600")
            shoot(page, "bulk-confirm")
            page.get_by_role("button", name="Retry them").click()
            expect(page.get_by_role("status")).to_have_text(
                "Sent: this job does the work in batches; its progress shows here."
            )
            bulk_id = page.url.split("/jobs/")[1].split("?")[0]
            wait_for(
                lambda: board.service.get(bulk_id)["progress"] == 33,
                message="the first batch to be done",
            )
            page.reload()
            expect(page.locator("h1 .state")).to_have_text("started")
            expect(page.locator(".progress progress")).to_have_attribute("value", "33")
            expect(page.locator(".progress .message")).to_have_text(
                "200 of 600 jobs, 200 retried"
            )
            shoot(page, "bulk-progress")
            lock.rollback()
            page.locator("#refresh").select_option("2")
            expect(page.locator("h1 .state")).to_have_text("succeeded", timeout=30_000)
            shoot(page, "bulk-done")
    finally:
        holder.close()
    wait_for(
        lambda: (
            board.service.list(state="succeeded", name=TEST_TASK, limit=1000)
            and len(board.service.list(state="succeeded", name=TEST_TASK, limit=1000))
            == 600
        ),
        timeout=180,  # a loaded machine (a deadline, no speed bound)
        message="the 600 retried jobs to succeed",
    )
    log = worker.log
    assert [log.count(f"Test job {job_id} ran") for job_id in ids] == [1] * 600
