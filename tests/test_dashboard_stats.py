"""The overview's throughput, failure rate and durations
(:mod:`pyramid_tasks.dashboard.stats`), on PostgreSQL and on SQLite.

Rows are inserted with known ``finished_at`` times and the figures are
asked for at a fixed ``now``: every bucket's count is known exactly.  The
PostgreSQL sessions run in a time zone of +05:30, so a bucket that follows
the session's zone instead of UTC shows.
"""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy
from sqlalchemy import event

from pyramid_tasks.dashboard import charts, stats
from pyramid_tasks.dashboard.stats import percentile, throughput

from .test_dashboard import Dashboard, dashboard, dashboard_setup, text  # noqa: F401
from .test_jobs_api import add_jobs, ago
from .test_jobs_web import durable, queue  # noqa: F401 (fixtures)

# 10 s into 12:34 UTC: the hour window is 11:35 up to 12:35, and 12:33
# is still settling (closed SETTLE, 15 s, after its end).
NOW = datetime(2026, 3, 10, 12, 34, 10, tzinfo=UTC)


def at(hh, mm, ss=0.0, day=10):
    return datetime(2026, 3, day, hh, mm, tzinfo=UTC) + timedelta(seconds=ss)


def on_sqlite(tmp_path):
    return {"sqlalchemy.url": f"sqlite:///{tmp_path}/jobs.sqlite", "demo.schema": ""}


@pytest.fixture(params=["postgresql", "sqlite"])
def board(request, durable, database_url, tmp_path):  # noqa: F811
    """A :class:`Dashboard` on PostgreSQL (a session time zone of +05:30)
    or on a SQLite file."""
    if request.param == "sqlite":
        settings = on_sqlite(tmp_path)
    else:
        url = sqlalchemy.make_url(database_url)
        url = url.update_query_dict({"options": "-ctimezone=Asia/Kolkata"})
        settings = {"sqlalchemy.url": url.render_as_string(hide_password=False)}
    return Dashboard(durable(setup=dashboard_setup(), **settings))


def job(job_id, state, finished_at, name="t", seconds=None):
    """A finished job's row; ``seconds``: its run time (None: never ran)."""
    started = None if seconds is None else finished_at - timedelta(seconds=seconds)
    return {
        "id": job_id,
        "name": name,
        "state": state,
        "created_at": finished_at - timedelta(seconds=(seconds or 0) + 1),
        "started_at": started,
        "finished_at": finished_at,
    }


def counts(figures):
    """``{bucket start: (succeeded, failed)}`` of the buckets with jobs."""
    return {
        b["start"]: (b["succeeded"], b["failed"])
        for b in figures["buckets"]
        if b["succeeded"] or b["failed"]
    }


def statements(engine, parameters=False):
    """The SQL statements run on ``engine`` from now on (a list, growing);
    with ``parameters``, ``(statement, parameters)`` each."""
    seen = []

    def before(conn, cursor, statement, values, context, executemany):
        seen.append((statement, values) if parameters else statement)

    event.listen(engine, "before_cursor_execute", before)
    return seen


# -- buckets -----------------------------------------------------------------------


