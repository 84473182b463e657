"""The jobs dashboard (``config.include('pyramid_tasks.dashboard')``) through WebTest.

A durable app (real PostgreSQL in a schema of the test's own, real Redis on a
queue of the test's own) with the JSON API's test security policy: the role
comes from the ``X-Role`` header (anonymous, ``viewer``, ``manager``); the
CSRF token lives in a cookie and the forms carry it.
"""

import html
import logging
import re

import pytest
import sqlalchemy
import webtest
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from sqlalchemy import select

from pyramid_tasks.dashboard import (
    DEFAULT_REDACT,
    JobsActedOn,
    actions,
    failures,
    parse_dashboard_settings,
    views,
)
from pyramid_tasks.dashboard.counts import overview
from pyramid_tasks.dashboard.failures import signature
from pyramid_tasks.dashboard.render import ago as short_age
from pyramid_tasks.dashboard.render import count as _count
from pyramid_tasks.dashboard.render import redacted
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import JobService

from .conftest import wait_for
from .test_jobs_api import ROLES, SESSION_FACTORY, RolePolicy, add_jobs, ago
from .test_jobs_web import (  # noqa: F401 (fixtures)
    Statements,
    durable,
    own_redis,
    queue,
)
from .test_jobs_worker import Probe

PREFIX = "/_tasks"
AUDIT = "pyramid_tasks.dashboard.audit"


def dashboard_setup(roles=ROLES, events=None):
    def setup(config):
        config.set_security_policy(RolePolicy(roles))
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        config.include("pyramid_tasks.dashboard")
        if events is not None:
            config.add_subscriber(events.append, JobsActedOn)

    return setup


class Dashboard:
    """WebTest on a durable app with the dashboard."""

    def __init__(self, durable_app, prefix=PREFIX):
        self.d = durable_app
        self.prefix = prefix
        self.app = webtest.TestApp(durable_app.config.make_wsgi_app())
        self.service = JobService.from_registry(durable_app.registry)

    def get(self, path, role="viewer", status=200, **params):
        headers = {"X-Role": role} if role else {}
        response = self.app.get(
            self.prefix + path, params, headers=headers, status=status
        )
        if status != 403:  # the host's forbidden view answers that
            assert response.headers["Cache-Control"] == "no-store"
        return response

    def token(self):
        """A CSRF token, as its cookie (what a manager's page sets)."""
        self.app.set_cookie("csrf_token", "the-token")
        return "the-token"

    def post(self, path, role="manager", token=True, status=303, **params):
        headers = {"X-Role": role} if role else {}
        if token:
            params["csrf_token"] = self.token()
        return self.app.post(self.prefix + path, params, headers=headers, status=status)

    def states(self):
        with self.d.engine.connect() as connection:
            return dict(connection.execute(select(Job.id, Job.state)).all())


@pytest.fixture
def dashboard(durable):  # noqa: F811 (the fixture imported above)
    """``make(**settings)``: a :class:`Dashboard` on a durable app."""

    def make(roles=ROLES, events=None, **settings):
        return Dashboard(durable(setup=dashboard_setup(roles, events), **settings))

    return make


