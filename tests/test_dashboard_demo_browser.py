"""The demo app's jobs dashboard in a real browser (Playwright driving
Debian's Chromium), on PostgreSQL and Redis with a real worker: what an
operator of the demo does, end to end.

The demo (``conf/test.ini``'s ``[app:main]`` with the dashboard included, in
the test's own schema and queue) is served from a thread on 127.0.0.1: its
security policy lets a request from this machine operate.  Screenshots go
where ``tests/test_dashboard_browser.py`` saves its own.
"""

import re

import pytest
import transaction
from playwright.sync_api import expect
from pyramid.paster import get_app
from sqlalchemy import insert, select

from demo_app.models import Report
from pyramid_tasks.jobs import Job

from .conftest import overlay_ini, wait_for
from .test_dashboard_browser import chromium, served, shoot  # noqa: F401 (fixture)
from .test_jobs_web import own_redis  # noqa: F401 (fixture)

PREFIX = "/_tasks"
#: The demo with durable mode and the dashboard, its relay quick.
DEMO = {
    "pyramid.includes": "pyramid_tasks.jobs pyramid_tasks.dashboard",
    "demo.report_seconds": "5",
    "tasks.jobs.relay_interval": "0.2",
    "tasks.jobs.relay_grace": "1",
}
REPORT = "demo_app.tasks.build_report"
CONFIRM = "demo_app.tasks.confirm_order"


class Demo:
    """The web side of the demo on ``ini``: its WSGI app, its jobs."""

    def __init__(self, ini):
        self.app = get_app(str(ini))
        registry = self.app.registry
        self.celery = registry.celery_app
        self.jobs = registry.pyramid_tasks_jobs
        self.engine = registry["dbsession_factory"].kw["bind"]

    def send(self, name, *calls, **options):
        """One transaction sending a job of ``name`` per item of ``calls``
        (its args): their ids, once the broker took them."""
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            task = self.celery.tasks[name]
            ids = [task.apply_async(args, tm=tm, **options).id for args in calls]
        assert self.jobs.flush(10)
        return ids

    def add_reports(self, *ids):
        with self.engine.begin() as connection:
            connection.execute(insert(Report), [{"id": i} for i in ids])

    def state(self, job_id):
        return self.jobs.store.state(job_id)

    def states(self, name):
        with self.engine.connect() as connection:
            rows = connection.execute(select(Job.id, Job.state).where(Job.name == name))
            return dict(rows.all())

    def wait(self, job_id, *states):
        wait_for(
            lambda: self.state(job_id) in states,
            message=f"job {job_id} to be {'/'.join(states)}",
        )


@pytest.fixture
def demo(start_worker):
    """The demo's web side, and a worker of the demo (two processes)."""
    worker = start_worker("-c", "2", section="main", settings=DEMO)
    return Demo(worker.ini_path)


def browse(chromium, width=1280):  # noqa: F811 (the fixture imported above)
    return chromium.new_context(viewport={"width": width, "height": 900})


