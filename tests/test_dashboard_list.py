"""The jobs list's filters (state, queue, name, title, error, created and
finished ranges): one service, three skins (the dashboard, the JSON API, the
``jobs list`` command), on PostgreSQL and SQLite; its searched filters stop
after ``JobService.search_depth`` jobs and say where to go on; its queries
read the index each filter has.
"""

# The fixtures imported from the other test modules are the arguments here.
# ruff: noqa: F811

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy
from sqlalchemy import event

from pyramid_tasks.dashboard.counts import overview
from pyramid_tasks.jobs import bulk as jobs_bulk
from pyramid_tasks.jobs.model import STATES, utcnow
from pyramid_tasks.jobs.service import BadParameter, JobService

from .test_dashboard import (  # noqa: F401 (fixtures)
    dashboard,
    durable,
    own_redis,
    queue,
    text,
)
from .test_jobs_api import add_jobs, api  # noqa: F401 (a fixture)
from .test_jobs_commands import app, ini, jobs, refused, service  # noqa: F401

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def at(minutes):
    return T0 + timedelta(minutes=minutes)


def rows(queue):
    """Six jobs, one a minute from T0 (a oldest, f newest)."""
    return (
        {"id": "a", "state": "succeeded", "created_at": at(0), "finished_at": at(2)}
        | {"queue": queue, "name": "mail", "title": "Order 1"},
        {"id": "b", "state": "failed", "created_at": at(1), "finished_at": at(30)}
        | {"queue": queue, "name": "mail", "error": "TimeoutError: took 30s"},
        {"id": "c", "state": "dead", "created_at": at(2), "finished_at": at(3)}
        | {"queue": queue, "name": "bill", "error": "KeyError: 'customer'"},
        {"id": "d", "state": "queued", "created_at": at(3), "queue": queue}
        | {"name": "bill", "title": "Order 2", "error": "timeouterror: old"},
        {"id": "e", "state": "cancelled", "created_at": at(4), "finished_at": at(4)}
        | {"queue": queue, "name": "mail", "title": "100% off_"},
        {"id": "f", "state": "started", "created_at": at(5), "queue": queue}
        | {"name": "mail", "title": "order 3"},
    )


def check_filters(service):
    """The filters on the jobs of :func:`rows`, alone and combined."""

    def ids(**filters):
        return [job["id"] for job in service.list(**filters, fields=())]

    assert ids() == ["f", "e", "d", "c", "b", "a"]
    assert ids(error="TIMEOUTerror") == ["d", "b"]
    assert ids(error="timeout", state="failed") == ["b"]
    assert ids(error="customer", name="bill") == ["c"]
    assert ids(title="order") == ["f", "d", "a"]
    assert ids(title="0% OFF_") == ["e"]  # % and _ taken literally
    assert ids(title="%") == ["e"]
    # Created: at or after, strictly before; aware datetimes or ISO text.
    assert ids(created_after=at(2)) == ["f", "e", "d", "c"]
    assert ids(created_before=at(2)) == ["b", "a"]
    assert ids(created_after=at(1), created_before=at(4)) == ["d", "c", "b"]
    assert ids(created_after="2026-11-20T12:03") == ["f", "e", "d"]  # UTC
    assert ids(created_after="2026-11-20T13:03:00+01:00") == ["f", "e", "d"]
    assert ids(created_before=" 2026-11-20T12:01:00Z ") == ["a"]
    # Finished: only finished jobs have a time.
    assert ids(finished_after=at(3)) == ["e", "c", "b"]
    assert ids(finished_before=at(4)) == ["c", "a"]
    assert ids(finished_after=at(3), finished_before=at(30)) == ["e", "c"]
    assert ids(finished_after=at(0), state="queued") == []
    # Everything at once, and paging through it.
    both = {"queue": service.check_queues(None), "name": "mail", "title": "order"}
    assert ids(**both, created_after=at(0), finished_before=at(3)) == ["a"]
    assert ids(name="mail", created_before=at(5), before="e") == ["b", "a"]
    assert ids(created_after="", finished_before="", error="", title="") == ids()