def test_each_bucket_counts_the_jobs_finished_in_it(board):
    add_jobs(
        board.d.engine,
        job("a1", "succeeded", at(12, 34, 10)),  # the open minute
        job("a2", "succeeded", at(12, 34, 9.9)),
        job("a3", "failed", at(12, 34, 0)),  # a bucket's start is in it
        job("b1", "dead", at(12, 0, 0)),
        job("b2", "succeeded", at(11, 59, 59.999)),
        job("c1", "succeeded", at(11, 35, 0)),  # the window's first instant
        job("c2", "failed", at(11, 34, 59.999)),  # just before the hour
        job("d1", "succeeded", at(3, 0, 0)),  # earlier today
        job("e1", "failed", at(23, 59, 59, day=9)),  # yesterday
        job("e2", "succeeded", at(12, 35, 0, day=9)),  # the day window's first
        job("f1", "succeeded", at(0, 0, 0, day=9)),
        job("g1", "succeeded", at(0, 0, 0, day=8) - timedelta(days=28)),
        job("g2", "succeeded", at(0, 0, 0, day=9) - timedelta(days=28)),
        # Not counted: cancelled, and unfinished.
        job("x1", "cancelled", at(12, 30)),
        {"id": "x2", "state": "started", "created_at": at(12, 0), "name": "t"},
        {"id": "x3", "state": "queued", "created_at": at(12, 33), "name": "t"},
    )
    service = board.service

    hour = throughput(service, "hour", now=NOW)
    starts = [b["start"] for b in hour["buckets"]]
    assert (hour["window"], hour["unit"]) == ("hour", "minute")
    assert (hour["start"], hour["end"]) == (at(11, 35), at(12, 35))
    assert starts == [at(11, 35) + timedelta(minutes=m) for m in range(60)]
    assert counts(hour) == {
        at(12, 34): (2, 1),
        at(12, 0): (0, 1),
        at(11, 59): (1, 0),
        at(11, 35): (1, 0),
    }
    assert (hour["succeeded"], hour["failed"]) == (4, 2)

    day = throughput(service, "day", now=NOW)
    assert [b["start"] for b in day["buckets"]] == [
        at(13, 0, day=9) + timedelta(hours=h) for h in range(24)
    ]
    assert counts(day) == {
        at(12, 0): (2, 2),
        at(11, 0): (2, 1),
        at(3, 0): (1, 0),
        at(23, 0, day=9): (0, 1),
    }
    # 12:35 on the 9th is before the first hour bucket (13:00): not counted.
    assert (day["succeeded"], day["failed"]) == (5, 4)

    month = throughput(service, "month", now=NOW)
    assert [b["start"] for b in month["buckets"]] == [
        at(0, 0, day=9) - timedelta(days=28) + timedelta(days=d) for d in range(30)
    ]
    assert counts(month) == {
        at(0, 0): (5, 3),
        at(0, 0, day=9): (2, 1),
        at(0, 0, day=9) - timedelta(days=28): (1, 0),
    }
    assert (month["succeeded"], month["failed"]) == (8, 4)


def test_per_task_counts_failures_and_percentiles_of_known_durations(board):
    rows = [
        job(f"a{i}", "succeeded", at(12, 20, i), name="app.a", seconds=i)
        for i in range(1, 11)  # 1 s to 10 s
    ]
    rows += [
        job("b1", "succeeded", at(12, 10), name="app.b", seconds=0.5),
        job("b2", "failed", at(12, 11), name="app.b", seconds=1.5),
        job("b3", "dead", at(12, 12), name="app.b"),  # never ran
        job("c1", "dead", at(12, 13), name="app.c"),
        job("z1", "succeeded", at(11, 0), name="app.z", seconds=99),  # before
    ]
    add_jobs(board.d.engine, *rows)

    figures = throughput(board.service, "hour", now=NOW)
    tasks = {t["name"]: t for t in figures["tasks"]}
    assert [t["name"] for t in figures["tasks"]] == ["app.a", "app.b", "app.c"]
    assert figures["sample"] == stats.SAMPLE
    a, b, c = tasks["app.a"], tasks["app.b"], tasks["app.c"]
    assert (a["count"], a["failed"], a["timed"]) == (10, 0, 10)
    # percentile_cont: 5.5 between the 5th and 6th; 9.55 = 9 + 0.55 * (10 - 9).
    assert a["p50"] == pytest.approx(5.5, abs=1e-3)
    assert a["p95"] == pytest.approx(9.55, abs=1e-3)
    assert (b["count"], b["failed"], b["timed"]) == (3, 2, 2)
    assert b["p50"] == pytest.approx(1.0, abs=1e-3)
    assert b["p95"] == pytest.approx(1.45, abs=1e-3)
    assert (c["count"], c["failed"], c["timed"], c["p50"], c["p95"]) == (
        1,
        1,
        0,
        None,
        None,
    )

    # A sample of the 3 newest that ran: a8, a9, a10 (12:20:08 to 12:20:10).
    small = {
        t["name"]: t for t in throughput(board.service, now=NOW, sample=3)["tasks"]
    }
    assert small["app.a"]["count"] == 10  # the counts are not sampled
    assert small["app.a"]["timed"] == 3
    assert small["app.a"]["p50"] == pytest.approx(9.0, abs=1e-3)
    assert small["app.b"]["timed"] == 0


