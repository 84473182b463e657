"""The dashboard's pages and actions: a skin over :class:`.JobService`."""

import json
import logging
from datetime import datetime
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from pyramid.csrf import get_csrf_token
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.response import Response

from ..jobs.model import STATES, UNFINISHED, utcnow
from ..jobs.service import RETRYABLE, JobError, JobService, UnknownJob
from ..masking import mask_secrets
from . import ROUTE
from .counts import CAP, COLUMNS, overview
from .events import JobsActedOn

__all__ = ["add_views"]

#: One line per action: who, what, which jobs, and what came of it.
audit = logging.getLogger("pyramid_tasks.dashboard.audit")

#: Rows a page of the list shows.
PAGE_SIZE = 50

#: The columns the list reads: never the arguments or the traceback.
LIST_FIELDS = (
    "name",
    "title",
    "queue",
    "state",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "error",
)

#: The filters of the list, as its query string names them.
FILTERS = ("state", "queue", "name", "title")

_env = Environment(
    loader=PackageLoader("pyramid_tasks.dashboard", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# -- formatting ----------------------------------------------------------------


def _time(text):
    return None if text is None else datetime.fromisoformat(text)


def ago(seconds):
    """``seconds`` as a short age: ``45 s``, ``12 min``, ``3 h``, ``2 d``."""
    if seconds is None:
        return ""
    seconds = max(0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _when(text):
    """``(UTC time, "5 min ago" or "in 1 h")`` of an ISO time of
    :func:`.job_json`, or None."""
    value = _time(text)
    if value is None:
        return None
    seconds = (utcnow() - value).total_seconds()
    relative = f"{ago(seconds)} ago" if seconds >= 0 else f"in {ago(-seconds)}"
    return value.strftime("%Y-%m-%d %H:%M:%S UTC"), relative


def redacted(value, pattern):
    """``value`` (JSON) with the values of keys matching ``pattern`` as ``***``."""
    if isinstance(value, dict):
        return {
            key: "***" if pattern.search(str(key)) else redacted(item, pattern)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redacted(item, pattern) for item in value]
    return value


def _pretty(value, pattern):
    return json.dumps(redacted(value, pattern), indent=2, ensure_ascii=False)


def _count(number, about=None, cap=CAP):
    """A capped count: ``"about 12,345"`` with an estimate above the cap,
    ``"1000+"`` without (or when the estimate is below the cap: stale)."""
    if number <= cap:
        return str(number)
    if about is not None and about > cap:
        return f"about {about:,}"
    return f"{cap}+"


_env.filters.update(count=_count, ago=ago)


# -- rendering -----------------------------------------------------------------


def _settings(request):
    return request.registry.pyramid_tasks_dashboard


def _render(request, template, status=200, **values):
    settings = _settings(request)
    can_act = not settings.read_only and bool(
        request.has_permission(settings.manage_permission)
    )
    body = _env.get_template(template).render(
        request=request,
        route=lambda name, **kw: request.route_path(ROUTE + name, **kw),
        static=lambda name: request.static_path(
            f"pyramid_tasks.dashboard:static/{name}"
        ),
        read_only=settings.read_only,
        can_act=can_act,
        csrf_token=get_csrf_token(request) if can_act else "",
        **values,
    )
    response = Response(body, status=status, charset="utf-8")
    # Job data (arguments, errors) is the site's: no cache keeps it.
    response.cache_control.no_store = True
    return response


# -- the pages -------------------------------------------------------------------


def overview_page(request):
    service = JobService.from_registry(request.registry)
    queues = overview(service, cap=CAP)
    return _render(request, "overview.jinja2", queues=queues, columns=COLUMNS, cap=CAP)


def _filters(request):
    """The list's filters from the query string: the empty ones dropped."""
    return {
        key: request.GET[key].strip()
        for key in FILTERS
        if request.GET.get(key, "").strip()
    }


def jobs_page(request, error=None, status=200):
    """The list; ``error``: why an action on checked jobs was refused."""
    service = JobService.from_registry(request.registry)
    filters = _filters(request)
    before = request.GET.get("before") or None
    jobs = []
    try:
        jobs = service.list(
            **filters, before=before, limit=PAGE_SIZE + 1, fields=LIST_FIELDS
        )
    except JobError as exc:
        error, status = mask_secrets(exc), 400
    following = None
    if len(jobs) > PAGE_SIZE:  # one row more than a page: there is a next one
        jobs = jobs[:PAGE_SIZE]
        following = "?" + urlencode({**filters, "before": jobs[-1]["id"]})
    with service._connect(), service.store.engine.connect() as connection:
        queues = sorted(
            set(service.configured_queues() + service.table_queues(connection))
        )
    for job in jobs:
        job["created"] = _when(job["created_at"])
        job["finished"] = _when(job["finished_at"])
    return _render(
        request,
        "jobs.jinja2",
        status=status,
        jobs=jobs,
        filters=filters,
        states=STATES,
        queues=queues,
        error=error,
        first="?" + urlencode(filters) if before else None,
        following=following,
        query=urlencode({**filters, **({"before": before} if before else {})}),
        notice=_notice(request),
    )


def _notice(request):
    """What the action that led here did (its redirect's query), or None."""
    done, count = request.GET.get("done"), request.GET.get("count", "")
    if done not in _ACTIONS or not count.isdigit():
        return None
    jobs = "1 job" if count == "1" else f"{count} jobs"
    return f"{jobs} {_DONE[done]}."


def job_page(request, error=None, status=200):
    service = JobService.from_registry(request.registry)
    job_id = request.matchdict["id"]
    try:
        job = service.get(job_id)
    except UnknownJob as exc:
        return _render(request, "missing.jinja2", status=404, message=str(exc))
    pattern = _settings(request).redact
    timeline = [
        (label, _when(job[key]))
        for label, key in (
            ("created", "created_at"),
            ("due", "eta"),
            ("published", "published_at"),
            ("started", "started_at"),
            ("last heartbeat", "heartbeat_at"),
            ("finished", "finished_at"),
        )
        if job[key] is not None
    ]
    done = request.GET.get("done")
    return _render(
        request,
        "job.jinja2",
        status=status,
        job=job,
        publish_after=_when(job["publish_after"]),
        args=_pretty(job["args"], pattern),
        kwargs=_pretty(job["kwargs"], pattern),
        options=_pretty(job["options"], pattern),
        timeline=timeline,
        error=error,
        done=done if done in _ACTIONS else None,
        can_retry=job["state"] in RETRYABLE,
        can_cancel=job["state"] in UNFINISHED,
    )


# -- the actions -----------------------------------------------------------------


def _retry(service, ids):
    return service.retry(ids)


def _cancel(service, ids):
    return service.cancel(ids)


_ACTIONS = {"retry": _retry, "cancel": _cancel}


_DONE = {"retry": "sent again", "cancel": "cancelled"}

#: The most jobs one action on checked rows takes (a page has 50).
MAX_CHECKED = 200


def _read_only(request, action, ids):
    """The refusal of a read-only dashboard (logged), or None."""
    if not _settings(request).read_only:
        return None
    audit.warning(
        "%s refused: %s of job(s) %s (read-only)",
        request.authenticated_userid,
        action,
        ", ".join(ids),
    )
    return Response(
        "The jobs dashboard is read-only (tasks.dashboard.read_only).",
        status=403,
        content_type="text/plain",
    )


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
    changes = ", ".join(f"{r['state_before']} -> {r['state']}" for r in results)
    audit.info("%s: %s: %s", who, what, changes)
    request.registry.notify(JobsActedOn(request, action, ids, results))
    return results


def act(request):
    """Retry or cancel one job; then back to its page (303)."""
    action = request.matchdict["action"]
    job_id = request.matchdict["id"]
    refused = _read_only(request, action, [job_id])
    if refused is not None:
        return refused
    try:
        _perform(request, action, [job_id])
    except UnknownJob:
        return job_page(request)
    except JobError as exc:
        return job_page(request, error=mask_secrets(exc), status=409)
    return HTTPSeeOther(
        request.route_path(ROUTE + "job", id=job_id, _query={"done": action})
    )


def act_on_checked(request):
    """Retry or cancel the jobs checked on a page of the list (at most
    :data:`MAX_CHECKED`); then back to that page (303), its filters kept in
    the query string."""
    action = request.matchdict["action"]
    ids = list(dict.fromkeys(i for i in request.POST.getall("id") if i))
    refused = _read_only(request, action, ids)
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
    query = {**_filters(request), "done": action, "count": changed}
    if request.GET.get("before"):
        query["before"] = request.GET["before"]
    return HTTPSeeOther(request.route_path(ROUTE + "jobs", _query=query))


def _to_overview(request):
    return HTTPSeeOther(request.route_path(ROUTE + "overview"))


def add_views(config, settings):
    prefix = settings.prefix
    pages = (
        ("overview", prefix + "/", overview_page),
        ("jobs", prefix + "/jobs", jobs_page),
        ("job", prefix + "/jobs/{id}", job_page),
    )
    for name, pattern, view in pages:
        config.add_route(ROUTE + name, pattern)
        config.add_view(
            view,
            route_name=ROUTE + name,
            request_method="GET",
            permission=settings.view_permission,
        )
    if prefix:  # the prefix alone: the overview
        config.add_route(ROUTE + "home", prefix)
        config.add_view(_to_overview, route_name=ROUTE + "home")
    actions = (
        ("act", "/jobs/{id}/{action:retry|cancel}", act),
        ("checked", "/actions/{action:retry|cancel}", act_on_checked),
    )
    for name, pattern, view in actions:
        config.add_route(ROUTE + name, prefix + pattern)
        config.add_view(
            view,
            route_name=ROUTE + name,
            request_method="POST",
            permission=settings.manage_permission,
            require_csrf=True,
        )
    config.add_static_view(
        (prefix + "/static").lstrip("/"), "pyramid_tasks.dashboard:static"
    )
