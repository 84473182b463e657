"""The workspace filter in the operators' skins: ``jobs list --workspace
KEY=VALUE`` and the JSON API's ``GET /jobs?workspace=KEY=VALUE`` (both
repeatable), and the dashboard's list (one pair) and job page, on
PostgreSQL; the service's filter itself in ``tests/test_jobs_workspace.py``."""

import json
from datetime import UTC, datetime, timedelta

import pytest

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

# The commands set up the INI's logging in this process: undone after each.
pytestmark = pytest.mark.usefixtures("restore_logging")


def workspaces():
    """Six jobs: a to e with workspaces, f without."""
    given = {
        "a": {"user_id": 42, "kind": "import"},
        "b": {"user_id": 7, "kind": "import"},
        "c": {"user_id": 42, "kind": "export"},
        "d": {"user_id": "42"},
        "e": {"user_id": 42, "kind": "import", "step": 2},
        "f": None,
    }
    return [
        {
            "id": job_id,
            "state": "queued",
            "created_at": T0 + timedelta(minutes=n),
            "workspace": workspace,
        }
        for n, (job_id, workspace) in enumerate(given.items())
    ]


def test_jobs_list_workspace(jobs, service):  # noqa: F811 (fixtures)
    add_jobs(service.store.engine, *workspaces())

    def ids(*filters):
        arguments = [part for f in filters for part in ("--workspace", f)]
        status, out, err = jobs("list", *arguments, "--json")
        assert (status, err) == (0, "")
        return [job["id"] for job in json.loads(out)]

    assert ids("user_id=42") == ["e", "c", "a"]
    assert ids("user_id=42", "kind=import") == ["e", "a"]
    assert ids('user_id="42"') == ["d"]
    assert ids("kind=import", "step=2") == ["e"]
    assert jobs("list", "--workspace", "user_id=1")[:2] == (
        0,
        "No job matches these filters.\n",
    )
    assert refused(jobs, "list", "--workspace", "user_id") == (
        "jobs list: bad workspace 'user_id': not KEY=VALUE"
    )


def test_the_api_takes_the_same_filter(api):  # noqa: F811 (a fixture)
    client = api()
    add_jobs(client.d.engine, *workspaces())

    def ids(*filters):
        page = client.get("/jobs", [("workspace", f) for f in filters])
        return [job["id"] for job in page["jobs"]]

    assert ids("user_id=42") == ["e", "c", "a"]
    assert ids("user_id=42", "kind=export") == ["c"]
    [job] = client.get("/jobs", {"workspace": "step=2"})["jobs"]
    assert job["workspace"] == {"user_id": 42, "kind": "import", "step": 2}
    answer = client.get("/jobs", {"workspace": "nothing"}, status=400)
    assert answer["parameter"] == "workspace"
    assert answer["error"] == "bad workspace 'nothing': not KEY=VALUE"


def test_the_dashboard_filters_by_a_workspace_pair_and_shows_it(dashboard):  # noqa: F811
    board = dashboard()
    add_jobs(board.d.engine, *workspaces())
    page = board.get("/jobs", workspace="kind=import")
    assert [code.get_text() for code in page.html.select("td code")] == ["e", "b", "a"]
    assert page.forms[0]["workspace"].value == "kind=import"
    assert "Bad workspace" not in text(page)
    bad = board.get("/jobs", status=400, workspace="kind")
    assert "bad workspace 'kind': not KEY=VALUE" in text(bad)
    job = board.get("/jobs/e")
    assert '"step": 2' in text(job)
    assert "workspace" in [h.get_text() for h in job.html.select("h3")]
    assert "workspace" not in [
        h.get_text() for h in board.get("/jobs/f").html.select("h3")
    ]


def test_jobs_show_lists_a_workflows_steps_and_retry_resumes_at_one(
    jobs,  # noqa: F811 (a fixture)
    service,  # noqa: F811 (a fixture)
):
    add_jobs(
        service.store.engine,
        {
            "id": "w",
            "name": "pyramid_tasks.workflow",
            "state": "failed",
            "created_at": T0,
            "workspace": {"user_id": 42},
        },
        *(
            {
                "id": step,
                "parent_id": "w",
                "state": state,
                "created_at": T0 + timedelta(minutes=n),
            }
            for n, (step, state) in enumerate([("s1", "succeeded"), ("s2", "failed")])
        ),
    )
    status, out, _ = jobs("show", "w")
    assert status == 0
    assert out.endswith(
        'workspace:\n  {\n    "user_id": 42\n  }\n'
        "steps:\n  1. succeeded t s1\n  2. failed    t s2\n"
    ), out
    status, out, _ = jobs("retry", "w")
    assert status == 0
    assert out.startswith("Job w (it was failed) is "), out
    assert out.endswith(", resumed at its step s2.\n"), out
    assert service.get("w")["state"] == "queued"
    assert service.get("s2")["state"] in ("pending", "queued")


def test_cancelling_a_workflow_cancels_its_unfinished_steps(
    jobs,  # noqa: F811 (a fixture)
    service,  # noqa: F811 (a fixture)
):
    """The running step is asked to stop and never sends the next one (a
    cancelled job's message is skipped, its chain with it)."""
    add_jobs(
        service.store.engine,
        {
            "id": "w",
            "name": "pyramid_tasks.workflow",
            "state": "started",
            "created_at": T0,
        },
        *(
            {
                "id": step,
                "parent_id": "w",
                "state": state,
                "created_at": T0 + timedelta(minutes=n),
            }
            for n, (step, state) in enumerate([("s1", "succeeded"), ("s2", "started")])
        ),
    )
    [answer] = service.cancel(["w"])
    assert answer == {
        "id": "w",
        "state_before": "started",
        "state": "cancelled",
        "cancelled": True,
        "steps": ["s2"],
    }
    states = {job["id"]: job["state"] for job in service.list(limit=10)}
    assert states == {"w": "cancelled", "s1": "succeeded", "s2": "cancelled"}