def test_each_filter_alone_and_combined_on_postgresql(dashboard):
    board = dashboard()
    add_jobs(board.d.engine, *rows(board.d.queue))
    check_filters(board.service)


def test_the_same_filters_on_sqlite(tmp_path):
    from demo_app import main

    app = main(
        {},
        **{
            "sqlalchemy.url": f"sqlite:///{tmp_path}/demo.sqlite",
            "pyramid.includes": "\npyramid_tasks.jobs",
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
        },
    )
    service = JobService.from_registry(app.registry)
    try:
        add_jobs(service.store.engine, *rows("celery"))
        check_filters(service)
        service.search_depth = 2
        page = service.list_page(title="order", limit=3, fields=())
        assert [job["id"] for job in page["jobs"]] == ["f"]
        assert page["searched"] == "e"
    finally:
        service.store.engine.dispose()


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"error": 5}, "bad error 5: not a string"),
        ({"title": ["x"]}, "bad title ['x']: not a string"),
        ({"created_after": "yesterday"}, "bad created_after 'yesterday': expected "),
        ({"created_before": 20261120}, "bad created_before 20261120: expected "),
        (
            {"finished_after": datetime(2026, 11, 20)},  # naive: which zone?
            "bad finished_after datetime.datetime(2026, 11, 20, 0, 0): expected ",
        ),
        ({"finished_before": "2026-13-01"}, "bad finished_before '2026-13-01'"),
    ],
)
def test_a_bad_filter_is_a_bad_parameter_naming_it(dashboard, filters, message):
    board = dashboard()
    with pytest.raises(BadParameter) as raised:
        board.service.list(**filters)
    [(name, value)] = filters.items()
    assert (raised.value.name, raised.value.value) == (name, value)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "an ISO 8601 time such as 2026-12-01T09:30 (UTC)" in str(
        raised.value
    ) or name in ("error", "title")


def searched_rows(queue):
    """Eight jobs, h newest; b, c, e and g have the title ``match``."""
    return [
        {"id": job_id, "state": "succeeded", "created_at": at(n), "queue": queue}
        | {"title": "a match" if job_id in "bceg" else "other"}
        | {"finished_at": at(n + 1), "error": "Boom" if job_id in "bceg" else None}
        for n, job_id in enumerate("abcdefgh")
    ]


def test_a_search_stops_after_search_depth_jobs_and_says_where_to_go_on(dashboard):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    service = board.service
    service.search_depth = 3

    def page(**filters):
        found = service.list_page(**filters, fields=())
        return [job["id"] for job in found["jobs"]], found["searched"]

    # The newest three (h, g, f): one match, not a page: go on before f.
    assert page(title="match", limit=5) == (["g"], "f")
    assert page(title="match", limit=5, before="f") == (["e", "c"], "c")
    assert page(title="match", limit=5, before="c") == (["b"], None)  # a, b: all
    # A full page says nothing: its last job is the next page's before.
    assert page(title="match", limit=1) == (["g"], None)
    # The error filter's window holds only jobs with an error (b, c, e, g).
    assert page(error="boom", limit=5) == (["g", "e", "c"], "c")
    assert page(error="boom", limit=5, before="c") == (["b"], None)
    # Indexed filters alone are never cut short.
    assert page(limit=5) == (["h", "g", "f", "e", "d"], None)
    assert page(created_after=at(1), limit=10)[1] is None
    # Finished times are searched, from the bound down.
    assert page(finished_after=at(7), limit=5) == (["h", "g"], "f")
    assert page(finished_before=at(4), limit=5) == (["c", "b"], "b")


