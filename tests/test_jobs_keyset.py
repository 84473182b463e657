"""Paging and bulk work that hold under concurrent change: a page goes on
from where the last ended even when that job is deleted; a bulk job never
takes a bulk job; a confirmation's count stays bounded; a unique key taken
meanwhile refuses a retry, changing nothing."""

# The fixtures imported from the other test modules are the arguments here.
# ruff: noqa: F811

import logging

import pytest
from sqlalchemy import delete, event, insert

from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs import bulk as jobs_bulk
from pyramid_tasks.jobs.bulk import BULK_TASK
from pyramid_tasks.jobs.model import utcnow
from pyramid_tasks.jobs.service import BadParameter, JobService

from .test_dashboard import (  # noqa: F401 (fixtures)
    AUDIT,
    dashboard,
    durable,
    own_redis,
    queue,
    text,
)
from .test_dashboard_list import searched_rows
from .test_jobs_api import add_jobs, ago


def ids(found):
    return [job["id"] for job in found["jobs"]], found["searched"]


def test_a_page_goes_on_from_a_deleted_job_s_place(dashboard):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    service = board.service
    service.search_depth = 3
    first = service.list_page(title="match", limit=5, fields=())
    assert ids(first) == (["g"], "f")
    with board.d.engine.begin() as connection:  # the search's end, deleted
        connection.execute(delete(Job.__table__).where(Job.id == "f"))

    mark = (first["searched_at"], first["searched"])
    assert ids(service.list_page(title="match", limit=5, before=mark)) == (
        ["e", "c"],
        "c",
    )
    with pytest.raises(BadParameter, match="bad before 'f': no job has that id"):
        service.list_page(title="match", before="f")
    for bad in (("soon", "f"), (first["searched_at"], 5), 5, ("a", "b", "c")):
        with pytest.raises(BadParameter, match="bad before") as raised:
            service.list_page(before=bad)
        assert raised.value.name == "before"


def test_bulk_work_never_takes_a_bulk_job(dashboard):
    board = dashboard()
    failed = {"state": "failed", "queue": board.d.queue, "name": "echo"}
    add_jobs(
        board.d.engine,
        {"id": "f1", "created_at": ago(3), **failed},
        {"id": "f2", "created_at": ago(2), **failed},
        {"id": "old-bulk", "created_at": ago(1), **failed, "name": BULK_TASK},
    )
    assert jobs_bulk.count_matching(board.service, "retry", {"state": "failed"}) == (
        2,
        True,
    )

    class Run:  # the task's self
        app = board.d.app
        request = type("request", (), {"id": "the-bulk-job"})
        progress = []

        def set_progress(self, *args):
            self.progress.append(args)

    result = jobs_bulk.bulk_job(Run(), "cancel", {"state": "failed"})
    assert result == {"action": "cancel", "matching": 0, "changed": 0}  # finished
    result = jobs_bulk.bulk_job(Run(), "delete", {"state": "failed"})
    assert result == {"action": "delete", "matching": 2, "changed": 2}
    assert board.states() == {"old-bulk": "failed"}


def test_the_confirmation_counts_in_three_searches_at_most(
    dashboard, monkeypatch, caplog
):
    board = dashboard()
    add_jobs(board.d.engine, *searched_rows(board.d.queue))
    monkeypatch.setattr(JobService, "search_depth", 2)
    # b, c, e and g match, among a to h: two jobs a search, newest first.
    assert jobs_bulk.count_matching(board.service, "delete", {"title": "match"}) == (
        4,
        True,
    )
    assert jobs_bulk.count_matching(
        board.service, "delete", {"title": "match"}, reads=3
    ) == (3, False)  # g of h g, e of f e, c of d c
    assert jobs_bulk.matching(board.service, "delete", {"title": "match"}) == 4

    page = board.get("/bulk/delete", role="manager", title="match")
    assert "jobs now at least 3 (in the newest 6 jobs searched; the job " in text(page)
    [form] = [f for f in page.forms.values() if f.method.upper() == "POST"]
    assert form.action == "/_tasks/bulk/delete?title=match"
    # Sent all the same: the audit line says what is known of the count.
    caplog.set_level(logging.INFO, AUDIT)
    form.submit(headers={"X-Role": "manager"}, status=303)
    [line] = [r.getMessage() for r in caplog.records if r.name == AUDIT]
    assert line.startswith(
        "manager: delete of every job matching title 'match' (at least 3 job(s)): "
        "bulk job "
    )
    nothing = board.get("/bulk/delete", role="manager", title="nowhere")
    assert "jobs now at least 0" in text(nothing)  # older jobs may match
    monkeypatch.setattr(JobService, "search_depth", 10)
    none = board.get("/bulk/delete", role="manager", title="nowhere")
    assert "jobs now 0" in text(none)
    assert "No job matching these filters is in a state this takes." in text(none)


def test_a_unique_key_taken_meanwhile_refuses_the_retry(dashboard):
    board = dashboard()
    engine = board.d.engine
    add_jobs(
        engine,
        {"id": "r", "name": "echo", "state": "failed", "created_at": ago(5)}
        | {"queue": board.d.queue, "unique_key": "nightly"},
    )
    taken = []

    def holder_commits(conn, cursor, statement, parameters, context, many):
        # After the retry's check that the key is free, before its UPDATE.
        if "unique_key =" in statement and not taken:
            taken.append(statement)
            with engine.begin() as other:
                other.execute(
                    insert(Job.__table__).values(
                        id="h",
                        name="echo",
                        state="queued",
                        created_at=utcnow(),
                        unique_key="nightly",
                    )
                )

    event.listen(engine, "after_cursor_execute", holder_commits)
    try:
        with pytest.raises(BadParameter) as raised:
            board.service.retry(["r"])
    finally:
        event.remove(engine, "after_cursor_execute", holder_commits)

    assert str(raised.value) == (
        "a unique_key of the jobs r was taken meanwhile by another unfinished "
        "job: nothing retried"
    )
    assert raised.value.name == "id"
    assert board.states() == {"r": "failed", "h": "queued"}
