"""The dashboard's actions: POST forms carrying the CSRF token, each one
audit line and one :class:`.JobsActedOn` event once done."""

import logging

from pyramid.httpexceptions import HTTPSeeOther
from pyramid.response import Response

from ..jobs import bulk
from ..jobs.service import JobError, JobService, UnknownJob
from ..masking import mask_secrets
from . import ROUTE
from .counts import CAP, WAITING, capped_count
from .events import JobsActedOn
from .failures import failure_groups
from .periodic import UnknownEntry, run_now
from .render import dashboard_settings, render
from .views import failures_page, filters_of, job_page, jobs_page

__all__ = ["add_actions"]

#: One line per action: who, what, which jobs, and what came of it.
audit = logging.getLogger("pyramid_tasks.dashboard.audit")


def _retry(service, ids):
    return service.retry(ids)


def _cancel(service, ids):
    return service.cancel(ids)


def _delete(service, ids):
    return service.delete(ids)


def _run(service, ids):
    return service.run_now(ids)


_ACTIONS = {"retry": _retry, "cancel": _cancel, "delete": _delete, "run": _run}

#: The most jobs one action on checked rows takes (a page has 50).
MAX_CHECKED = 200


def _read_only_answer():
    return Response(
        "The jobs dashboard is read-only (tasks.dashboard.read_only).",
        status=403,
        content_type="text/plain",
    )


def _read_only(request, what):
    """The refusal of ``what`` by a read-only dashboard (logged), or None."""
    if not dashboard_settings(request).read_only:
        return None
    audit.warning("%s refused: %s (read-only)", request.authenticated_userid, what)
    return _read_only_answer()


def _perform(request, action, ids):
    """Do ``action`` on the jobs ``ids``: one audit line and, when done, one
    :class:`JobsActedOn`.  The service's answer; its JobError if refused."""
    who = request.authenticated_userid
    what = f"{action} of job(s) {', '.join(ids)}"
    service = JobService.from_registry(request.registry)
    try:
        results = _ACTIONS[action](service, ids)
    except JobError as exc:
        audit.warning("%s refused: %s: %s", who, what, exc)
        raise
    changes = ", ".join(
        f"{r['state_before']} -> {r['state'] or 'deleted'}" for r in results
    )
    audit.info("%s: %s: %s", who, what, changes)
    request.registry.notify(JobsActedOn(request, action, ids, results))
    return results


def act(request):
    """Retry, cancel, delete or run now one job; then back to its page
    (303), or to the list once it is deleted."""
    action = request.matchdict["action"]
    job_id = request.matchdict["id"]
    refused = _read_only(request, f"{action} of job(s) {job_id}")
    if refused is not None:
        return refused
    try:
        _perform(request, action, [job_id])
    except UnknownJob:
        return job_page(request)
    except JobError as exc:
        return job_page(request, error=mask_secrets(exc), status=409)
    if action == "delete":
        query = {"done": "delete", "count": 1}
        return HTTPSeeOther(request.route_path(ROUTE + "jobs", _query=query))
    # "run" is a periodic task's notice: "now", a scheduled job's.
    done = "now" if action == "run" else action
    return HTTPSeeOther(
        request.route_path(ROUTE + "job", id=job_id, _query={"done": done})
    )


def act_on_checked(request):
    """Retry, cancel, delete or run now the jobs checked on a page of the list (at most
    :data:`MAX_CHECKED`); then back to that page (303), its filters kept in
    the query string."""
    action = request.matchdict["action"]
    ids = list(dict.fromkeys(i for i in request.POST.getall("id") if i))
    refused = _read_only(request, f"{action} of job(s) {', '.join(ids)}")
    if refused is not None:
        return refused
    if not ids:
        return jobs_page(request, "No job is checked: check the jobs to act on.", 400)
    if len(ids) > MAX_CHECKED:
        message = f"{len(ids)} jobs are checked: at most {MAX_CHECKED} at once."
        return jobs_page(request, message, 400)
    try:
        results = _perform(request, action, ids)
    except JobError as exc:
        return jobs_page(request, mask_secrets(exc), 409)
    changed = sum(r["state"] != r["state_before"] for r in results)
    query = {**filters_of(request), "done": action, "count": changed}
    if request.GET.get("before"):
        query["before"] = request.GET["before"]
    return HTTPSeeOther(request.route_path(ROUTE + "jobs", _query=query))


def _queue(request, service):
    """The queue of the URL, checked (as :meth:`.JobService.list` checks
    its ``queue``); a JobError if none such is known."""
    return service.check_queues([request.matchdict["queue"]])[0]


def confirm_clear(request):
    """Ask before clearing a queue: what will be cancelled and purged."""
    if dashboard_settings(request).read_only:
        return _read_only_answer()
    service = JobService.from_registry(request.registry)
    try:
        queue = _queue(request, service)
    except JobError as exc:
        return render(request, "missing.jinja2", status=404, message=str(exc))
    with service._connect(), service.store.engine.connect() as connection:
        waiting = capped_count(connection, queue, WAITING, CAP)
    return render(request, "clear.jinja2", queue=queue, waiting=waiting, cap=CAP)