def text(response):
    """The page's text, tags dropped and spaces squeezed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", response.text)).split())


# -- access ---------------------------------------------------------------------------


def test_pages_need_the_view_permission_and_actions_the_manage_permission(
    dashboard, caplog
):
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "f", "state": "failed", "created_at": ago(9), "queue": board.d.queue},
        {"id": "q", "state": "queued", "created_at": ago(5), "queue": board.d.queue},
    )
    pages = ["/", "/jobs", "/jobs/f", "/jobs/q"]
    for path in pages:
        board.get(path, role=None, status=403)
        board.get(path, role="viewer")
    # A viewer sees no action, and no box to check.
    assert board.get("/jobs/f").forms == {}
    assert "Retry" not in board.get("/jobs/f").text
    assert [f.id for f in board.get("/jobs").forms.values()] == [None]  # filters
    caplog.set_level(logging.INFO, AUDIT)
    unsafe = ["/jobs/f/retry", "/jobs/q/cancel", "/jobs/f/delete"]
    unsafe += ["/actions/retry", "/actions/cancel", "/actions/delete"]
    unsafe += [f"/queues/{board.d.queue}/clear", "/periodic/ping/run"]
    unsafe += ["/failures/0123456789ab/retry", "/failures/0123456789ab/delete"]
    for path in unsafe:
        ids = {"id": ["f", "q"]}
        board.post(path, role=None, status=403, **ids)
        board.post(path, role="viewer", status=403, **ids)
        # A manager without the token, or with a wrong one.
        board.post(path, token=False, status=400, **ids)
        board.app.post(
            PREFIX + path,
            {"csrf_token": "wrong", **ids},
            headers={"X-Role": "manager"},
            status=400,
        )
        if "/periodic/" in path or "/failures/" in path:
            continue  # no GET
        if "/queues/" in path:  # its confirmation: for managers only
            board.get(path, role="viewer", status=403)
        else:
            board.app.get(PREFIX + path, headers={"X-Role": "manager"}, status=404)
    assert board.states() == {"f": "failed", "q": "queued"}
    assert [r for r in caplog.records if r.name == AUDIT] == []
    # A manager sees the actions that apply to each job, with the token.
    forms = board.get("/jobs/f", role="manager").forms
    assert [f.action for f in forms.values()] == [
        f"{PREFIX}/jobs/f/retry",
        f"{PREFIX}/jobs/f/delete",
    ]
    assert forms[0]["csrf_token"].value == board.token()
    forms = board.get("/jobs/q", role="manager").forms
    assert [f.action for f in forms.values()] == [f"{PREFIX}/jobs/q/cancel"]


def test_an_action_is_one_audit_line_and_one_event(dashboard, caplog):
    events = []
    board = dashboard(events=events)
    add_jobs(
        board.d.engine,
        {"id": "f", "state": "failed", "created_at": ago(9)}
        | {"queue": board.d.queue, "name": "echo", "args": [1]},
        {"id": "q", "state": "queued", "created_at": ago(5)}
        | {"queue": board.d.queue, "name": "echo", "args": [1]},
    )
    caplog.set_level(logging.INFO, AUDIT)
    page = (
        board.get("/jobs/q", role="manager")
        .forms[0]
        .submit(headers={"X-Role": "manager"}, status=303)
    )
    assert page.location.endswith(f"{PREFIX}/jobs/q?done=cancel")
    assert "Cancelled." in text(page.follow(headers={"X-Role": "viewer"}))
    response = board.post("/jobs/f/retry")
    assert response.location.endswith(f"{PREFIX}/jobs/f?done=retry")
    assert board.states() == {"f": "queued", "q": "cancelled"}
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager: cancel of job(s) q: queued -> cancelled",
        "manager: retry of job(s) f: failed -> queued",
    ]
    assert [(e.userid, e.action, e.job_ids) for e in events] == [
        ("manager", "cancel", ["q"]),
        ("manager", "retry", ["f"]),
    ]
    assert events[1].results == [
        {"id": "f", "state_before": "failed", "state": "queued"}
    ]
    assert events[1].request.path == f"{PREFIX}/jobs/f/retry"
    # A cancelled job is retried; a queued one is not: the page again with
    # the reason, nothing changed.
    board.post("/jobs/q/retry")
    assert board.states()["q"] == "queued"
    caplog.clear()
    refused = board.post("/jobs/q/retry", status=409)
    assert "job q is queued: only a failed, cancelled or dead job is retried" in text(
        refused
    )
    board.post("/jobs/nope/cancel", status=404)
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager refused: retry of job(s) q: job q is queued: only a failed, "
        "cancelled or dead job is retried",
        "manager refused: cancel of job(s) nope: no job has the id 'nope'",
    ]
    assert len(events) == 3
    assert board.states() == {"f": "queued", "q": "queued"}


# -- the pages ------------------------------------------------------------------------


def rows_of(page):
    """The job ids of a list page, in order."""
    return re.findall(r"<code>([^<]+)</code></div>", page.text)


def test_the_list_filters_combine_and_pages_newest_first(dashboard):
    board = dashboard()
    ours = board.d.queue
    other = f"{ours}_other"
    rows = [
        {"id": f"j{i:03}", "state": ("failed", "succeeded")[i % 2]}
        | {"created_at": ago(1000 - i), "queue": (ours, other)[i % 3 == 0]}
        | {"name": ("app.mail", "app.report")[i % 5 == 0], "title": f"Order #{i}"}
        for i in range(120)
    ]
    add_jobs(board.d.engine, *rows)
    newest_first = [r["id"] for r in reversed(rows)]
    # Unfiltered, keyset-paged by 50: every job once, newest first.
    seen = []
    page = board.get("/jobs")
    while True:
        seen += rows_of(page)
        older = [
            link for link in page.html.find_all("a") if link.get("rel") == ["next"]
        ]
        if not older:
            break
        page = board.app.get(older[0]["href"], headers={"X-Role": "viewer"})
        assert "« newest" in page.text
    assert seen == newest_first
    # Each filter, then all of them together; the form shows them.
    expected = {
        "state": lambda r: r["state"] == "failed",
        "queue": lambda r: r["queue"] == other,
        "name": lambda r: r["name"] == "app.report",
        "title": lambda r: "#1" in r["title"],
    }
    values = {"state": "failed", "queue": other, "name": "app.report", "title": "#1"}
    for key, keep in expected.items():
        page = board.get("/jobs", **{key: values[key]})
        assert rows_of(page) == [r["id"] for r in reversed(rows) if keep(r)][:50]
    page = board.get("/jobs", **{**values, "title": " ORDER #1 "})
    assert rows_of(page) == [
        r["id"] for r in reversed(rows) if all(k(r) for k in expected.values())
    ]
    form = page.forms[0]
    assert (form["state"].value, form["queue"].value) == ("failed", other)
    assert (form["name"].value, form["title"].value) == ("app.report", "ORDER #1")
    # Empty filters are no filters.
    assert rows_of(board.get("/jobs", state="", name=" ")) == newest_first[:50]


def test_a_bad_filter_is_400_naming_it(dashboard):
    board = dashboard()
    page = board.get("/jobs", status=400, state="lost")
    assert "unknown state 'lost': expected one of pending, queued" in text(page)
    page = board.get("/jobs", status=400, queue="nowhere")
    assert "unknown queue 'nowhere': not configured and no job has it" in text(page)
    page = board.get("/jobs", status=400, before="nope")
    assert "bad before 'nope': no job has that id" in text(page)


def test_the_list_reads_neither_arguments_nor_tracebacks(dashboard):
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "f", "state": "failed", "created_at": ago(5), "args": ["s3cret-arg"]}
        | {"traceback": "Traceback: the-trace", "error": "ValueError: boom"},
    )
    statements = Statements(board.d.engine)
    mark = statements.mark()
    page = board.get("/jobs")
    assert rows_of(page) == ["f"]
    assert "ValueError: boom" in page.text
    assert "s3cret-arg" not in page.text and "the-trace" not in page.text
    sql = [s for _pid, s in statements.since(mark)[0]]
    reads = [s for s in sql if "ORDER BY anon_1.created_at DESC" in s]
    assert len(reads) == 1
    # One branch per state, each LIMIT-ed, none reading args or tracebacks.
    assert reads[0].count("pyramid_tasks_job.state =") == 9
    assert reads[0].count("LIMIT") == 10
    assert "args" not in reads[0] and "traceback" not in reads[0]


def test_the_job_page_shows_every_field_with_secrets_redacted(dashboard):
    board = dashboard()
    add_jobs(
        board.d.engine,
        {"id": "parent-1", "state": "succeeded", "created_at": ago(120)},
        {
            "id": "job-1",
            "name": "app.tasks.charge",
            "title": "Charge <b>order</b> 7",
            "queue": board.d.queue,
            "priority": 3,
            "state": "failed",
            "attempts": 2,
            "args": [7, {"api_key": "AK-123", "amount": 5}],
            "kwargs": {"password": "hunter2", "note": "keep", "nested": [{"Token": 1}]},
            "options": {"countdown": 5},
            "created_at": ago(100),
            "published_at": ago(99),
            "eta": ago(-3600),
            "publish_after": ago(-600),
            "started_at": ago(90),
            "finished_at": ago(80),
            "worker": "celery@host-1",
            "error": "ValueError: card declined",
            "traceback": 'Traceback (most recent call last):\n  File "x.py"\nE',
            "parent_id": "parent-1",
            "unique_key": "charge-7",
        },
    )
    page = board.get("/jobs/job-1")
    shown = text(page)
    assert "<b>order</b>" not in page.text  # escaped
    assert "Charge &lt;b&gt;order&lt;/b&gt; 7" in page.text
    for value in (
        "app.tasks.charge",
        board.d.queue,
        "celery@host-1",
        "ValueError: card declined",
        "charge-7",
        '"amount": 5',
        '"note": "keep"',
        '"countdown": 5',
    ):
        assert value in shown, value
    assert "Traceback (most recent call last):\n  File &#34;x.py&#34;\nE" in page.text
    for secret in ("AK-123", "hunter2"):
        assert secret not in page.text
    assert '"api_key": "***"' in shown and '"password": "***"' in shown
    assert '"Token": "***"' in shown
    labels = re.findall(r'<span class="label">([^<]+)</span>', page.text)
    assert labels == ["created", "due", "published", "started", "finished"]
    assert "1 min ago" in shown and "2 min" not in shown
    # Its eta; "publish after" (in 10 min) is shown for a pending job only.
    assert "in 59 min" in shown and "in 9 min" not in shown
    assert f'<a href="{PREFIX}/jobs/parent-1">' in page.text
    parent = board.get("/jobs/parent-1")
    assert "succeeded" in text(parent)
    assert "<progress" not in page.text  # it never reported any
    add_jobs(
        board.d.engine,
        {"id": "run-1", "state": "started", "created_at": ago(5), "progress": 40}
        | {"progress_message": "charging the card"},
    )
    running = board.get("/jobs/run-1")
    assert '<progress max="100" value="40">' in running.text
    assert "40 % charging the card" in text(running)
    missing = board.get("/jobs/nope", status=404)
    assert "no job has the id 'nope'" in text(missing)


def test_the_overview_counts_per_queue_capped(dashboard, monkeypatch, pg_schema):
    board = dashboard()
    ours = board.d.queue
    rows = [
        {"id": f"p{i}", "state": "pending", "created_at": ago(400 + i)}
        for i in range(3)
    ]
    rows += [{"id": "q1", "state": "queued", "created_at": ago(30)}]
    rows += [{"id": "r1", "state": "started", "created_at": ago(20)}]
    rows += [
        {"id": f"s{i}", "state": "scheduled", "created_at": ago(9)} for i in range(2)
    ]
    rows += [{"id": "rt", "state": "retrying", "created_at": ago(9)}]
    rows += [{"id": "f1", "state": "failed", "created_at": ago(9)}]
    rows += [{"id": "ok", "state": "succeeded", "created_at": ago(9)}]
    add_jobs(board.d.engine, *[{**r, "queue": ours} for r in rows])
    add_jobs(
        board.d.engine,
        {"id": "d1", "state": "dead", "created_at": ago(1), "queue": "b"},
    )
    found = overview(board.service)
    ages = [row.pop("oldest_waiting_age") for row in found]
    assert found == [
        {"queue": "b", "waiting": 0, "running": 0, "scheduled": 0}
        | {"failed": 0, "dead": 1, "about": {}},
        {"queue": ours, "waiting": 4, "running": 1, "scheduled": 3}
        | {"failed": 1, "dead": 0, "about": {}},
    ]
    assert ages[0] is None and 402 <= ages[1] < 460
    # Capped: one more than the cap means "above it", and PostgreSQL's
    # planner tells about how many (its statistics up to date here).
    with board.d.engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'ANALYZE "{pg_schema}".pyramid_tasks_job'))
    capped = overview(board.service, cap=2)
    assert [(r["waiting"], r["scheduled"]) for r in capped] == [(0, 0), (3, 3)]
    about = capped[1]["about"]
    assert set(about) == {"waiting", "scheduled"}
    assert all(1 <= n <= 12 for n in about.values()), about
    monkeypatch.setattr(views, "CAP", 2)
    cells = [td.get_text(" ", strip=True) for td in board.get("/").html.find_all("td")]
    assert cells[8:11] == [
        _count(4, about["waiting"], 2),
        "1",
        _count(3, about["scheduled"], 2),
    ]
    monkeypatch.undo()
    page = board.get("/")
    queues = page.text.split("</table>")[0]  # the first table: the queues
    cells = [
        " ".join(re.sub(r"<[^>]+>", " ", cell).split())
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", queues, re.S)
    ]
    expected = ["b", "0", "0", "0", "0", "1", ""]
    expected += [ours, "4", "1", "3", "1", "0", "6 min"]
    assert cells == expected
    assert f'href="{PREFIX}/jobs?queue={ours}&amp;state=started"' in page.text
    home = board.app.get(PREFIX, headers={"X-Role": "viewer"}, status=303)
    assert home.location.endswith(f"{PREFIX}/")


def test_counts_above_the_cap_and_short_ages():
    assert (_count(1000), _count(1001)) == ("1000", "1000+")
    assert _count(1001, about=1_234_567) == "about 1,234,567"
    assert _count(1001, about=900) == "1000+"  # stale statistics
    assert _count(3, about=None, cap=2) == "2+"
    assert [short_age(s) for s in (None, -3, 59.9, 60, 7199, 86400 * 3)] == [
        "",
        "0 s",
        "59 s",
        "1 min",
        "1 h",
        "3 d",
    ]


def test_redacted_keeps_the_shape():
    pattern = parse_dashboard_settings({}).redact
    assert pattern.pattern == DEFAULT_REDACT
    value = {"a": [{"secret_x": 1, "b": {"PASSWD": [1]}}], "k": "v", "key": None}
    assert redacted(value, pattern) == {
        "a": [{"secret_x": "***", "b": {"PASSWD": "***"}}],
        "k": "v",
        "key": "***",
    }
    assert redacted([1, "x"], pattern) == [1, "x"]


def test_checked_jobs_are_retried_or_cancelled_together(dashboard, caplog):
    events = []
    board = dashboard(events=events)
    ours = board.d.queue
    add_jobs(
        board.d.engine,
        *[
            {"id": f"f{i}", "state": "failed", "created_at": ago(50 - i)}
            | {"queue": ours, "name": "echo", "args": [i]}
            for i in range(3)
        ],
        {"id": "done", "state": "succeeded", "created_at": ago(60), "queue": ours},
    )
    caplog.set_level(logging.INFO, AUDIT)
    page = board.get("/jobs", role="manager", state="failed", queue=ours)
    form = page.forms["checked"]
    assert form.action == f"{PREFIX}/actions/retry?state=failed&queue={ours}"
    boxes = form.fields["id"]
    assert [box._value for box in boxes] == ["f2", "f1", "f0"]
    boxes[0].checked = boxes[2].checked = True
    done = form.submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(
        f"{PREFIX}/jobs?state=failed&queue={ours}&done=retry&count=2"
    )
    shown = done.follow(headers={"X-Role": "viewer"})
    assert "2 jobs sent again." in text(shown)
    assert rows_of(shown) == ["f1"]  # still failed: the filter is kept
    assert board.states() == {"f0": "queued", "f1": "failed", "f2": "queued"} | {
        "done": "succeeded"
    }
    # Cancel: the finished one is left as it is, and not counted.
    page = board.get("/jobs", role="manager")
    cancel = page.html.find("button", string="Cancel checked")
    assert cancel["formaction"] == f"{PREFIX}/actions/cancel?"
    done = board.post("/actions/cancel?", id=["done", "f0"])
    assert done.location.endswith(f"{PREFIX}/jobs?done=cancel&count=1")
    assert "1 job cancelled." in text(done.follow(headers={"X-Role": "viewer"}))
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager: retry of job(s) f2, f0: failed -> queued, failed -> queued",
        "manager: cancel of job(s) done, f0: succeeded -> succeeded, "
        "queued -> cancelled",
    ]
    assert [(e.action, e.job_ids) for e in events] == [
        ("retry", ["f2", "f0"]),
        ("cancel", ["done", "f0"]),
    ]
    # Refused: none checked, too many, or one the action does not take.
    caplog.clear()
    page = board.post("/actions/retry", status=400)
    assert "No job is checked: check the jobs to act on." in text(page)
    many = [f"j{i}" for i in range(201)]
    page = board.post("/actions/cancel", status=400, id=many)
    assert "201 jobs are checked: at most 200 at once." in text(page)
    page = board.post("/actions/retry?state=failed", status=409, id=["f1", "done"])
    assert (
        "job done is succeeded: only a failed, cancelled or dead job is retried"
        in text(page)
    )
    assert page.forms[0]["state"].value == "failed"
    assert rows_of(page) == ["f1"]
    assert board.states() == {"f0": "cancelled", "f1": "failed", "f2": "queued"} | {
        "done": "succeeded"
    }
    assert len(events) == 2
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager refused: retry of job(s) f1, done: job done is succeeded: only "
        "a failed, cancelled or dead job is retried"
    ]
    # A later page stays that page.
    done = board.post("/actions/retry?before=f2", id=["f1"])
    assert done.location.endswith(f"{PREFIX}/jobs?done=retry&count=1&before=f2")
    # A notice needs a known action and a count.
    for query in ({"done": "purge", "count": "1"}, {"done": "retry", "count": "x"}):
        assert "sent again" not in text(board.get("/jobs", **query))


def test_clearing_a_queue_asks_first_then_cancels_and_purges(
    dashboard, redis_client, caplog
):
    events = []
    board = dashboard(events=events)
    d = board.d
    with d.tm:
        sent = [d.echo.apply_async((i,), tm=d.tm).id for i in range(3)]
    assert set(d.states().values()) == {"queued"}
    assert redis_client.llen(d.queue) == 3
    add_jobs(
        d.engine,
        {"id": "later", "state": "scheduled", "created_at": ago(5), "queue": d.queue},
    )
    overview_page = board.get("/", role="manager")
    link = overview_page.html.find("a", string="clear…")
    assert link["href"] == f"{PREFIX}/queues/{d.queue}/clear"
    assert board.get("/").html.find("a", string="clear…") is None  # a viewer
    ask = board.get(f"/queues/{d.queue}/clear", role="manager")
    assert "Its 3 waiting jobs (pending or queued) will be cancelled" in text(ask)
    caplog.set_level(logging.INFO, AUDIT)
    done = ask.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(
        f"{PREFIX}/?done=clear&queue={d.queue}&count=3&purge=kept"
    )
    assert (
        f"Queue {d.queue} cleared: 3 waiting jobs cancelled, its messages kept: "
        "scheduled jobs wait in it (the workers drop the cancelled ones)."
        in text(done.follow(headers={"X-Role": "viewer"}))
    )
    assert board.states() == dict.fromkeys(sent, "cancelled") | {"later": "scheduled"}
    # The scheduled job's message would be in the queue: nothing purged.
    assert redis_client.llen(d.queue) == 3
    # With nothing scheduled left, a second clear purges the cancelled ones'.
    with d.engine.begin() as connection:
        connection.execute(
            sqlalchemy.update(Job.__table__)
            .where(Job.id == "later")
            .values(state="cancelled")
        )
    ask = board.get(f"/queues/{d.queue}/clear", role="manager")
    done = ask.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(
        f"{PREFIX}/?done=clear&queue={d.queue}&count=0&purge=done"
    )
    assert (
        f"Queue {d.queue} cleared: 0 waiting jobs cancelled, its messages purged."
        in text(done.follow(headers={"X-Role": "viewer"}))
    )
    assert redis_client.llen(d.queue) == 0
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        f"manager: clear of queue {d.queue}: 3 job(s) cancelled, none (1 scheduled "
        "job(s) wait in it) message(s) purged",
        f"manager: clear of queue {d.queue}: 0 job(s) cancelled, 3 message(s) purged",
    ]
    assert [(e.action, e.job_ids, e.queues) for e in events] == [
        ("clear", [], [d.queue])
    ] * 2
    assert [e.results for e in events] == [
        {
            "queues": {d.queue: 3},
            "purged": {d.queue: None},
            "scheduled": {d.queue: 1},
        },
        {"queues": {d.queue: 0}, "purged": {d.queue: 3}, "scheduled": {d.queue: 0}},
    ]
    # An unknown queue.
    for method in (board.get, board.post):
        page = method("/queues/nowhere/clear", role="manager", status=404)
        assert "unknown queue 'nowhere': not configured and no job has it" in text(page)
    assert len(events) == 2


def test_a_queue_cleared_while_the_broker_is_stopped(
    dashboard,
    own_redis,  # noqa: F811 (the fixture imported above)
    caplog,
):
    board = dashboard(broker_url=own_redis.url)
    add_jobs(
        board.d.engine,
        {"id": "w", "state": "queued", "created_at": ago(5), "queue": board.d.queue},
    )
    own_redis.stop()
    caplog.set_level(logging.INFO, AUDIT)
    board.post(f"/queues/{board.d.queue}/clear")
    assert board.states() == {"w": "cancelled"}
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        f"manager: clear of queue {board.d.queue}: 1 job(s) cancelled, unknown "
        "(the broker did not answer) message(s) purged"
    ]


def test_the_workers_page_shows_each_worker_and_what_it_runs(
    dashboard, start_worker, ini_vars, redis_client
):
    worker = start_worker("-c", "1", section="jobs_probe")
    board = dashboard(**{"celery.task_default_queue": ini_vars["queue"]})
    probe = Probe(worker.celery_app, redis_client)
    key = probe.key()
    [job_id] = probe.commit("watched", (key,))
    wait_for(lambda: redis_client.llen(f"{key}:ready"), message="the job to run")
    page = board.get("/workers")
    # Other tests' workers may share the broker: ours is the row of its name.
    (row,) = [
        tr for tr in page.html.find("tbody").find_all("tr") if worker.node in tr.text
    ]
    cells = [td.get_text(" ", strip=True) for td in row.find_all("td")]
    assert cells[:3] == [worker.node, "prefork", "1"]
    assert cells[3].isdigit() and cells[4].endswith(" s")
    assert cells[5] == f"tests.jobs_probe_app.watched {job_id}"
    assert row.find("a")["href"] == f"{PREFIX}/jobs/{job_id}"
    redis_client.rpush(f"{key}:go", "go")
    probe.wait_state(job_id, "succeeded")


def test_a_worker_that_tells_little(dashboard):
    from pyramid_tasks.dashboard.workers import _worker

    assert _worker("w@h", [{"id": "j"}, "junk"], {}) == {
        "name": "w@h",
        "pool": None,
        "concurrency": None,
        "pid": None,
        "uptime": None,
        "active": [{"id": "j", "name": None}],
    }


BEAT = {
    "tasks.beat.ping.task": "echo",
    "tasks.beat.ping.schedule": "30s",
    "tasks.beat.ping.args": "[7]",
    "tasks.beat.nightly.task": "plain",
    "tasks.beat.nightly.schedule": "0 3 * * *",
    "tasks.beat.nightly.args": '["night"]',
}


def test_periodic_tasks_with_their_last_and_next_runs_and_run_now(dashboard, caplog):
    events = []
    board = dashboard(events=events, **BEAT)
    page = board.get("/periodic")
    rows = [
        [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        for tr in page.html.find("tbody").find_all("tr")
    ]
    # A cron entry's next time is known; an interval's counts from beat's start.
    assert rows[0][:3] == ["nightly plain", "cron 0 3 * * *", "never"]
    assert re.fullmatch(r"in (\d+ (h|min|s))", rows[0][3]), rows[0][3]
    assert rows[1] == [
        "ping echo",
        "every 30.00 seconds",
        "never",
        "30.00 seconds after beat starts",
    ]
    assert page.forms == {}  # a viewer runs nothing
    assert "No periodic task" in text(dashboard().get("/periodic"))
    add_jobs(
        board.d.engine,
        {"id": "n-1", "name": "plain", "state": "succeeded", "created_at": ago(60)},
    )
    caplog.set_level(logging.INFO, AUDIT)
    page = board.get("/periodic", role="manager")
    done = page.forms[1].submit(headers={"X-Role": "manager"}, status=303)
    job_id = done.location.split("/jobs/")[1].split("?")[0]
    assert done.location.endswith(f"{PREFIX}/jobs/{job_id}?done=run")
    shown = text(done.follow(headers={"X-Role": "viewer"}))
    assert "Sent: the periodic task runs now." in shown and "[ 7 ]" in shown
    assert board.states() == {"n-1": "succeeded", job_id: "queued"}
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        f"manager: run now of periodic task ping: job {job_id}"
    ]
    assert [(e.action, e.job_ids, e.results) for e in events] == [
        ("run", [job_id], [{"id": job_id, "periodic": "ping"}])
    ]
    rows = [
        [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        for tr in board.get("/periodic").html.find("tbody").find_all("tr")
    ]
    assert rows[0][2] == "succeeded 1 min ago" and rows[0][3].startswith("in ")
    assert rows[1][2] == "queued 0 s ago"
    assert re.fullmatch(r"in (29|30) s", rows[1][3]), rows[1][3]
    page = board.post("/periodic/nope/run", status=404)
    assert "no periodic task is named 'nope'" in text(page)
    assert len(events) == 1


def test_schedules_in_words():
    from celery.schedules import crontab, schedule

    from pyramid_tasks.dashboard.periodic import describe

    assert describe(crontab(minute="*/5", hour="9-17")) == "cron */5 9-17 * * *"
    assert describe(schedule(90)) == "every 1.50 minutes"


def test_deleting_finished_jobs_one_or_checked(dashboard, caplog):
    events = []
    board = dashboard(events=events)
    add_jobs(
        board.d.engine,
        {"id": "ok", "state": "succeeded", "created_at": ago(9)},
        {"id": "f", "state": "failed", "created_at": ago(8)},
        {"id": "d", "state": "dead", "created_at": ago(7)},
        {"id": "run", "state": "started", "created_at": ago(6)},
    )
    caplog.set_level(logging.INFO, AUDIT)
    page = board.get("/jobs/ok", role="manager")
    assert [f.action for f in page.forms.values()] == [f"{PREFIX}/jobs/ok/delete"]
    done = page.forms[0].submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(f"{PREFIX}/jobs?done=delete&count=1")
    assert "1 job deleted." in text(done.follow(headers={"X-Role": "viewer"}))
    # An unfinished job is not deleted, alone or among the checked ones.
    refused = board.post("/jobs/run/delete", status=409)
    assert "job run is started: only a finished job is deleted (cancel it first)" in (
        text(refused)
    )
    board.post("/actions/delete", status=409, id=["f", "run"])
    assert board.states() == {"f": "failed", "d": "dead", "run": "started"}
    done = board.post("/actions/delete", id=["f", "d"])
    assert done.location.endswith(f"{PREFIX}/jobs?done=delete&count=2")
    assert board.states() == {"run": "started"}
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager: delete of job(s) ok: succeeded -> deleted",
        "manager refused: delete of job(s) run: job run is started: only a "
        "finished job is deleted (cancel it first)",
        "manager refused: delete of job(s) f, run: job run is started: only a "
        "finished job is deleted (cancel it first)",
        "manager: delete of job(s) f, d: failed -> deleted, dead -> deleted",
    ]
    assert [(e.action, e.job_ids) for e in events] == [
        ("delete", ["ok"]),
        ("delete", ["f", "d"]),
    ]


def test_a_job_retried_while_it_is_deleted_is_left(dashboard):
    """The DELETE names the finished states: a job another operator retried
    between the check and the DELETE stays, and the answer says so."""
    board = dashboard()
    engine = board.d.engine
    add_jobs(
        engine,
        {"id": "a", "state": "failed", "created_at": ago(9)},
        {"id": "b", "state": "failed", "created_at": ago(8)},
    )

    done = []

    def retried_meanwhile(conn, cursor, statement, parameters, context, many):
        if statement.lstrip().startswith("DELETE") and not done:
            done.append(statement)
            with engine.begin() as other:
                other.execute(
                    Job.__table__.update().where(Job.id == "b").values(state="pending")
                )

    sqlalchemy.event.listen(engine, "before_cursor_execute", retried_meanwhile)
    deleted = board.service.delete(["a", "b"])
    sqlalchemy.event.remove(engine, "before_cursor_execute", retried_meanwhile)
    assert deleted == [
        {"id": "a", "state_before": "failed", "state": None},
        {"id": "b", "state_before": "failed", "state": "pending"},
    ]
    assert board.states() == {"b": "pending"}


def test_read_only_hides_and_refuses_the_actions(dashboard, caplog):
    board = dashboard(**{"tasks.dashboard.read_only": "true"})
    add_jobs(board.d.engine, {"id": "f", "state": "failed", "created_at": ago(5)})
    page = board.get("/jobs/f", role="manager")
    assert page.forms == {} and "read-only" in text(page)
    caplog.set_level(logging.INFO, AUDIT)
    refused = board.post("/jobs/f/retry", status=403)
    assert (
        refused.text == "The jobs dashboard is read-only (tasks.dashboard.read_only)."
    )
    board.post("/actions/cancel", status=403, id="f")
    board.post("/queues/q/clear", status=403)
    board.post("/periodic/ping/run", status=403)
    board.post("/failures/0123456789ab/retry", status=403)
    board.get("/queues/q/clear", role="manager", status=403)
    assert "Cancel checked" not in board.get("/jobs", role="manager").text
    assert "clear…" not in board.get("/", role="manager").text
    assert board.states() == {"f": "failed"}
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager refused: retry of job(s) f (read-only)",
        "manager refused: cancel of job(s) f (read-only)",
        "manager refused: clear of queue q (read-only)",
        "manager refused: run now of periodic task ping (read-only)",
        "manager refused: retry of failure group 0123456789ab (read-only)",
    ]


def test_the_prefix_and_the_permission_names_come_from_the_settings(dashboard):
    roles = {"viewer": {"see"}, "manager": {"see", "act"}}
    board = dashboard(
        roles=roles,
        **{
            "tasks.dashboard.prefix": "/ops/jobs/",
            "tasks.jobs.view_permission": "see",
            "tasks.jobs.manage_permission": "act",
            "tasks.dashboard.redact": "^note$",
        },
    )
    board.prefix = "/ops/jobs"
    add_jobs(
        board.d.engine,
        {"id": "f", "state": "failed", "created_at": ago(5)}
        | {"kwargs": {"note": "hidden", "password": "shown"}},
    )
    page = board.get("/jobs/f", role="manager")
    assert '"note": "***"' in text(page) and '"password": "shown"' in text(page)
    assert [f.action for f in page.forms.values()] == [
        "/ops/jobs/jobs/f/retry",
        "/ops/jobs/jobs/f/delete",
    ]
    assert 'href="/ops/jobs/static/dashboard.css"' in page.text
    assert "color" in board.app.get("/ops/jobs/static/dashboard.css").text
    board.app.get("/_tasks/", headers={"X-Role": "manager"}, status=404)


# -- configuration ------------------------------------------------------------


def configure(settings=None, jobs=True, policy=True, dashboard=True):
    config = Configurator(
        settings={"celery.broker_url": "memory://", **(settings or {})}
    )
    config.registry["dbsession_factory"] = SESSION_FACTORY
    config.include("pyramid_tasks.jobs" if jobs else "pyramid_tasks")
    if dashboard:
        config.include("pyramid_tasks.dashboard")
    if policy:
        config.set_security_policy(RolePolicy(ROLES))
    config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
    config.commit()
    return config


def configuration_error(**kwargs):
    with pytest.raises(ConfigurationError) as info:
        configure(**kwargs)
    return str(getattr(info.value, "evalue", info.value))


def test_the_dashboard_needs_the_job_table_and_a_security_policy():
    assert configuration_error(jobs=False) == (
        "pyramid_tasks.dashboard needs the job table: add "
        "config.include('pyramid_tasks.jobs') (before or after it)."
    )
    assert configuration_error(policy=False).startswith(
        "pyramid_tasks.dashboard needs a security policy: without one Pyramid "
        "grants every permission"
    )


def test_dashboard_settings_without_the_dashboard_are_an_error():
    assert configuration_error(
        settings={"tasks.dashboard.read_only": "true"}, dashboard=False
    ) == (
        "Setting tasks.dashboard.read_only is set, but the app does not include "
        "pyramid_tasks.dashboard: add config.include('pyramid_tasks.dashboard') "
        "(or remove the setting)."
    )
    # The permission names are the API's and the dashboard's.
    assert configuration_error(
        settings={"tasks.jobs.view_permission": "see"}, dashboard=False
    ) == (
        "Setting tasks.jobs.view_permission is set, but the app does not include "
        "pyramid_tasks.jobs.api or pyramid_tasks.dashboard: add "
        "config.include('pyramid_tasks.jobs.api') (or remove the setting)."
    )
    routes = configure({"tasks.jobs.view_permission": "see"}).get_routes_mapper()
    assert f"{PREFIX}/jobs/{{id}}" in {r.pattern for r in routes.get_routes()}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "prefix",
            "ops",
            "Invalid setting tasks.dashboard.prefix = 'ops': expected a URL path",
        ),
        ("read_only", "ture", "Invalid setting tasks.dashboard.read_only = 'ture'"),
        (
            "redact",
            "pass(",
            "Invalid setting tasks.dashboard.redact = 'pass(': expected a regular "
            "expression (missing ), unterminated subpattern at position 4).",
        ),
        (
            "readonly",
            "true",
            "Unknown setting tasks.dashboard.readonly: did you mean "
            "tasks.dashboard.read_only?",
        ),
    ],
)
def test_bad_dashboard_settings_name_the_key(key, value, expected):
    with pytest.raises(ConfigurationError) as info:
        parse_dashboard_settings({f"tasks.dashboard.{key}": value})
    assert str(info.value).startswith(expected)


def test_dashboard_settings_parsed():
    parsed = parse_dashboard_settings(
        {"tasks.dashboard.prefix": "/", "tasks.dashboard.read_only": "yes"}
    )
    assert (parsed.prefix, parsed.read_only) == ("", True)
    assert (parsed.view_permission, parsed.manage_permission) == (
        "tasks.view",
        "tasks.manage",
    )


def test_at_the_root_of_the_site():
    routes = configure({"tasks.dashboard.prefix": "/"}).get_routes_mapper()
    patterns = {r.pattern for r in routes.get_routes()}
    assert {
        "/",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/{action:retry|cancel|delete}",
    } <= patterns


# -- the demo ---------------------------------------------------------------------


def test_the_demo_links_to_its_dashboard_on_sqlite_for_local_requests(
    tmp_path, monkeypatch
):
    from demo_app import main

    app = main(
        {},
        **{
            "sqlalchemy.url": f"sqlite:///{tmp_path}/demo.sqlite",
            "pyramid.includes": "\npyramid_tasks.jobs\npyramid_tasks.dashboard",
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
        },
    )
    local = webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    local.post("/orders", {"email": "ann@example.com"}, status=302)
    assert app.registry.pyramid_tasks_jobs.flush(10)  # its "queued" mark landed
    home = local.get("/")
    assert home.html.find("a", string="Jobs dashboard")["href"] == (
        "http://localhost/_tasks/"
    )
    # SQLite has no estimate for a count above the cap.
    monkeypatch.setattr(views, "CAP", 0)
    cells = [td.get_text(strip=True) for td in local.get("/_tasks/").html("td")]
    assert cells[:2] == ["celery", "0+"]
    monkeypatch.undo()
    jobs = local.get("/_tasks/jobs", {"name": "demo_app.tasks.confirm_order"})
    (link,) = [a for a in jobs.html.find_all("a") if "/_tasks/jobs/" in a["href"]]
    job = local.get(link["href"])
    assert "queued" in text(job) and "[ 1 ]" in text(job)  # the order's id
    done = job.forms[0].submit(status=303).follow()
    assert "Cancelled." in text(done) and "cancelled" in text(done)
    # Only from this machine.
    remote = webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "192.0.2.7"})
    remote.get("/_tasks/", status=403)
    remote.post(link["href"] + "/retry", status=403)
    assert "cancelled" in text(local.get(link["href"]))


# -- failures grouped -----------------------------------------------------------


UUIDS = ("5f1c2d3e-0000-4000-8000-00000000000a", "0b3e9f00-1111-4111-8111-11111111111b")


def test_a_signature_sets_numbers_and_ids_aside():
    assert signature("t", f"ValueError: card 1234 of {UUIDS[0]} at 2.5s") == (
        "t",
        "ValueError",
        "card <n> of <id> at <n>s",
    )
    assert signature("t", "KeyError: object 5f1c2d3e9a declined\nTraceback") == (
        "t",
        "KeyError",
        "object <id> declined",
    )
    assert signature("t", "something went wrong: 3 times") == (
        "t",
        "",
        "something went wrong: <n> times",
    )
    assert signature("t", "TimeoutError") == ("t", "TimeoutError", "")
    assert signature("t", None) == ("t", "", "")


def failed_rows(queue_name):
    """Failed jobs of three signatures (and one never failed)."""
    rows = [
        {"id": f"c{i}", "name": "echo", "args": [i], "created_at": ago(100 - i)}
        | {"error": f"ValueError: card {1000 + i} of {UUIDS[i % 2]} declined"}
        | {"finished_at": ago(90 - i)}
        for i in range(3)
    ]
    rows += [
        {"id": "k1", "name": "echo", "args": [9], "created_at": ago(50)}
        | {"error": "KeyError: 'sku'", "finished_at": ago(40)},
        {"id": "p1", "name": "plain", "args": [1], "created_at": ago(30)}
        | {"error": "ValueError: card 7 of x declined", "finished_at": None},
    ]
    rows = [{**row, "state": "failed", "queue": queue_name} for row in rows]
    rows.append({"id": "ok", "state": "succeeded", "created_at": ago(5)})
    return rows


def test_failures_grouped_then_retried_or_deleted_by_group(
    dashboard, caplog, monkeypatch
):
    events = []
    board = dashboard(events=events)
    add_jobs(board.d.engine, *failed_rows(board.d.queue))
    page = board.get("/failures")
    rows = [
        [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        for tr in page.html.find("tbody").find_all("tr")
    ]
    assert [row[:2] for row in rows] == [
        ["echo ValueError : card <n> of <id> declined", "3"],
        ["plain ValueError : card <n> of x declined", "1"],  # the newest of 1s
        ["echo KeyError : 'sku'", "1"],
    ]
    assert rows[0][2:] == ["1 min ago", "1 min ago"]
    assert "older ones exist" not in text(page)
    # Grouped over the newest SCAN only: the page says so.
    monkeypatch.setattr(failures, "SCAN", 2)
    assert "over the newest 2 failed jobs (older ones exist)" in text(
        board.get("/failures")
    )
    groups, complete = failures.failure_groups(board.service)
    assert ([g["count"] for g in groups], complete) == ([1, 1], False)
    monkeypatch.undo()
    groups, complete = failures.failure_groups(board.service, scan=5)
    assert ([g["count"] for g in groups], complete) == ([3, 1, 1], True)
    board.service.max_limit = 2  # the same, read two rows a query
    assert failures.failure_groups(board.service, scan=5) == (groups, True)
    big, plain_group, key_group = groups
    caplog.set_level(logging.INFO, AUDIT)
    forms = board.get("/failures", role="manager").forms
    assert [f.action for f in forms.values()][:2] == [
        f"{PREFIX}/failures/{big['key']}/retry",
        f"{PREFIX}/failures/{big['key']}/delete",
    ]
    done = forms[0].submit(headers={"X-Role": "manager"}, status=303)
    assert done.location.endswith(f"{PREFIX}/failures?done=retry&count=3")
    assert "3 jobs sent again." in text(done.follow(headers={"X-Role": "viewer"}))
    board.post(f"/failures/{key_group['key']}/delete")
    states = board.states()
    assert {k: states.get(k) for k in ("c0", "c1", "c2", "k1", "p1", "ok")} == {
        "c0": "queued",
        "c1": "queued",
        "c2": "queued",
        "k1": None,
        "p1": "failed",
        "ok": "succeeded",
    }
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager: retry of job(s) c2, c1, c0: failed -> queued, failed -> queued, "
        "failed -> queued",
        "manager: delete of job(s) k1: failed -> deleted",
    ]
    assert [(e.action, e.job_ids) for e in events] == [
        ("retry", ["c2", "c1", "c0"]),
        ("delete", ["k1"]),
    ]
    # A group gone meanwhile, one too big, one changed under the action.
    page = board.post(f"/failures/{big['key']}/retry", status=404)
    assert f"No failure group {big['key']}: its jobs were retried or deleted." in (
        text(page)
    )
    # A group larger than the request takes: a bulk job of its own does it.
    monkeypatch.setattr(actions, "MAX_GROUP", 0)
    sent = board.post(f"/failures/{plain_group['key']}/delete", status=303)
    monkeypatch.undo()
    bulk_id = sent.location.rsplit("/", 1)[1].split("?")[0]
    assert sent.location.endswith(f"/jobs/{bulk_id}?done=bulk")
    bulk = board.service.get(bulk_id)
    assert (bulk["name"], bulk["args"], bulk["kwargs"], bulk["title"]) == (
        "pyramid_tasks.jobs.bulk",
        ["delete", {}],
        {"ids": plain_group["ids"]},
        f"Delete failure group {plain_group['key']}",
    )
    assert caplog.records[-1].getMessage() == (
        f"manager: delete of failure group {plain_group['key']} (1 job(s)): "
        f"bulk job {bulk_id}"
    )
    assert (events[-1].action, events[-1].job_ids) == ("bulk", [bulk_id])
    board.service.cancel([bulk_id])
    engine = board.d.engine
    moved = []

    def started_meanwhile(conn, cursor, statement, parameters, context, many):
        # The action's own read of the group's rows, after the grouping.
        if "pyramid_tasks_job.id IN (" in statement and not moved:
            moved.append(statement)
            with engine.begin() as other:
                other.execute(
                    Job.__table__.update().where(Job.id == "p1").values(state="started")
                )

    sqlalchemy.event.listen(engine, "before_cursor_execute", started_meanwhile)
    page = board.post(f"/failures/{plain_group['key']}/retry", status=409)
    sqlalchemy.event.remove(engine, "before_cursor_execute", started_meanwhile)
    assert "job p1 is started: only a failed, cancelled or dead job is retried" in (
        text(page)
    )
    assert len(events) == 3  # the refused retry made none