def test_on_postgresql_every_query_reads_a_range_of_the_finished_index(
    dashboard,  # noqa: F811
):
    """As PostgreSQL plans them (sequential scans turned off, as a large
    table makes the planner choose)."""
    board = dashboard()
    add_jobs(board.d.engine, job("a", "succeeded", at(12, 10), seconds=1))
    seen = statements(board.d.engine, parameters=True)
    for window in stats.WINDOWS:
        throughput(board.service, window, now=NOW)
    assert len(seen) == 3 * 3
    queries = list(seen)  # the EXPLAINs are seen too
    with board.d.engine.connect() as connection:
        connection.exec_driver_sql("SET enable_seqscan = off")
        for statement, values in queries:
            plan = connection.exec_driver_sql(f"EXPLAIN {statement}", values)
            plan = "\n".join(plan.scalars())
            assert "Index Cond: ((finished_at >= " in plan, plan
            assert "using ix_pyramid_tasks_job_finished" in plan, plan


def test_on_sqlite_every_query_reads_a_range_of_the_finished_index(
    durable,  # noqa: F811
    tmp_path,
):
    board = Dashboard(durable(setup=dashboard_setup(), **on_sqlite(tmp_path)))
    add_jobs(board.d.engine, job("a", "succeeded", at(12, 10), seconds=1))
    seen = statements(board.d.engine, parameters=True)
    for window in stats.WINDOWS:
        throughput(board.service, window, now=NOW)
    # Per window (cold): its closed buckets, the open minutes, the durations.
    assert len(seen) == 3 * 3
    ranges = ("(finished_at>? AND finished_at<?)", "(finished_at>?)")
    with board.d.engine.connect() as connection:
        for statement, values in list(seen):  # the EXPLAINs are seen too
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", values)
            [search] = [row[-1] for row in plan if "pyramid_tasks_job" in row[-1]]
            # Not ``USING INDEX ix_pyramid_tasks_job_state_created (state=?)``
            # (every succeeded job), as without ``+state``.
            assert search.startswith("SEARCH pyramid_tasks_job USING "), search
            assert search.endswith(
                tuple(f"INDEX ix_pyramid_tasks_job_finished {r}" for r in ranges)
            ), search


def test_percentile_interpolates_as_percentile_cont():
    assert percentile([], 0.5) is None
    assert percentile([4.0], 0.95) == 4.0
    assert percentile([1.0, 2.0], 0.5) == 1.5
    assert percentile([1.0, 2.0, 4.0], 1.0) == 4.0


# -- the cache -----------------------------------------------------------------------


def test_closed_buckets_are_read_once_and_the_open_ones_at_each_view(board):
    engine = board.d.engine
    add_jobs(engine, job("a", "succeeded", at(12, 10)), job("b", "failed", at(12, 34)))
    assert counts(throughput(board.service, now=NOW)) == {
        at(12, 10): (1, 0),
        at(12, 34): (0, 1),
    }
    seen = statements(engine)
    # Late rows: one in a closed minute (12:20), one in the open one and one
    # in the minute before it, still settling.
    add_jobs(
        engine,
        job("late", "succeeded", at(12, 20)),
        job("now", "succeeded", at(12, 34, 5)),
        job("settling", "failed", at(12, 33, 45)),
    )
    seen.clear()
    figures = throughput(board.service, now=NOW)
    assert counts(figures) == {
        at(12, 10): (1, 0),  # the closed minute 12:20 was read before "late"
        at(12, 33): (0, 1),
        at(12, 34): (1, 1),
    }
    # Two queries: the open minutes (12:33 and 12:34) and the durations.
    assert len(seen) == 2, seen

    # Two minutes on, 12:33 and 12:34 are closed: read once more, in full.
    later = NOW + timedelta(minutes=2)
    assert counts(throughput(board.service, now=later)) == {
        at(12, 10): (1, 0),
        at(12, 33): (0, 1),
        at(12, 34): (1, 1),
    }

    # The day and the month windows: their open bucket (this hour, today)
    # is the closed finer buckets (12:20 without "late") and the open
    # minutes, counted anew.
    for window in ("day", "month"):
        assert counts(throughput(board.service, window, now=later))[
            at(12, 0) if window == "day" else at(0, 0)
        ] == (2, 2)
    add_jobs(engine, job("newer", "failed", at(12, 36, 5)))
    seen.clear()
    for window in ("day", "month"):
        assert counts(throughput(board.service, window, now=later))[
            at(12, 0) if window == "day" else at(0, 0)
        ] == (2, 3)
    assert len(seen) == 4, seen  # per window: the open minutes, the durations


