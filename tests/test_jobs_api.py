"""The JSON API (``config.include('pyramid_tasks.jobs.api')``) and its metrics.

Through WebTest on a durable app (real PostgreSQL in a schema of the test's
own, real Redis on a queue of the test's own), with a security policy that
takes the caller's role from a header: anonymous, ``viewer`` (tasks.view)
or ``manager`` (tasks.view and tasks.manage).  The CSRF token lives in a
cookie (Pyramid's ``CookieCSRFStoragePolicy``), read from ``/csrf``.  One
test runs a real worker for ``test`` and ``retry``.
"""

import json
import logging
import sys
from datetime import timedelta

import pytest
import sqlalchemy
import webtest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy, get_csrf_token
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from pyramid.security import Allowed, Denied
from pyramid.session import SignedCookieSessionFactory
from sqlalchemy import insert, select
from sqlalchemy.orm import sessionmaker

from pyramid_tasks.jobs import Job, metadata
from pyramid_tasks.jobs.metrics import JobMetrics
from pyramid_tasks.jobs.model import utcnow
from pyramid_tasks.jobs.service import TEST_TASK, JobService
from pyramid_tasks.jobs.store import JobStore
from pyramid_tasks.settings import JobsSettings, parse_jobs_settings

from .conftest import free_port, wait_for
from .test_jobs_web import durable, queue  # noqa: F401 (fixtures)

PREFIX = "/_tasks/api"
API_LOGGER = "pyramid_tasks.jobs.api"
ROLES = {"viewer": {"tasks.view"}, "manager": {"tasks.view", "tasks.manage"}}


class RolePolicy:
    """A security policy for the tests: the role the ``X-Role`` header names."""

    def __init__(self, roles):
        self.roles = roles

    def identity(self, request):
        return request.headers.get("X-Role")

    def authenticated_userid(self, request):
        return self.identity(request)

    def permits(self, request, context, permission):
        if permission in self.roles.get(self.identity(request), ()):
            return Allowed(f"{self.identity(request)} has {permission}")
        return Denied(f"no {permission}")


def csrf_token(request):
    return Response(get_csrf_token(request))


def api_setup(roles=ROLES):
    def setup(config):
        config.set_security_policy(RolePolicy(roles))
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        config.add_route("csrf", "/csrf")
        config.add_view(csrf_token, route_name="csrf")
        config.include("pyramid_tasks.jobs.api")

    return setup


class Client:
    """WebTest on a durable app: ``get`` as a viewer and ``post`` as a
    manager (with the CSRF token) unless told otherwise; the JSON answer."""

    def __init__(self, durable_app, prefix=PREFIX):
        self.d = durable_app
        self.prefix = prefix
        self.app = webtest.TestApp(durable_app.config.make_wsgi_app())
        self.token = self.app.get("/csrf").text
        self.service = JobService.from_registry(durable_app.registry)

    def get(self, path, params=None, role="viewer", status=200, headers=None):
        """The JSON answer (the response itself for ``/metrics``)."""
        headers = {**({"X-Role": role} if role else {}), **(headers or {})}
        response = self.app.get(
            self.prefix + path, params or {}, headers=headers, status=status
        )
        assert response.headers["Cache-Control"] == "no-store"
        if response.content_type == "application/json":
            return response.json
        return response

    def post(self, path, body=None, role="manager", status=200, token=True, raw=None):
        headers = {"X-Role": role} if role else {}
        if token:
            headers["X-CSRF-Token"] = self.token
        if raw is not None:
            headers["Content-Type"] = "application/json"
            response = self.app.post(
                self.prefix + path, raw, headers=headers, status=status
            )
        elif body is None:
            response = self.app.post(self.prefix + path, headers=headers, status=status)
        else:
            response = self.app.post_json(
                self.prefix + path, body, headers=headers, status=status
            )
        assert response.content_type == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        return response.json

    def states(self):
        with self.d.engine.connect() as connection:
            return dict(connection.execute(select(Job.id, Job.state)).all())


@pytest.fixture
def api(durable):  # noqa: F811 (the fixture imported above)
    """``make(**settings)``: a :class:`Client` on a durable app with the API."""

    def make(roles=ROLES, **settings):
        return Client(durable(setup=api_setup(roles), **settings))

    return make