def test_the_dashboard_form_and_url_carry_every_filter(dashboard, monkeypatch):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    page = board.get("/jobs", error="BOOM", created_after="2026-11-20T12:00")
    form = page.forms[0]
    assert form["error"].value == "BOOM"
    assert form["created_after"].value == "2026-11-20T12:00:00"
    times = [
        i for i in page.html.find_all("input") if i.get("type") == "datetime-local"
    ]
    assert [i["name"] for i in times] == [
        "created_after",
        "created_before",
        "finished_after",
        "finished_before",
    ]
    assert "created after (UTC)" in text(page)
    listed = [a.get_text() for a in page.html.select("td a")]
    assert listed == ["a match"] * 4
    # The form submits what it shows.
    form["finished_before"] = "2026-11-20T12:04"
    again = form.submit(headers={"X-Role": "viewer"})
    assert [a.get_text() for a in again.html.select("code")] == ["c", "b"]
    # A search cut short says so and links to the older jobs.
    monkeypatch.setattr(JobService, "search_depth", 3)
    page = board.get("/jobs", title="match")
    assert [a.get_text() for a in page.html.select("code")] == ["g"]
    assert "Searched the newest 3 jobs that the other filters select" in text(page)
    link = page.html.find("a", string="search older ones »")["href"]
    assert link == "/_tasks/jobs?title=match&before=f"
    assert page.html.find("a", rel="next").get_text() == "search older »"
    older = board.get("/jobs", title="match", before="f")
    assert [a.get_text() for a in older.html.select("code")] == ["e", "c"]
    # A bad time: 400, naming it, the form kept.
    empty = board.get("/jobs", title="nowhere")
    assert "No job matches these filters among those searched." in text(empty)
    bad = board.get("/jobs", status=400, finished_after="soon")
    assert "bad finished_after 'soon': expected an ISO 8601 time" in text(bad)
    assert bad.forms[0]["finished_after"].value == "soon"


def test_the_api_takes_the_same_filters(api, monkeypatch):
    client = api()
    add_jobs(client.d.engine, *searched_rows(client.d.queue))

    def ids(**params):
        page = client.get("/jobs", params)
        return [job["id"] for job in page["jobs"]], page["before"]

    assert ids(error="boom", created_before="2026-11-20T12:06") == (
        ["e", "c", "b"],
        None,
    )
    assert ids(finished_after="2026-11-20T12:08:00Z") == (["h"], None)
    assert ids(finished_before="2026-11-20T12:02Z", limit="1") == (["a"], None)
    assert ids(finished_before="2026-11-20T12:03Z", limit="1") == (["b"], "b")
    # A search cut short: a page short of the limit, and a next one.
    monkeypatch.setattr(JobService, "search_depth", 3)
    assert ids(title="match") == (["g"], "f")
    assert ids(title="match", before="f") == (["e", "c"], "c")
    assert ids(title="match", before="c") == (["b"], None)
    # A full page whose next one is yet to be searched: it has a before.
    assert ids(title="match", limit="1") == (["g"], "g")
    answer = client.get("/jobs", {"created_after": "now"}, status=400)
    assert answer["parameter"] == "created_after"
    assert answer["error"].startswith("bad created_after 'now': expected an ISO")


# The command sets up the INI's logging in this process: undone after it.
@pytest.mark.usefixtures("restore_logging")
def test_the_command_takes_the_same_filters(jobs, service, monkeypatch):
    engine = service.store.engine
    add_jobs(engine, *searched_rows(service.app.conf.task_default_queue))
    status, out, err = jobs(
        "list", "--error", "BOOM", "--created-after", "2026-11-20T12:02"
    )
    assert (status, err) == (0, "")
    assert [line.split()[2] for line in out.splitlines()] == ["g", "e", "c"]
    lines = jobs("list", "--finished-before", "2026-11-20T12:03Z")[1].splitlines()
    assert [line.split()[2] for line in lines] == ["b", "a"]
    out = jobs("list", "--created-before", "2026-11-20T12:01", "--json")[1]
    assert '"id": "a"' in out and '"id": "b"' not in out
    monkeypatch.setattr(JobService, "search_depth", 3)
    out = jobs("list", "--title", "match", "--finished-after", "2026-11-20T12:00")[1]
    assert out.splitlines() == [
        out.splitlines()[0],
        "Searched the newest 3 jobs the other filters select; "
        "the older ones: --before f",
    ]
    assert out.splitlines()[0].split()[2] == "g"
    assert jobs("list", "--title", "match", "--before", "h", "--limit", "3")[
        1
    ].splitlines()[-1] == (
        "Searched the newest 3 jobs the other filters select; "
        "the older ones: --before e"
    )
    assert jobs("list", "--error", "nothing")[1] == (
        "Searched the newest 3 jobs the other filters select; "
        "the older ones: --before c\n"
    )
    assert refused(jobs, "list", "--finished-before", "tuesday").startswith(
        "jobs list: bad finished_before 'tuesday': expected an ISO 8601 time"
    )
    monkeypatch.undo()
    assert jobs("list", "--queue", service.app.conf.task_default_queue)[1] != (
        "No job matches these filters.\n"
    )
    assert jobs("list", "--state", "dead")[1] == "No job matches these filters.\n"
    assert [
        line.split()[2]
        for line in jobs("list", "--state", "failed,succeeded")[1].splitlines()
    ] == list("hgfedcba")


