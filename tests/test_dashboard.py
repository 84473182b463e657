"""The jobs dashboard (``config.include('pyramid_tasks.dashboard')``) through WebTest.

A durable app (real PostgreSQL in a schema of the test's own, real Redis on a
queue of the test's own) with the JSON API's test security policy: the role
comes from the ``X-Role`` header (anonymous, ``viewer``, ``manager``); the
CSRF token lives in a cookie and the forms carry it.
"""

import logging
import re

import pytest
import webtest
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from sqlalchemy import select

from pyramid_tasks.dashboard import (
    DEFAULT_REDACT,
    JobsActedOn,
    parse_dashboard_settings,
)
from pyramid_tasks.dashboard.counts import overview
from pyramid_tasks.dashboard.views import ago as short_age
from pyramid_tasks.dashboard.views import redacted
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import JobService

from .test_jobs_api import ROLES, SESSION_FACTORY, RolePolicy, add_jobs, ago
from .test_jobs_web import Statements, durable, queue  # noqa: F401 (fixtures)

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
        """The CSRF token of a manager's pages (its cookie set)."""
        self.app.get(self.prefix + "/", headers={"X-Role": "manager"})
        return self.app.cookies["csrf_token"]

    def post(self, path, role="manager", token=True, status=303):
        headers = {"X-Role": role} if role else {}
        params = {"csrf_token": self.token()} if token else {}
        return self.app.post(
            self.prefix + path, params, headers=headers, status=status
        )

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
    return " ".join(re.sub(r"<[^>]+>", " ", response.text).split())


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
    # A viewer sees no action.
    assert board.get("/jobs/f").forms == {}
    assert "Retry" not in board.get("/jobs/f").text
    caplog.set_level(logging.INFO, AUDIT)
    for path in ("/jobs/f/retry", "/jobs/q/cancel"):
        board.post(path, role=None, status=403)
        board.post(path, role="viewer", status=403)
        # A manager without the token, or with a wrong one.
        board.post(path, token=False, status=400)
        board.app.post(
            PREFIX + path,
            {"csrf_token": "wrong"},
            headers={"X-Role": "manager"},
            status=400,
        )
        board.app.get(PREFIX + path, headers={"X-Role": "manager"}, status=404)
    assert board.states() == {"f": "failed", "q": "queued"}
    assert [r for r in caplog.records if r.name == AUDIT] == []
    # A manager sees the actions that apply to each job, with the token.
    forms = board.get("/jobs/f", role="manager").forms
    assert [f.action for f in forms.values()] == [f"{PREFIX}/jobs/f/retry"]
    assert forms[0]["csrf_token"].value == board.app.cookies["csrf_token"]
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
    page = board.get("/jobs/q", role="manager").forms[0].submit(
        headers={"X-Role": "manager"}, status=303
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
    assert events[1].results == [{"id": "f", "state_before": "failed", "state": "queued"}]
    assert events[1].request.path == f"{PREFIX}/jobs/f/retry"
    # A cancelled job is retried; a queued one is not: the page again with
    # the reason, nothing changed.
    board.post("/jobs/q/retry")
    assert board.states()["q"] == "queued"
    caplog.clear()
    refused = board.post("/jobs/q/retry", status=409)
    assert (
        "job q is queued: only a failed, cancelled or dead job is retried"
        in text(refused)
    )
    board.post("/jobs/nope/cancel", status=404)
    assert [r.getMessage() for r in caplog.records if r.name == AUDIT] == [
        "manager refused: retry of job q: job q is queued: only a failed, "
        "cancelled or dead job is retried",
        "manager refused: cancel of job nope: no job has the id 'nope'",
    ]
    assert len(events) == 3
    assert board.states() == {"f": "queued", "q": "queued"}