def add_jobs(engine, *rows):
    """Insert job rows: ``id``, ``state`` and ``created_at`` given, the rest
    defaulted (name ``t``, the queue ``q``, the columns' defaults, None)."""
    defaults = {"name": "t", "queue": "q", "args": [], "kwargs": {}, "options": {}}
    for column in Job.__table__.columns:
        if column.name not in defaults:
            defaults[column.name] = column.default.arg if column.default else None
    # One INSERT for all: every row with every column.
    with engine.begin() as connection:
        connection.execute(insert(Job.__table__), [{**defaults, **r} for r in rows])


def ago(seconds):
    return utcnow() - timedelta(seconds=seconds)


# -- permissions and CSRF -------------------------------------------------------


def test_reads_need_the_view_permission_and_actions_the_manage_permission(api):
    client = api()
    our_queue = client.d.queue
    add_jobs(
        client.d.engine,
        {"id": "j", "name": "echo", "state": "failed", "created_at": ago(5)}
        | {"queue": our_queue, "args": ["x"]},
    )
    reads = ["/jobs", "/jobs/j", "/depth", "/metrics"]
    actions = [
        ("/cancel", {"ids": ["j"]}),
        ("/retry", {"ids": ["j"]}),
        ("/clear", {"queues": [our_queue]}),
        ("/test", None),
    ]
    forbidden = {
        "error": "forbidden: this needs a permission you do not have",
        "parameter": None,
    }
    for path in reads:
        assert client.get(path, role=None, status=403) == forbidden
        client.get(path, role="viewer", status=200)
    for path, body in actions:
        assert client.post(path, body, role=None, status=403) == forbidden
        assert client.post(path, body, role="viewer", status=403) == forbidden
    # Nothing was done.
    assert client.states() == {"j": "failed"}
    # The manager may: the retried job's message is purged by clear.
    assert client.post("/retry", {"ids": ["j"]})["jobs"][0]["state"] == "queued"
    assert client.post("/cancel", {"ids": ["j"]})["jobs"][0]["state"] == "cancelled"
    assert client.post("/clear", {"queues": [our_queue]}) == {
        "queues": {our_queue: 0},
        "purged": {our_queue: 1},
        "scheduled": {our_queue: 0},
    }
    assert client.post("/test")["id"] in client.states()


def test_actions_without_the_csrf_token_are_refused_and_change_nothing(api):
    client = api()
    add_jobs(client.d.engine, {"id": "j", "state": "queued", "created_at": ago(5)})
    refused = {
        "error": "missing or wrong CSRF token: send the session's token in the "
        "X-CSRF-Token header",
        "parameter": "X-CSRF-Token",
    }
    assert client.post("/cancel", {"ids": ["j"]}, token=False, status=400) == refused
    client.token = "not-the-token"
    assert client.post("/cancel", {"ids": ["j"]}, status=400) == refused
    assert client.states() == {"j": "queued"}
    # A read needs none.
    assert client.get("/jobs/j")["state"] == "queued"


def test_permission_names_and_the_prefix_come_from_the_settings(api):
    roles = {"viewer": {"jobs.read"}, "manager": {"jobs.read", "jobs.write"}}
    client = api(
        roles,
        **{
            "tasks.jobs.api_prefix": "/ops/jobs/",
            "tasks.jobs.view_permission": "jobs.read",
            "tasks.jobs.manage_permission": "jobs.write",
        },
    )
    client.prefix = "/ops/jobs"
    add_jobs(client.d.engine, {"id": "j", "state": "queued", "created_at": ago(5)})
    assert [job["id"] for job in client.get("/jobs")["jobs"]] == ["j"]
    client.post("/cancel", {"ids": ["j"]}, role="viewer", status=403)
    assert client.post("/cancel", {"ids": ["j"]})["jobs"][0]["cancelled"] is True
    client.app.get(f"{PREFIX}/jobs", headers={"X-Role": "viewer"}, status=404)


# -- reading ---------------------------------------------------------------------


def test_show_gives_the_services_json_and_404_for_an_unknown_id(api):
    client = api()
    add_jobs(
        client.d.engine,
        {"id": "j", "state": "failed", "created_at": ago(5), "title": "Report"},
    )
    shown = client.get("/jobs/j")
    assert shown == client.service.get("j")
    assert (shown["id"], shown["state"], shown["title"]) == ("j", "failed", "Report")
    assert client.get("/jobs/nope", status=404) == {
        "error": "no job has the id 'nope'",
        "parameter": "id",
    }