def test_the_form_shows_times_and_combined_states_as_given(dashboard):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    # An offset, a Z, a date alone: each shown in UTC in its input.
    page = board.get(
        "/jobs",
        created_after="2026-11-20T13:02+01:00",
        created_before="2026-11-20T12:06Z",
        finished_before="2026-11-21",
        state="succeeded,failed",
    )
    form = page.forms[0]
    assert (
        form["created_after"].value,
        form["created_before"].value,
        form["finished_before"].value,
        form["finished_after"].value,
    ) == ("2026-11-20T12:02:00", "2026-11-20T12:06:00", "2026-11-21T00:00:00", "")
    assert form["state"].value == "succeeded,failed"  # kept, as an option
    assert [a.get_text() for a in page.html.select("code")] == ["f", "e", "d", "c"]
    again = form.submit(headers={"X-Role": "viewer"})
    assert [a.get_text() for a in again.html.select("code")] == ["f", "e", "d", "c"]


# -- the plans -----------------------------------------------------------------------


def plans(board, pg_schema, **filters):
    """The plans PostgreSQL makes of the list's queries, sequential scans
    off (as a large table makes the planner choose)."""
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(board.d.engine, "before_cursor_execute", record)
    try:
        board.service.list(**filters, fields=("name",))
    finally:
        event.remove(board.d.engine, "before_cursor_execute", record)
    found = []
    with board.d.engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'SET search_path TO "{pg_schema}"'))
        connection.execute(sqlalchemy.text("SET enable_seqscan = off"))
        statement, parameters = seen[-1]  # the list's own query
        plan = connection.exec_driver_sql("EXPLAIN " + statement, parameters)
        found = "\n".join(plan.scalars())
    return found


@pytest.mark.parametrize(
    ("filters", "index", "branches"),
    [
        ({}, "state_created", 9),
        ({"state": "failed"}, "state_created", 1),
        ({"queue": "QUEUE"}, "queue_state_created", 9),
        ({"name": ["mail", "bill"]}, "name_state_created", 18),
        ({"name": "mail", "queue": "QUEUE"}, "name_state_created", 9),
        ({"error": "boom"}, "error_state_created", 9),
        ({"finished_after": T0}, "state_created", 4),
    ],
)
def test_each_branch_reads_the_index_of_its_filter(
    dashboard, pg_schema, filters, index, branches
):
    board = dashboard()
    add_jobs(board.d.engine, *rows(board.d.queue))
    # Jobs of other queues and names, so that the planner sees what a
    # table of many queues makes it choose.
    others = [
        {"id": f"o{n}", "state": STATES[n % 9], "created_at": at(n % 600)}
        | {"queue": f"other{n % 20}", "name": f"other{n % 30}"}
        for n in range(6000)
    ]
    add_jobs(board.d.engine, *others)
    with board.d.engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'ANALYZE "{pg_schema}".pyramid_tasks_job'))
    filters = {k: board.d.queue if v == "QUEUE" else v for k, v in filters.items()}
    plan = plans(board, pg_schema, **filters)
    print(plan)
    # A searched filter reads its window twice in the one statement: for the
    # matches, and for the window's end, only when the matches are short of
    # a page (a one-time filter before that scan).
    searched = {"queue", "error", "finished_after"} & set(filters) and (
        len(filters) > 1 or "queue" not in filters
    )
    copies = 2 if searched else 1
    assert ("One-Time Filter: ($1 < 50)" in plan) == bool(searched)
    assert plan.count(f"ix_pyramid_tasks_job_{index}") == branches * copies
    if "finished_after" not in filters:  # else the window's end: any scan
        backward = plan.count("Index Scan Backward")
        assert backward + plan.count("Index Only Scan Backward") == branches * copies
    assert "Seq Scan" not in plan and "args" not in plan