def clear_queue(request):
    """Cancel every waiting job of a queue and purge its messages at the
    broker (:meth:`.JobService.clear`); then to the overview (303)."""
    queue = request.matchdict["queue"]
    refused = _read_only(request, f"clear of queue {queue}")
    if refused is not None:
        return refused
    service = JobService.from_registry(request.registry)
    try:
        queue = _queue(request, service)
    except JobError as exc:
        return render(request, "missing.jinja2", status=404, message=str(exc))
    result = service.clear([queue])
    cancelled, purged = result["queues"][queue], result["purged"][queue]
    scheduled = result.get("scheduled", {}).get(queue, 0)
    if scheduled:  # their messages wait in the queue: not purged
        purge, purged_text = "kept", f"none ({scheduled} scheduled job(s) wait in it)"
    elif purged is None:
        purge, purged_text = "unknown", "unknown (the broker did not answer)"
    else:
        purge, purged_text = "done", str(purged)
    audit.info(
        "%s: clear of queue %s: %d job(s) cancelled, %s message(s) purged",
        request.authenticated_userid,
        queue,
        cancelled,
        purged_text,
    )
    request.registry.notify(JobsActedOn(request, "clear", [], result, queues=[queue]))
    query = {"done": "clear", "queue": queue, "count": cancelled, "purge": purge}
    return HTTPSeeOther(request.route_path(ROUTE + "overview", _query=query))


#: The most jobs an action on a failure group takes in the request; a larger
#: group is a bulk job of its own (:mod:`.jobs.bulk`).
MAX_GROUP = MAX_CHECKED


def act_on_group(request):
    """Retry or delete every job of a failure group (as the page grouped
    them); then back to the failures (303), or, for a group larger than
    :data:`MAX_GROUP`, to the page of the bulk job doing it."""
    action, key = request.matchdict["action"], request.matchdict["key"]
    refused = _read_only(request, f"{action} of failure group {key}")
    if refused is not None:
        return refused
    service = JobService.from_registry(request.registry)
    groups, _complete = failure_groups(service)
    ids = next((g["ids"] for g in groups if g["key"] == key), [])
    if not ids:
        message = f"No failure group {key}: its jobs were retried or deleted."
        return failures_page(request, message, 404)
    if len(ids) > MAX_GROUP:
        verb = action.capitalize()
        job_id = bulk.send(
            service, action, ids=ids, title=f"{verb} failure group {key}"
        )
        results = {"action": action, "group": key, "matching": len(ids)}
        return bulk_sent(
            request, f"{action} of failure group {key}", len(ids), job_id, results
        )
    try:
        results = _perform(request, action, ids)
    except JobError as exc:  # one of them changed meanwhile
        return failures_page(request, mask_secrets(exc), 409)
    changed = sum(r["state"] != r["state_before"] for r in results)
    query = {"done": action, "count": changed}
    return HTTPSeeOther(request.route_path(ROUTE + "failures", _query=query))


def bulk_sent(request, what, count, job_id, results):
    """After sending the bulk job ``job_id`` for ``what`` (on ``count``
    jobs, a number or its text): one audit line, one :class:`JobsActedOn`,
    and the way to the job's page, where its progress shows (303)."""
    audit.info(
        "%s: %s (%s job(s)): bulk job %s",
        request.authenticated_userid,
        what,
        count,
        job_id,
    )
    request.registry.notify(JobsActedOn(request, "bulk", [job_id], results))
    return HTTPSeeOther(
        request.route_path(ROUTE + "job", id=job_id, _query={"done": "bulk"})
    )


def run_periodic(request):
    """Send a beat entry's task now; then to its job's page (303)."""
    name = request.matchdict["name"]
    refused = _read_only(request, f"run now of periodic task {name}")
    if refused is not None:
        return refused
    service = JobService.from_registry(request.registry)
    try:
        job_id = run_now(service, name)
    except UnknownEntry as exc:
        return render(request, "missing.jinja2", status=404, message=str(exc))
    audit.info(
        "%s: run now of periodic task %s: job %s",
        request.authenticated_userid,
        name,
        job_id,
    )
    results = [{"id": job_id, "periodic": name}]
    request.registry.notify(JobsActedOn(request, "run", [job_id], results))
    return HTTPSeeOther(
        request.route_path(ROUTE + "job", id=job_id, _query={"done": "run"})
    )


def add_actions(config, settings):
    config.add_route(ROUTE + "clear", settings.prefix + "/queues/{queue}/clear")
    config.add_view(
        confirm_clear,
        route_name=ROUTE + "clear",
        request_method="GET",
        permission=settings.manage_permission,
    )
    actions = (
        ("act", "/jobs/{id}/{action:retry|cancel|delete}", act),
        ("checked", "/actions/{action:retry|cancel|delete}", act_on_checked),
        # Run now (a scheduled job), one or checked.
        ("act_run", "/jobs/{id}/{action:run}", act),
        ("checked_run", "/actions/{action:run}", act_on_checked),
        ("clear", None, clear_queue),
        ("run", "/periodic/{name}/run", run_periodic),
        ("group", "/failures/{key}/{action:retry|delete}", act_on_group),
    )
    for name, pattern, view in actions:
        if pattern is not None:
            config.add_route(ROUTE + name, settings.prefix + pattern)
        config.add_view(
            view,
            route_name=ROUTE + name,
            request_method="POST",
            permission=settings.manage_permission,
            require_csrf=True,
        )
