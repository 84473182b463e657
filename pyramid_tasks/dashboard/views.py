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


def _count(number):
    return f"{CAP}+" if number > CAP else str(number)


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
    queues = overview(service)
    return _render(request, "overview.jinja2", queues=queues, columns=COLUMNS, cap=CAP)


def _filters(request):
    """The list's filters from the query string: the empty ones dropped."""
    return {
        key: request.GET[key].strip()
        for key in FILTERS
        if request.GET.get(key, "").strip()
    }


def jobs_page(request):
    service = JobService.from_registry(request.registry)
    filters = _filters(request)
    before = request.GET.get("before") or None
    error = None
    jobs = []
    try:
        jobs = service.list(
            **filters, before=before, limit=PAGE_SIZE + 1, fields=LIST_FIELDS
        )
    except JobError as exc:
        error = mask_secrets(exc)
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
        status=400 if error else 200,
        jobs=jobs,
        filters=filters,
        states=STATES,
        queues=queues,
        error=error,
        first="?" + urlencode(filters) if before else None,
        following=following,
    )


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


def act(request):
    """Retry or cancel one job; then back to its page (303)."""
    action = request.matchdict["action"]
    job_id = request.matchdict["id"]
    who = request.authenticated_userid
    if _settings(request).read_only:
        audit.warning("%s refused: %s of job %s (read-only)", who, action, job_id)
        return Response(
            "The jobs dashboard is read-only (tasks.dashboard.read_only).",
            status=403,
            content_type="text/plain",
        )
    service = JobService.from_registry(request.registry)
    try:
        results = _ACTIONS[action](service, [job_id])
    except JobError as exc:
        audit.warning("%s refused: %s of job %s: %s", who, action, job_id, exc)
        if isinstance(exc, UnknownJob):
            return job_page(request)
        return job_page(request, error=mask_secrets(exc), status=409)
    audit.info(
        "%s: %s of job(s) %s: %s",
        who,
        action,
        ", ".join(r["id"] for r in results),
        ", ".join(f"{r['state_before']} -> {r['state']}" for r in results),
    )
    request.registry.notify(JobsActedOn(request, action, [job_id], results))
    return HTTPSeeOther(
        request.route_path(ROUTE + "job", id=job_id, _query={"done": action})
    )


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
    config.add_route(ROUTE + "act", prefix + "/jobs/{id}/{action:retry|cancel}")
    config.add_view(
        act,
        route_name=ROUTE + "act",
        request_method="POST",
        permission=settings.manage_permission,
        require_csrf=True,
    )
    config.add_static_view(
        (prefix + "/static").lstrip("/"), "pyramid_tasks.dashboard:static"
    )