def test_keyset_paging_returns_each_job_once_newest_first(api):
    client = api()
    base = ago(1000)
    rows = [
        # Three jobs a timestamp: the id breaks the tie.
        {"id": f"j{i:02d}", "state": "queued", "created_at": base + timedelta(i // 3)}
        for i in range(25)
    ]
    add_jobs(client.d.engine, *rows)
    newest_first = [
        r["id"]
        for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    ]
    for limit in (1, 5, 7, 25, 30):
        seen, before, pages = [], None, 0
        while True:
            params = {"limit": limit, **({"before": before} if before else {})}
            page = client.get("/jobs", params)
            pages += 1
            seen += [job["id"] for job in page["jobs"]]
            before = page["before"]
            if before is None:
                break
            assert before == page["jobs"][-1]["id"]
        assert seen == newest_first, limit
        assert pages == max(1, -(-25 // limit)), limit  # no empty last page


def test_list_filters(api):
    client = api()
    add_jobs(
        client.d.engine,
        {"id": "a", "state": "failed", "created_at": ago(4), "title": "Nightly REPORT"},
        {"id": "b", "state": "dead", "created_at": ago(3), "name": "other"},
        {"id": "c", "state": "queued", "created_at": ago(2), "queue": "r"},
        {"id": "d", "state": "succeeded", "created_at": ago(1), "title": "report 2"},
    )

    def ids(**params):
        page = client.get("/jobs", params)
        assert page["before"] is None
        return [job["id"] for job in page["jobs"]]

    assert ids() == ["d", "c", "b", "a"]
    assert ids(state=["failed", "dead"]) == ["b", "a"]
    assert ids(queue="r") == ["c"]
    assert ids(queue=["q", "r"], name="t") == ["d", "c", "a"]
    assert ids(title="report") == ["d", "a"]
    assert ids(state="succeeded", title="nightly") == []


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "parameter", "error"),
    [
        ("/jobs", {"state": "bogus"}, "state", "unknown state 'bogus': expected "),
        ("/jobs", {"queue": "nowhere"}, "queue", "unknown queue 'nowhere': not "),
        ("/jobs", {"name": ""}, "name", "bad name '': not a name"),
        ("/jobs", {"limit": "ten"}, "limit", "bad limit 'ten': not a whole number"),
        ("/jobs", {"limit": "0"}, "limit", "bad limit 0: expected 1 to 1000"),
        ("/jobs", {"limit": "1001"}, "limit", "bad limit 1001: expected 1 to 1000"),
        ("/jobs", {"before": "nope"}, "before", "bad before 'nope': no job has "),
        ("/jobs", {"sate": "failed"}, "sate", "unknown parameter 'sate' (expected"),
        ("/jobs", [("title", "a"), ("title", "b")], "title", "parameter 'title' is "),
        ("/jobs/j", {"x": "1"}, "x", "unknown parameter 'x' (expected: none)"),
        ("/depth", {"include_scheduled": "maybe"}, "include_scheduled", "include_"),
        ("/metrics", {"x": "1"}, "x", "unknown parameter 'x' (expected: none)"),
    ],
)
def test_a_bad_query_parameter_is_400_naming_it(api, path, params, parameter, error):
    client = api()
    add_jobs(client.d.engine, {"id": "j", "state": "queued", "created_at": ago(5)})
    answer = client.get(path, params, status=400)
    assert answer["parameter"] == parameter
    assert answer["error"].startswith(error), answer["error"]
    assert set(answer) == {"error", "parameter"}


def test_a_bad_body_is_400_naming_the_parameter_and_changes_nothing(api):
    client = api()
    our_queue = client.d.queue
    add_jobs(
        client.d.engine,
        {"id": "q1", "state": "queued", "created_at": ago(5), "queue": our_queue},
        {"id": "ok", "state": "succeeded", "created_at": ago(5)},
    )
    cases = [
        ("/cancel", "not json", "body", "the request body is not JSON: "),
        ("/cancel", "[1]", "body", "the request body must be a JSON object"),
        ("/cancel", b"\xff\xfe", "body", "the request body is not JSON: "),
        ("/cancel", {}, "ids", "'ids' must be a non-empty list of strings, got None"),
        ("/cancel", {"ids": []}, "ids", "'ids' must be a non-empty list of strings"),
        ("/cancel", {"ids": "q1"}, "ids", "'ids' must be a non-empty list of "),
        ("/cancel", {"ids": [1]}, "ids", "'ids' must be a non-empty list of "),
        ("/cancel", {"ids": ["q1"], "id": "x"}, "id", "unknown parameter 'id' "),
        ("/retry", {"ids": ["ok"]}, "ids", "job ok is succeeded: only a failed, "),
        ("/retry", {"ids": ["q1"]}, "ids", "job q1 is queued: only a failed, "),
        ("/clear", {"queues": ["nowhere"]}, "queues", "unknown queue 'nowhere'"),
        ("/clear", {"queues": "q"}, "queues", "'queues' must be a non-empty list"),
        # Only an absent "queues" clears every queue, never a null.
        ("/clear", {"queues": None}, "queues", "'queues' must be a non-empty list"),
        ("/test", {"queue": 5}, "queue", "'queue' must be a queue name, got 5"),
        ("/test", {"queue": ""}, "queue", "'queue' must be a queue name, got ''"),
        ("/test", {"queue": "nowhere"}, "queue", "unknown queue 'nowhere': not "),
    ]
    for path, body, parameter, error in cases:
        if isinstance(body, str | bytes):
            answer = client.post(path, raw=body, status=400)
        else:
            answer = client.post(path, body, status=400)
        assert answer["parameter"] == parameter, (path, body, answer)
        assert answer["error"].startswith(error), (path, body, answer)
    # A query string on an action.
    answer = client.app.post_json(
        f"{PREFIX}/cancel?force=1",
        {"ids": ["q1"]},
        headers={"X-Role": "manager", "X-CSRF-Token": client.token},
        status=400,
    ).json
    assert answer == {
        "error": "unknown parameter 'force' (expected: none)",
        "parameter": "force",
    }
    # An unknown id among known ones: 404, nothing cancelled.
    assert client.post("/cancel", {"ids": ["q1", "nope"]}, status=404) == {
        "error": "no job has the id 'nope'",
        "parameter": "ids",
    }
    assert client.states() == {"q1": "queued", "ok": "succeeded"}


def test_an_error_never_shows_a_password(api):
    client = api()
    secret = "postgresql://app:hunter2@db.example.com/app"
    answer = client.post("/cancel", {"ids": [secret]}, status=404)
    assert "hunter2" not in json.dumps(answer)
    assert answer["error"] == (
        "no job has the id 'postgresql://app:***@db.example.com/app'"
    )


def test_a_wrong_method_is_405_with_allow(api):
    client = api()
    response = client.app.get(
        f"{PREFIX}/cancel", headers={"X-Role": "manager"}, status=405
    )
    assert response.headers["Allow"] == "POST"
    assert response.json == {
        "error": "method GET is not allowed here: use POST",
        "parameter": None,
    }
    response = client.app.post(
        f"{PREFIX}/jobs",
        headers={"X-Role": "manager", "X-CSRF-Token": client.token},
        status=405,
    )
    assert response.headers["Allow"] == "GET"


# -- actions ----------------------------------------------------------------------


def test_test_cancel_clear_and_depth_at_the_broker(api, redis_client):
    """No worker: the test jobs wait at the broker (Redis) as the CLI leaves
    them; cancel revokes one, clear cancels the rest and purges the queue."""
    client = api()
    our_queue = client.d.queue
    first = client.post("/test")["id"]
    second = client.post("/test", {"queue": our_queue})["id"]
    third = client.post("/test", {"queue": None})["id"]
    assert client.d.states() == {first: "queued", second: "queued", third: "queued"}
    assert client.get(f"/jobs/{first}")["name"] == TEST_TASK
    assert redis_client.llen(our_queue) == 3

    [depth] = client.get("/depth", {"include_scheduled": "true"})["queues"]
    assert depth["oldest_waiting_age"] > 0
    assert {**depth, "oldest_waiting_age": None} == {
        "queue": our_queue,
        "waiting": 3,
        "broker": 3,
        "oldest_waiting_age": None,
        "scheduled": 0,
    }
    assert "scheduled" not in client.get("/depth")["queues"][0]

    assert client.post("/cancel", {"ids": [first]}) == {
        "jobs": [
            {
                "id": first,
                "state_before": "queued",
                "state": "cancelled",
                "cancelled": True,
            }
        ]
    }
    assert client.post("/cancel", {"ids": [first]})["jobs"] == [
        {
            "id": first,
            "state_before": "cancelled",
            "state": "cancelled",
            "cancelled": False,
        }
    ]
    # The cancelled job's message stays at the broker until purged.
    assert client.post("/clear") == {
        "queues": {our_queue: 2},
        "purged": {our_queue: 3},
        "scheduled": {our_queue: 0},
    }
    assert redis_client.llen(our_queue) == 0
    assert client.d.states() == dict.fromkeys((first, second, third), "cancelled")
    assert client.get("/depth")["queues"] == [
        {"queue": our_queue, "waiting": 0, "broker": 0, "oldest_waiting_age": None}
    ]


def test_test_and_retry_run_on_a_real_worker(api, start_worker, ini_vars):
    """``test`` sends the package's test job, which a worker runs; ``retry``
    sends a dead job (the relay gave up on it) again, which runs too."""
    worker = start_worker(section="jobs_probe")
    client = api(**{"celery.task_default_queue": ini_vars["queue"]})

    def state(job_id):
        return client.get(f"/jobs/{job_id}")["state"]

    job_id = client.post("/test")["id"]
    wait_for(lambda: state(job_id) == "succeeded", message="the test job to run")
    assert f"Test job {job_id} ran" in worker.log

    add_jobs(
        client.d.engine,
        {
            "id": "dead-1",
            "name": TEST_TASK,
            "queue": ini_vars["queue"],
            "state": "dead",
            "created_at": ago(60),
            "publish_attempts": 10,
            "finished_at": ago(30),
        },
    )
    assert client.post("/retry", {"ids": ["dead-1"]}) == {
        "jobs": [{"id": "dead-1", "state_before": "dead", "state": "queued"}]
    }
    wait_for(lambda: state("dead-1") == "succeeded", message="the retried job")
    shown = client.get("/jobs/dead-1")
    assert (shown["attempts"], shown["publish_attempts"]) == (1, 0)
    assert client.post("/retry", {"ids": ["dead-1"]}, status=400)["parameter"] == "ids"


# -- metrics ----------------------------------------------------------------------

# A table whose metrics are known: (id, queue, name, state, created, run time).
METRICS_ROWS = [
    ("p-new", "a", "t1", "pending", 2, None),  # within relay_grace (10 s)
    ("p-old", "a", "t1", "pending", 300, None),  # the relay's backlog
    ("q-1", "a", "t1", "queued", 100, None),
    ("q-2", "b", "t2", "queued", 50, None),
    ("s-1", "b", "t2", "scheduled", 900, None),  # not waiting: due later
    ("r-1", "b", "t2", "started", 20, None),
    ("ok-1", "a", "t1", "succeeded", 600, 0.05),
    ("ok-2", "a", "t1", "succeeded", 500, 0.7),
    ("ok-3", "b", "t1", "succeeded", 400, 45.0),
    ("ko-1", "a", "t2", "failed", 300, 2.0),
    ("no-1", "a", "t2", "cancelled", 200, None),
    ("no-2", "a", "t3", "cancelled", 100, None),  # t3: no run, no histogram
    ("old-1", "a", "t1", "succeeded", 7200, 1.0),  # outside the hour
    ("old-2", "c", "t1", "failed", 4000, 1.0),  # outside the hour
]


def fill_metrics_table(engine):
    now = utcnow()
    rows = []
    for job_id, queue_name, name, state, age, run in METRICS_ROWS:
        created = now - timedelta(seconds=age)
        row = {"id": job_id, "queue": queue_name, "name": name, "state": state}
        row["created_at"] = created
        if run is not None:
            row["started_at"] = created + timedelta(seconds=1)
            row["finished_at"] = row["started_at"] + timedelta(seconds=run)
        rows.append(row)
    add_jobs(engine, *rows)
    return now


def samples(families):
    """``{(sample name, sorted labels): value}``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def check_metrics(found, filled_at, scraped_at):
    """The metrics of :data:`METRICS_ROWS`, exactly (ages to the scrape's
    time, which lies between ``filled_at`` and ``scraped_at``)."""
    jobs = {
        labels: value
        for (name, labels), value in found.items()
        if name == "pyramid_tasks_jobs"
    }
    expected_unfinished = {("a", "pending"): 2, ("a", "queued"): 1}
    expected_unfinished.update({("b", "queued"): 1, ("b", "scheduled"): 1})
    expected_unfinished[("b", "started")] = 1
    assert jobs == {
        (("queue", q), ("state", state)): expected_unfinished.get((q, state), 0)
        for q in ("a", "b")
        for state in ("pending", "queued", "scheduled", "started", "retrying")
    }
    assert found[("pyramid_tasks_relay_backlog_jobs", ())] == 1
    slack = (scraped_at - filled_at).total_seconds()
    ages = {
        dict(labels)["queue"]: value
        for (name, labels), value in found.items()
        if name == "pyramid_tasks_jobs_oldest_waiting_age_seconds"
    }
    assert set(ages) == {"a", "b"}
    assert 300 <= ages["a"] <= 300 + slack  # p-old
    assert 50 <= ages["b"] <= 50 + slack  # q-2 (s-1 is not waiting)
    finished = {
        tuple(v for _k, v in labels): value
        for (name, labels), value in found.items()
        if name == "pyramid_tasks_jobs_finished"
    }
    assert finished == {
        ("t1", "a", "succeeded"): 2,
        ("t1", "b", "succeeded"): 1,
        ("t2", "a", "failed"): 1,
        ("t2", "a", "cancelled"): 1,
        ("t3", "a", "cancelled"): 1,
    }
    buckets = {
        (dict(labels)["name"], dict(labels)["le"]): value
        for (name, labels), value in found.items()
        if name == "pyramid_tasks_job_duration_seconds_bucket"
    }
    bounds = ["0.1", "0.5", "1.0", "5.0", "10.0", "30.0", "60.0", "300.0"]
    bounds += ["900.0", "3600.0", "+Inf"]
    t1 = [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]  # 0.05, 0.7, 45
    t2 = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]  # 2.0 (the cancelled job has none)
    assert buckets == {
        **{("t1", b): n for b, n in zip(bounds, t1, strict=True)},
        **{("t2", b): n for b, n in zip(bounds, t2, strict=True)},
    }
    sums = {
        dict(labels)["name"]: value
        for (name, labels), value in found.items()
        if name == "pyramid_tasks_job_duration_seconds_gsum"
    }
    # SQLite computes them from julian days: to the millisecond.
    assert sums == {
        "t1": pytest.approx(45.75, abs=1e-3),
        "t2": pytest.approx(2.0, abs=1e-3),
    }


def test_metrics_scraped_through_the_api_have_the_tables_values(api):
    client = api()
    filled_at = fill_metrics_table(client.d.engine)
    response = client.get("/metrics")
    scraped_at = utcnow()
    assert response.content_type == "text/plain"
    assert response.headers["Cache-Control"] == "no-store"
    check_metrics(
        samples(text_string_to_metric_families(response.text)), filled_at, scraped_at
    )
    # OpenMetrics when the scraper asks for it.
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.content_type == "application/openmetrics-text"
    found = samples(openmetrics_families(response.text))
    check_metrics(found, filled_at, utcnow())


def test_metrics_of_an_empty_table(api):
    client = api()
    found = samples(text_string_to_metric_families(client.get("/metrics").text))
    assert found == {("pyramid_tasks_relay_backlog_jobs", ()): 0.0}


def test_metrics_on_sqlite(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    metadata.create_all(engine)
    store = JobStore(engine, JobsSettings())
    filled_at = fill_metrics_table(engine)
    found = samples(JobMetrics(store, JobsSettings()).collect())
    # prometheus_client's own names: the gauge histogram's sum is ``_gsum``.
    check_metrics(found, filled_at, utcnow())
    engine.dispose()


def test_metrics_read_only_unfinished_rows_and_the_window(api, pg_schema):
    """The two queries, as PostgreSQL plans them: each a range of the
    ``(state, created_at)`` index (sequential scans turned off, as a large
    table makes the planner choose)."""
    client = api()
    metrics = JobMetrics(client.d.jobs.store, client.d.jobs.settings)
    now = utcnow()
    with client.d.engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'SET search_path TO "{pg_schema}"'))
        connection.execute(sqlalchemy.text("SET enable_seqscan = off"))
        for query in (metrics._unfinished(now), metrics._finished(now)):
            sql = query.compile(client.d.engine, compile_kwargs={"literal_binds": True})
            plan = connection.exec_driver_sql(f"EXPLAIN {sql}").scalars()
            assert "ix_pyramid_tasks_job_state_created" in "\n".join(plan)


def test_without_prometheus_client_there_is_no_metrics_endpoint(
    api, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # ImportError
    with caplog.at_level(logging.INFO, logger=API_LOGGER):
        client = api()
    assert [r.getMessage() for r in caplog.records if r.name == API_LOGGER] == [
        "/_tasks/api/metrics is not served: prometheus_client is not installed "
        "(pip install 'pyramid_tasks[metrics]')."
    ]
    client.app.get(f"{PREFIX}/metrics", headers={"X-Role": "viewer"}, status=404)
    assert client.get("/depth")["queues"] == [
        {"queue": client.d.queue, "waiting": 0, "broker": 0, "oldest_waiting_age": None}
    ]


# -- configuration ------------------------------------------------------------------

SESSION_FACTORY = sessionmaker(bind=sqlalchemy.create_engine("sqlite://"))


def configure(
    settings=None, jobs=True, policy=True, csrf=True, api=True, session=False
):
    config = Configurator(
        settings={"celery.broker_url": "memory://", **(settings or {})}
    )
    config.registry["dbsession_factory"] = SESSION_FACTORY
    config.include("pyramid_tasks.jobs" if jobs else "pyramid_tasks")
    if api:
        config.include("pyramid_tasks.jobs.api")
    if policy:
        config.set_security_policy(RolePolicy(ROLES))
    if csrf:
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
    if session:
        config.set_session_factory(SignedCookieSessionFactory("s3cret"))
    config.commit()
    return config


def configuration_error(**kwargs):
    with pytest.raises(ConfigurationError) as info:
        configure(**kwargs)
    # A deferred action's error comes wrapped: its own message.
    return str(getattr(info.value, "evalue", info.value))


def test_the_api_needs_the_job_table():
    assert configuration_error(jobs=False) == (
        "pyramid_tasks.jobs.api needs the job table: add "
        "config.include('pyramid_tasks.jobs') (before or after it)."
    )


def test_the_api_needs_a_security_policy():
    assert configuration_error(policy=False) == (
        "pyramid_tasks.jobs.api needs a security policy: without one Pyramid "
        "grants every permission, so anyone could cancel jobs. Set one with "
        "config.set_security_policy(...)."
    )


def test_a_csrf_token_in_the_session_needs_a_session_factory():
    message = configuration_error(csrf=False)
    assert message.startswith(
        "pyramid_tasks.jobs.api checks a CSRF token kept in the session, but the "
        "app has no session factory"
    )
    # The default, the token kept in the session, once there is a session.
    routes = configure(csrf=False, session=True).get_routes_mapper().get_routes()
    paths = ["/jobs", "/jobs/{id}", "/cancel", "/retry", "/run-now", "/clear", "/test"]
    paths += ["/depth", "/metrics"]
    assert {route.pattern for route in routes} == {PREFIX + path for path in paths}


@pytest.mark.parametrize(
    "key", ["api_prefix", "view_permission", "manage_permission", "metrics_window"]
)
def test_api_settings_without_the_api_are_an_error(key):
    value = {"api_prefix": "/x", "metrics_window": "1h"}.get(key, "p")
    # The permission names are the dashboard's too.
    also = " or pyramid_tasks.dashboard" if key.endswith("_permission") else ""
    assert configuration_error(settings={f"tasks.jobs.{key}": value}, api=False) == (
        f"Setting tasks.jobs.{key} is set, but the app does not include "
        f"pyramid_tasks.jobs.api{also}: add config.include('pyramid_tasks.jobs.api') "
        "(or remove the setting)."
    )


def test_without_durable_mode_an_api_setting_names_pyramid_tasks_jobs():
    assert configuration_error(
        settings={"tasks.jobs.api_prefix": "/x"}, jobs=False, api=False
    ).startswith(
        "Setting tasks.jobs.api_prefix is set, but the app does not include "
        "pyramid_tasks.jobs:"
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, ("/_tasks/api", "tasks.view", "tasks.manage", 3600.0)),
        (
            {
                "api_prefix": " /ops/tasks/ ",
                "view_permission": "view",
                "manage_permission": " edit ",
                "metrics_window": "15m",
            },
            ("/ops/tasks", "view", "edit", 900.0),
        ),
        ({"api_prefix": "/"}, ("", "tasks.view", "tasks.manage", 3600.0)),
    ],
)
def test_api_settings_parsed(settings, expected):
    parsed = parse_jobs_settings({f"tasks.jobs.{k}": v for k, v in settings.items()})
    assert (
        parsed.api_prefix,
        parsed.view_permission,
        parsed.manage_permission,
        parsed.metrics_window,
    ) == expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("api_prefix", "_tasks/api", "a URL path such as /_tasks/api"),
        ("api_prefix", "/a b", "a URL path such as /_tasks/api"),
        ("api_prefix", "/{id}", "a URL path such as /_tasks/api"),
        ("view_permission", "", "a permission name such as tasks.view"),
        ("manage_permission", "tasks manage", "a permission name such as tasks.view"),
        ("metrics_window", "0", "a duration such as 0.2, 200ms, 10s, 5m, 2h or 7d, "),
    ],
)
def test_bad_api_settings_name_the_key(key, value, expected):
    with pytest.raises(ConfigurationError) as info:
        parse_jobs_settings({f"tasks.jobs.{key}": value})
    assert str(info.value).startswith(
        f"Invalid setting tasks.jobs.{key} = {value!r}: expected {expected}"
    )


def test_included_from_the_ini_with_its_settings():
    """``pyramid.includes``, as the INI of docs/api.rst: the settings are
    read at the include, before the app's own configuration."""
    config = Configurator(
        settings={
            "celery.broker_url": "memory://",
            "pyramid.includes": "\npyramid_tasks.jobs\npyramid_tasks.jobs.api",
            "tasks.jobs.api_prefix": "/ops/tasks",
        }
    )
    config.registry["dbsession_factory"] = SESSION_FACTORY
    config.set_security_policy(RolePolicy(ROLES))
    config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
    config.commit()
    routes = config.get_routes_mapper().get_routes()
    assert "/ops/tasks/jobs/{id}" in {route.pattern for route in routes}


# -- the database fails ---------------------------------------------------------


def api_errors(caplog):
    records = caplog.records
    return [r for r in records if r.name == API_LOGGER and r.levelname == "ERROR"]


def test_a_database_down_is_a_503_json_answer_without_the_password(
    api, monkeypatch, caplog
):
    client = api()
    password = "s3cret-never-shown"
    down = sqlalchemy.create_engine(
        f"postgresql+psycopg://ann:{password}@127.0.0.1:{free_port()}/test"
    )
    monkeypatch.setattr(client.d.jobs.store, "engine", down)
    caplog.set_level(logging.ERROR, API_LOGGER)
    answer = client.get("/jobs", status=503)
    assert list(answer) == ["error", "parameter"]
    assert answer["parameter"] is None
    assert answer["error"].startswith("OperationalError: connection failed")
    assert "\n" not in answer["error"] and "SELECT" not in answer["error"]
    body = client.app.post(
        PREFIX + "/test",
        headers={"X-Role": "manager", "X-CSRF-Token": client.token},
        status=503,
    ).text
    assert password not in body and json.loads(body)["error"] == answer["error"]
    [first, second] = api_errors(caplog)
    assert first.getMessage().startswith(
        f"GET {PREFIX}/jobs: the job table did not answer: {answer['error']}\n"
        "Traceback (most recent call last):"
    )
    assert second.getMessage().startswith(f"POST {PREFIX}/test: ")
    assert password not in caplog.text
    down.dispose()


def test_a_missing_job_table_is_a_503_json_answer_naming_it(api, caplog):
    client = api()
    metadata.drop_all(client.d.engine)  # the schema as a fresh one: no table
    caplog.set_level(logging.ERROR, API_LOGGER)
    for path in ("/jobs", "/jobs/j", "/depth"):
        answer = client.get(path, status=503)
        assert answer["error"].startswith(
            "The job table pyramid_tasks_job does not exist in postgresql"
        )
        assert answer["error"].endswith(
            "create it with `tasks-celery CONFIG jobs init-db` or your "
            "migrations (docs/jobs.rst)."
        )
    assert len(api_errors(caplog)) == 3
    assert "JobTableMissing" in api_errors(caplog)[0].getMessage()