def test_the_cache_keeps_only_the_buckets_the_windows_show(board):
    add_jobs(board.d.engine, job("a", "succeeded", at(12, 10)))
    for window in stats.WINDOWS:
        throughput(board.service, window, now=NOW)
    cache = stats._cache_of(board.d.engine).closed
    sizes = {unit: len(buckets) for unit, buckets in cache.items()}
    # The hour window's 58 closed minutes (12:33 still settles); the day
    # window's 23 closed hours, and this hour's closed minutes (among the
    # 58); the month's 29 closed days, and today's closed hours (among the
    # 23).
    assert sizes == {"minute": 58, "hour": 23, "day": 29}
    # A week on (the 17th), a view forgets what no window shows any more:
    # the minutes and hours of the 10th, the days before 31 days ago (the
    # days kept: February 14th to March 9th).
    throughput(board.service, "hour", now=NOW + timedelta(days=7))
    sizes = {unit: len(buckets) for unit, buckets in cache.items()}
    assert sizes == {"minute": 58, "hour": 0, "day": 15 + 9}


def test_a_bad_window_is_refused_naming_the_parameter(board):
    with pytest.raises(ValueError) as caught:
        throughput(board.service, "week")
    assert str(caught.value) == (
        "unknown window 'week': expected one of hour, day, month"
    )
    assert caught.value.name == "window"
    page = board.get("/", window="week", status=400)
    assert "unknown window 'week': expected one of hour, day, month" in text(page)
    assert page.html.find("p", class_="error")["role"] == "alert"
    # The rest of the overview is there, and the windows to choose from.
    assert page.html.find("th", string="queue")
    links = page.html.find("nav", class_="windows").find_all("a")
    assert [a["href"] for a in links] == [
        "?window=hour",
        "?window=day",
        "?window=month",
    ]


# -- the page ---------------------------------------------------------------------


def test_the_overview_draws_the_window_it_is_asked_for(board):
    # Four in one minute, ten minutes ago.
    minute = stats._floor(ago(600), "minute") + timedelta(seconds=20)
    rows = [
        job(f"ok{i}", "succeeded", minute + timedelta(seconds=i), "app.send", 0.25)
        for i in range(4)
    ]
    rows += [job("bad", "failed", ago(7200), "app.sync", 3.5)]
    add_jobs(board.d.engine, *rows)

    page = board.get("/")
    nav = page.html.find("nav", class_="windows")
    assert nav.find("a", attrs={"aria-current": "page"}).get_text() == "hour"
    assert "4 finished in the last hour: 4 succeeded 0 failed" in text(page)
    (figure, rate) = page.html.find_all("figure", class_="chart")
    assert figure.figcaption.get_text() == "Jobs finished per minute"
    svg = figure.find("svg")
    assert svg["role"] == "img"
    assert svg["aria-labelledby"] == "chart-finished-title chart-finished-desc"
    description = svg.find("desc").get_text()
    assert "4 succeeded, 0 failed or dead; at most 4 in a minute." in description
    [bar] = svg.find_all("g")
    assert bar.title.get_text() == f"{minute:%H:%M}: 4 succeeded, 0 failed"
    assert len(bar.find_all("rect", class_="succeeded")) == 1
    assert svg.find_all("rect", class_="failed") == []
    assert rate.find("svg").find_all("g") == []  # no failure: no bar
    table = page.html.find("details").find("table")
    assert len(table.tbody.find_all("tr")) == 60
    cells = [
        [td.get_text() for td in tr.find_all("td")]
        for tr in page.html.find("h2", id="tasks").find_next("table").tbody("tr")
    ]
    assert cells == [["app.send", "4", "0", "0.0 %", "250 ms", "250 ms"]]

    page = board.get("/", window="day")
    assert "5 finished in the last day: 4 succeeded 1 failed (20.0 % failure rate)" in (
        text(page)
    )
    assert page.html.find("figcaption").get_text() == "Jobs finished per hour"
    assert len(page.html.find("details").find("table").tbody("tr")) == 24
    cells = [
        [td.get_text() for td in tr.find_all("td")]
        for tr in page.html.find("h2", id="tasks").find_next("table").tbody("tr")
    ]
    assert cells == [
        ["app.send", "4", "0", "0.0 %", "250 ms", "250 ms"],
        ["app.sync", "1", "1", "100.0 %", "3.50 s", "3.50 s"],
    ]
    tasks = page.html.find("h2", id="tasks").find_next("table")
    failed = tasks.find("a", class_="state failed", string="1")
    assert failed["href"] == "/_tasks/jobs?name=app.sync&state=failed,dead"

    page = board.get("/", window="month")
    assert len(page.html.find("details").find("table").tbody("tr")) == 30