def test_an_operator_of_the_demo_on_postgresql_and_redis(
    demo,
    chromium,  # noqa: F811
    ini_vars,
):
    ours = ini_vars["queue"]
    # Three reports asked for before their rows exist: each job fails.
    failed = demo.send(REPORT, (901,), (902,), (903,))
    for job_id in failed:
        demo.wait(job_id, "failed")
    with served(demo.app) as url, browse(chromium) as context:
        page = context.new_page()
        menu = page.get_by_role("navigation")
        page.goto(url + "/")
        page.get_by_role("button", name="Build report").click()
        page.get_by_role("link", name="Jobs dashboard").click()
        expect(page.locator("h1")).to_have_text("Overview")
        shoot(page, "demo-overview")

        # The report's job runs: its bar moves with live refresh on.
        menu.get_by_role("link", name="All jobs").click()
        page.locator("select[name=state]").select_option("started")
        page.get_by_role("button", name="Filter").click()
        page.get_by_role("link", name=REPORT).click()
        page.locator("#refresh").select_option("2")
        seen = set()

        def moved():
            value = page.evaluate(
                "document.querySelector('.progress progress')?.value ?? null"
            )
            seen.add(value)
            return len(seen - {None, 0}) >= 2

        wait_for(moved, message="the report's progress bar to move")
        shoot(page, "demo-job-running")
        expect(page.locator("h1 .state")).to_have_text("succeeded", timeout=20_000)
        page.locator("#refresh").select_option("0")

        # Filter the failures, open one: its error and traceback.
        menu.get_by_role("link", name="All jobs").click()
        page.locator("select[name=state]").select_option("failed")
        page.locator("input[name=name]").fill(REPORT)
        page.get_by_role("button", name="Filter").click()
        assert re.search(r"\?state=failed&queue=&name=demo_app", page.url)
        expect(page.locator("tbody tr")).to_have_count(3)
        shoot(page, "demo-jobs-failed")
        page.locator("tbody tr", has_text=failed[0]).get_by_role("link").click()
        expect(page.locator("p.error")).to_have_text(
            "AttributeError: 'NoneType' object has no attribute 'state'"
        )
        expect(page.locator("pre.traceback")).to_contain_text("report.state")
        # The reports exist now: retried, the job succeeds.
        demo.add_reports(901, 902, 903)
        page.get_by_role("button", name="Retry").click()
        expect(page.get_by_role("status")).to_have_text(
            "Sent again: the job runs anew."
        )

        def succeeded():
            page.reload()
            return page.locator("h1 .state").inner_text() == "succeeded"

        wait_for(succeeded, message="the retried job to succeed in the browser")
        expect(page.locator(".timeline .label")).to_contain_text(
            ["created", "retried by an operator", "published", "started"]
        )
        shoot(page, "demo-job-retried")

        # The other two: one failure group, retried at once.
        menu.get_by_role("link", name="Failures").click()
        group = page.locator("tbody tr", has_text=REPORT)
        expect(group).to_contain_text("AttributeError: 'NoneType' object")
        shoot(page, "demo-failures")
        group.get_by_role("button", name="Retry all").click()
        expect(page.get_by_role("status")).to_have_text("2 jobs sent again.")
        for job_id in failed:
            demo.wait(job_id, "succeeded")

        # A reminder due in an hour, cancelled.
        [later] = demo.send(CONFIRM, (1,), countdown=3600)
        page.goto(f"{url}{PREFIX}/jobs?state=scheduled")
        page.locator("tbody tr", has_text=later).get_by_role("link").click()
        expect(page.locator(".timeline .label")).to_have_text(
            ["created", "due", "published"]
        )
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("h1 .state")).to_have_text("cancelled")
        assert demo.state(later) == "cancelled"

        # A queue no worker consumes fills up: cleared, its messages purged.
        idle = f"{ours}-idle"
        waiting = demo.send(CONFIRM, (2,), (3,), (4,), queue=idle)
        page.goto(f"{url}{PREFIX}/")
        row = page.locator("tbody tr", has_text=idle)
        expect(row.locator("td").nth(1)).to_have_text("3")
        row.get_by_role("link", name="clear…").click()
        page.get_by_role("button", name=f"Clear {idle}").click()
        expect(page.get_by_role("status")).to_have_text(
            f"Queue {idle} cleared: 3 waiting jobs cancelled, its messages purged."
        )
        assert {demo.state(job_id) for job_id in waiting} == {"cancelled"}
    assert set(demo.states(REPORT).values()) == {"succeeded"}


def demo_without_worker(tmp_path, ini_vars, **values):
    ini = overlay_ini(tmp_path / "demo.ini", "main", {**ini_vars, **values}, DEMO)
    return Demo(ini)


