"""The overview's charts in a real browser (Playwright on Debian's Chromium):
a day of jobs, its windows chosen by links, wide and narrow; screenshots
under ``tests/screenshots/``."""

from playwright.sync_api import expect

from .test_dashboard import dashboard  # noqa: F401 (fixture)
from .test_dashboard_browser import browsing, chromium, shoot  # noqa: F401
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, queue  # noqa: F401 (fixtures)

TASKS = ("app.tasks.send_invoice", "app.tasks.build_report", "app.tasks.sync_crm")


def a_day_of_jobs(queue_name):
    """Jobs finished over the last day, more by day than by night, and a
    burst of failures of one task half an hour ago."""
    rows = []
    for minute in range(0, 24 * 60, 3):
        busy = 1 + (minute // 60) % 5
        for n in range(busy if minute > 60 else busy + (minute % 7)):
            name = TASKS[(minute + n) % 3]
            failed = (name == TASKS[2] and 25 <= minute <= 40) or (minute + n) % 23 == 0
            finished = minute * 60 + n * 7 + 5
            run = 0.2 + ((minute * 7 + n) % 40) / 10 * (2 if name == TASKS[1] else 1)
            rows.append(
                {"id": f"j{minute}-{n}", "name": name, "queue": queue_name}
                | {"state": "failed" if failed else "succeeded"}
                | {"created_at": ago(finished + run + 1)}
                | {"started_at": ago(finished + run), "finished_at": ago(finished)}
            )
    return rows


def test_the_overview_charts_its_windows(dashboard, chromium):  # noqa: F811
    board = dashboard()
    rows = a_day_of_jobs(board.d.queue)
    add_jobs(board.d.engine, *rows)
    with browsing(chromium, board, role="viewer", width=1280) as (page, base):
        page.goto(base + "/")
        chart = page.get_by_role("img", name="Jobs finished per minute")
        expect(chart).to_be_visible()
        expect(page.locator("nav.windows [aria-current]")).to_have_text("hour")
        # A bar tells its figures when hovered (its SVG title).
        assert page.locator("figure.chart").first.locator("g").count() >= 15
        shoot(page, "overview-stats-hour")
        page.get_by_role("link", name="day", exact=True).click()
        expect(page.get_by_role("img", name="Jobs finished per hour")).to_be_visible()
        expect(page.locator("nav.windows [aria-current]")).to_have_text("day")
        first = page.locator("h2#tasks + table tbody tr").first
        expect(first.locator("td").first).to_have_text(TASKS[0])
        page.get_by_text("The same figures as a table").click()
        expect(page.locator("details table tbody tr")).to_have_count(24)
        shoot(page, "overview-stats-day")
        page.get_by_role("link", name="30 days").click()
        expect(page.get_by_role("img", name="Jobs finished per day")).to_be_visible()
        shoot(page, "overview-stats-month")

    with browsing(chromium, board, role="viewer", width=390) as (page, base):
        page.goto(base + "/?window=day")
        expect(page.get_by_role("img", name="Jobs finished per hour")).to_be_visible()
        # Nothing wider than the window: the page never scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shoot(page, "overview-stats-narrow")