def test_an_empty_window_says_so(board):
    add_jobs(board.d.engine, job("old", "succeeded", ago(31 * 86400)))
    page = board.get("/", window="month")
    assert "Last hour day 30 days No job finished in the last 30 days." in text(page)
    assert page.html.find("figure") is None  # no chart, no table of nothing
    assert page.html.find("h2", id="tasks") is None


# -- the charts' parts ----------------------------------------------------------------


def test_an_axis_ends_at_1_2_or_5_times_a_power_of_ten():
    assert [charts.nice_max(v) for v in (0, 1, 3, 7, 10, 11, 230, 0.04)] == [
        1,
        1,
        5,
        10,
        10,
        20,
        500,
        0.05,
    ]


def test_counts_on_an_axis_read_short():
    assert [charts.count_text(n) for n in (0, 500, 2500, 1_000_000)] == [
        "0",
        "500",
        "2.5k",
        "1M",
    ]


def test_run_times_read_short():
    assert [
        charts.seconds_text(s) for s in (None, 0.0123, 2.345, 42.12, 210, 4320)
    ] == ["\N{EN DASH}", "12 ms", "2.35 s", "42.1 s", "3.5 min", "1.2 h"]


def test_the_labels_of_an_axis_stay_inside_it():
    figures = {
        "unit": "minute",
        "start": at(11, 35),
        "end": at(12, 35),
        "succeeded": 3,
        "failed": 1,
        "buckets": [
            {"start": at(11, 35) + timedelta(minutes=m), "succeeded": 0, "failed": 0}
            for m in range(60)
        ],
    }
    figures["buckets"][0].update(succeeded=3, failed=1)
    drawn = charts.charts(figures)
    labels = drawn["throughput"]["labels"]
    assert [(x["text"], x["anchor"]) for x in labels] == [
        (f"{h:02d}:{m:02d}", "middle")
        for h, m in ((11, 40), (11, 50), (12, 0), (12, 10), (12, 20), (12, 30))
    ]
    # An axis to 5: no line at 2.5 jobs.
    assert drawn["throughput"]["ticks"] == [
        {"y": 144.0, "label": "0"},
        {"y": 8.0, "label": "5"},
    ]
    assert drawn["rate"]["top"] == 0.5  # 25 %: an axis to 50 %
    [bar] = drawn["rate"]["bars"]
    assert bar["title"] == "11:35: 25.0 % of 4"
    # A labelled first or last bucket: anchored at the chart's end.
    for first, (x, anchor) in ((at(11, 40), (0, "start")), (at(11, 41), (100, "end"))):
        figures["buckets"] = [
            {"start": first + timedelta(minutes=m), "succeeded": 0, "failed": 0}
            for m in range(60)
        ]
        labels = charts.charts(figures)["throughput"]["labels"]
        end = labels[0] if anchor == "start" else labels[-1]
        assert (end["x"], end["anchor"]) == (x, anchor)
