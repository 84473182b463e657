"""The dashboard's pages: a skin over :class:`.JobService`."""

from urllib.parse import urlencode

from pyramid.httpexceptions import HTTPSeeOther

from ..jobs.model import SCHEDULED, STATES, UNFINISHED
from ..jobs.service import RETRYABLE, JobError, JobService, UnknownJob
from ..masking import mask_secrets
from . import ROUTE, failures
from .counts import CAP, COLUMNS, overview
from .periodic import periodic_entries
from .render import dashboard_settings, pretty, render, when
from .workers import TIMEOUT, inspect_workers

__all__ = ["add_pages"]

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

#: What an action did, for the notice of the page it leads back to.
DONE = {
    "retry": "sent again",
    "cancel": "cancelled",
    "delete": "deleted",
    "run": "sent to run now",
}
#: The same on the job's own page.
DONE_JOB = {
    "retry": "Sent again: the job runs anew.",
    "cancel": "Cancelled.",
    "run": "Sent: the periodic task runs now.",
    "now": "Sent: the job runs now, not at its due time.",
    "bulk": "Scheduled: this job does it, in batches; its progress shows here.",
}


# -- the pages -------------------------------------------------------------------


# What became of a cleared queue's messages (the ``purge`` of the notice).
_PURGE = {
    "done": "its messages purged.",
    "kept": "its messages kept: scheduled jobs wait in it (the workers drop "
    "the cancelled ones).",
    "unknown": "its messages not purged: the broker did not answer.",
}


def overview_page(request):
    service = JobService.from_registry(request.registry)
    queues = overview(service, cap=CAP)
    notice = None
    done, count = request.GET.get("done"), request.GET.get("count", "")
    if done == "clear" and count.isdigit():
        notice = (
            f"Queue {request.GET.get('queue', '')} cleared: {count} waiting "
            f"job{'' if count == '1' else 's'} cancelled, "
            f"{_PURGE.get(request.GET.get('purge'), _PURGE['done'])}"
        )
    return render(
        request,
        "overview.jinja2",
        queues=queues,
        columns=COLUMNS,
        cap=CAP,
        notice=notice,
    )


def filters_of(request):
    """The list's filters from the query string: the empty ones dropped."""
    return {
        key: request.GET[key].strip()
        for key in FILTERS
        if request.GET.get(key, "").strip()
    }


def jobs_page(request, error=None, status=200):
    """The list; ``error``: why an action on checked jobs was refused."""
    service = JobService.from_registry(request.registry)
    filters = filters_of(request)
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
        job["created"] = when(job["created_at"])
        job["finished"] = when(job["finished_at"])
    return render(
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
    if done not in DONE or not count.isdigit():
        return None
    jobs = "1 job" if count == "1" else f"{count} jobs"
    return f"{jobs} {DONE[done]}."


def job_page(request, error=None, status=200):
    service = JobService.from_registry(request.registry)
    job_id = request.matchdict["id"]
    try:
        job = service.get(job_id)
    except UnknownJob as exc:
        return render(request, "missing.jinja2", status=404, message=str(exc))
    pattern = dashboard_settings(request).redact
    timeline = [
        (label, when(job[key]))
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
    return render(
        request,
        "job.jinja2",
        status=status,
        job=job,
        publish_after=when(job["publish_after"]),
        args=pretty(job["args"], pattern),
        kwargs=pretty(job["kwargs"], pattern),
        options=pretty(job["options"], pattern),
        timeline=timeline,
        error=error,
        done=DONE_JOB.get(done),
        can_retry=job["state"] in RETRYABLE,
        can_cancel=job["state"] in UNFINISHED,
        can_delete=job["state"] not in UNFINISHED,
        can_run=job["state"] == SCHEDULED,
    )


def failures_page(request, error=None, status=200):
    """The failures grouped; ``error``: why an action on a group was refused."""
    service = JobService.from_registry(request.registry)
    groups, complete = failures.failure_groups(service)
    for group in groups:
        group["when_first"] = when(group["first"])
        group["when_last"] = when(group["last"])
    done, count = request.GET.get("done"), request.GET.get("count", "")
    notice = None
    if done in DONE and count.isdigit():
        notice = f"{count} job{'' if count == '1' else 's'} {DONE[done]}."
    return render(
        request,
        "failures.jinja2",
        status=status,
        groups=groups,
        complete=complete,
        scan=failures.SCAN,
        error=error,
        notice=notice,
    )


def periodic_page(request):
    service = JobService.from_registry(request.registry)
    entries = periodic_entries(service)
    for entry in entries:
        entry["when_last"] = entry["last"] and when(entry["last"]["created_at"])
        entry["when_next"] = when(entry["next"])
    return render(request, "periodic.jinja2", entries=entries)


def workers_page(request):
    service = JobService.from_registry(request.registry)
    workers, error = inspect_workers(service)
    return render(
        request, "workers.jinja2", workers=workers, error=error, timeout=TIMEOUT
    )


def _to_overview(request):
    return HTTPSeeOther(request.route_path(ROUTE + "overview"))


def add_pages(config, settings):
    prefix = settings.prefix
    pages = (
        ("overview", prefix + "/", overview_page),
        ("jobs", prefix + "/jobs", jobs_page),
        ("job", prefix + "/jobs/{id}", job_page),
        ("failures", prefix + "/failures", failures_page),
        ("periodic", prefix + "/periodic", periodic_page),
        ("workers", prefix + "/workers", workers_page),
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
    config.add_static_view(
        (prefix + "/static").lstrip("/"), "pyramid_tasks.dashboard:static"
    )