def test_live_refresh_waits_while_the_tab_is_hidden(
    tmp_path,
    ini_vars,
    chromium,  # noqa: F811
):
    demo = demo_without_worker(tmp_path, ini_vars)
    with served(demo.app) as url, browse(chromium) as context:
        page = context.new_page()
        page.clock.install()  # the page's timers run when the test says
        # The tab's visibility as the test sets it (a hidden tab's timers
        # still fire: Chromium only slows them down).
        page.add_init_script(
            """
            window.testHidden = false;
            Object.defineProperty(document, "hidden", {get: () => window.testHidden});
            Object.defineProperty(document, "visibilityState", {
              get: () => (window.testHidden ? "hidden" : "visible"),
            });
            """
        )
        fetched = []
        page.on(
            "request",
            lambda request: (
                fetched.append(request.url)
                if request.resource_type == "fetch"
                else None
            ),
        )
        page.goto(f"{url}{PREFIX}/jobs")
        page.locator("#refresh").select_option("5")

        def swapped():
            """When the last refresh was swapped in (the page's clock)."""
            return page.evaluate("document.documentElement.dataset.refreshed")

        def refreshes(count, before, hidden=None):
            """Wait for ``count`` fetches in all, the last one swapped in."""
            if hidden is not None:
                page.evaluate(
                    f"window.testHidden = {str(hidden).lower()};"
                    "document.dispatchEvent(new Event('visibilitychange'))"
                )
            wait_for(
                lambda: len(fetched) >= count and swapped() != before,
                message=f"refresh {count}",
            )
            assert len(fetched) == count

        for count in (1, 2):  # every 5 s
            before = swapped()
            page.clock.run_for(5_000)
            refreshes(count, before)
        page.evaluate(
            "window.testHidden = true;"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        page.clock.run_for(60_000)  # a minute hidden: nothing fetched
        # A fetch of the test's own, after any the timers made: requests
        # are reported in the order they are made.
        marker = f"{url}{PREFIX}/static/dashboard.css?after-hidden"
        page.evaluate("url => fetch(url)", marker)
        wait_for(lambda: marker in fetched, message="the test's own fetch")
        assert fetched.pop() == marker and len(fetched) == 2
        # Back on the tab: at once, then at each tick again.
        refreshes(3, swapped(), hidden=False)
        before = swapped()
        page.clock.run_for(5_000)
        refreshes(4, before)
        assert set(fetched) == {f"{url}{PREFIX}/jobs"}


def test_the_demo_with_its_broker_stopped_then_back(
    start_worker,
    own_redis,  # noqa: F811
    chromium,  # noqa: F811
    ini_vars,
):
    """With Redis stopped the order still commits, its job ``pending``, and
    every page answers; Redis back, the relay sends the job and the worker
    confirms the order."""
    settings = {**DEMO, "celery.broker_url": own_redis.url}
    demo = Demo(start_worker("-c", "1", section="main", settings=settings).ini_path)
    own_redis.stop()
    with served(demo.app) as url, browse(chromium) as context:
        page = context.new_page()
        page.goto(url + "/")
        page.get_by_role("button", name="Place order").first.click()
        order = page.locator("table").first.locator("tr").nth(1)  # the newest
        expect(order.locator("td").nth(3)).to_have_text("pending")
        page.get_by_role("link", name="Jobs dashboard").click()
        row = page.locator("tbody tr", has_text=ini_vars["queue"])
        expect(row.locator("td").nth(1)).to_have_text("1")
        shoot(page, "demo-broker-stopped-overview")
        page.get_by_role("navigation").get_by_role("link", name="Workers").click()
        expect(page.get_by_role("alert")).to_contain_text(
            "The broker did not answer: Error 111 connecting to 127.0.0.1:"
        )
        page.goto(f"{url}{PREFIX}/jobs?state=pending")
        page.get_by_role("link", name=CONFIRM).click()
        expect(page.locator("h1 .state")).to_have_text("pending")
        shoot(page, "demo-broker-stopped-job")

        own_redis.start()

        def succeeded():
            page.reload()
            return page.locator("h1 .state").inner_text() == "succeeded"

        wait_for(succeeded, timeout=60, message="the job sent once Redis is back")
        page.goto(url + "/")
        expect(order.locator("td").nth(2)).to_have_text("confirmed")