# -- the overview ----------------------------------------------------------------------


def test_the_overview_takes_any_queue_name_in_its_one_select(dashboard, pg_schema):
    """Its statements carry the names inline (compiled once per set of
    queues): quotes, ``%`` and ``:`` stay names."""
    board = dashboard()
    odd = "it's 100%:done"
    add_jobs(
        board.d.engine,
        *(
            {"id": f"w{n}", "state": "queued", "created_at": at(n), "queue": odd}
            for n in range(3)
        ),
        {"id": "f", "state": "failed", "created_at": at(9), "queue": odd},
    )
    with board.d.engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'ANALYZE "{pg_schema}".pyramid_tasks_job'))
    statements = []
    event.listen(
        board.d.engine,
        "before_cursor_execute",
        lambda *args: statements.append(args[2]),
    )
    for _ in range(2):  # the second from the cache
        del statements[:]
        [row] = [r for r in overview(board.service, cap=1) if r["queue"] == odd]
        assert (row["waiting"], row["failed"], row["dead"]) == (2, 1, 0)
        assert set(row["about"]) == {"waiting"} and row["about"]["waiting"] >= 1
        age = (utcnow() - at(0)).total_seconds()
        assert age - 5 < row["oldest_waiting_age"] <= age
        assert len(statements) == 3, statements  # queues, counts, estimates


# -- everything matching a filter ----------------------------------------------------


def test_a_bulk_action_follows_a_search_through_every_window(dashboard, monkeypatch):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    monkeypatch.setattr(JobService, "search_depth", 3)
    service = board.service
    # Windows h g f (g), then e d c (e, c: the search stops at c), then b a.
    assert jobs_bulk.matching(service, "delete", {"title": "match"}) == 4
    assert jobs_bulk.matching(service, "delete", {"title": "match"}, cap=1) == 2
    deleted = []
    real = service.delete
    monkeypatch.setattr(
        JobService, "delete", lambda self, ids: deleted.append(ids) or real(ids)
    )

    class Run:  # the task's self: its request and progress
        app = board.d.app
        request = type("request", (), {"id": "the-bulk-job"})
        progress = []

        def set_progress(self, *args):
            self.progress.append(args)

        def cancel_requested(self):
            return False

    run = Run()
    result = jobs_bulk.bulk_job(run, "delete", {"title": "match"})
    assert result == {"action": "delete", "matching": 4, "changed": 4}
    # A batch a search: the third goes on from where the second stopped
    # (c's time and id: c is deleted by then).
    assert deleted == [["g"], ["e", "c"], ["b"]]
    assert sorted(board.states()) == ["a", "d", "f", "h"]
    assert run.progress[-1] == (100, None, "4 of 4 jobs, 4 deleted")


def test_a_parent_narrows_first_its_name_and_queue_are_searched(dashboard):
    board = dashboard()
    q = board.d.queue
    add_jobs(
        board.d.engine,
        *(
            {"id": f"k{n}", "state": "succeeded", "created_at": at(n), "queue": q}
            | {"parent_id": "p", "name": "mail" if n % 2 else "bill"}
            for n in range(4)
        ),
        {"id": "other", "state": "succeeded", "created_at": at(9), "queue": q}
        | {"name": "mail"},
    )

    def page(**filters):
        found = board.service.list_page(**filters, fields=())
        return [job["id"] for job in found["jobs"]], found["searched"]

    assert page(parent="p") == (["k3", "k2", "k1", "k0"], None)
    assert page(parent="p", name="mail", queue=q) == (["k3", "k1"], None)
    assert page(parent=["p"], name="none", limit=1) == ([], None)
