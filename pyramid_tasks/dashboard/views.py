"""The dashboard's pages: a skin over :class:`.JobService`."""

from urllib.parse import urlencode

from pyramid.httpexceptions import HTTPSeeOther

from ..jobs.model import RETRY_HEADER, SCHEDULED, STATES, UNFINISHED
from ..jobs.service import RETRYABLE, JobError, JobService, UnknownJob
from ..masking import mask_secrets
from . import ROUTE, failures, stats
from .charts import charts, rate_text, seconds_text
from .counts import CAP, COLUMNS, children_count, overview
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

#: The filters of the list, as its query string names them (the times in
#: ISO 8601, UTC unless they name an offset).
FILTERS = (
    "state",
    "queue",
    "name",
    "title",
    "error",
    "created_after",
    "created_before",
    "finished_after",
    "finished_before",
    "parent",
    "workspace",
)
#: The time filters, ``datetime-local`` inputs of the form.
TIME_FILTERS = FILTERS[5:9]

#: Children (chain steps, sub-jobs) a job's page lists, newest first.
CHILDREN = 20
#: The columns that list reads.
CHILD_FIELDS = ("name", "title", "state", "created_at", "finished_at")

#: Who retried a job (the ``by`` of its options' retry header).
RETRIED_BY = {"operator": "retried by an operator", "task": "retried by the task"}

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
    "bulk": "Sent: this job does the work in batches; its progress shows here.",
}


# -- the pages -------------------------------------------------------------------


# What became of a cleared queue's messages (the ``purge`` of the notice).
_PURGE = {
    "done": "its messages purged.",
    "kept": "its messages kept: scheduled jobs wait in it (the workers drop "
    "the cancelled ones).",
    "unknown": "its messages not purged: the broker did not answer.",
}


#: The overview's windows, as its links name them.
WINDOW_LINKS = {"hour": "hour", "day": "day", "month": "30 days"}


def overview_page(request):
    service = JobService.from_registry(request.registry)
    queues = overview(service, cap=CAP)
    window = request.GET.get("window", "hour")
    figures = drawn = error = None
    try:
        figures = stats.throughput(service, window)
    except JobError as exc:
        error = str(exc)
    else:
        drawn = charts(figures)
        for task in figures["tasks"]:
            task["rate"] = rate_text(task["failed"], task["count"])
            task["p50_text"] = seconds_text(task["p50"])
            task["p95_text"] = seconds_text(task["p95"])
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
        status=400 if error else 200,
        queues=queues,
        columns=COLUMNS,
        cap=CAP,
        notice=notice,
        error=error,
        window=window,
        windows=WINDOW_LINKS,
        figures=figures,
        charts=drawn,
        rate=rate_text,
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
    jobs, searched = [], None
    try:
        found = service.list_page(
            **filters, before=before, limit=PAGE_SIZE + 1, fields=LIST_FIELDS
        )
        jobs, searched = found["jobs"], found["searched"]
    except JobError as exc:
        error, status = mask_secrets(exc), 400
    following = None
    if len(jobs) > PAGE_SIZE:  # one row more than a page: there is a next one
        jobs = jobs[:PAGE_SIZE]
        following = "?" + urlencode({**filters, "before": jobs[-1]["id"]})
    elif searched is not None:  # the search stopped short of the oldest jobs
        following = "?" + urlencode({**filters, "before": searched})
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
        searched=searched is not None,
        depth=service.search_depth,
        time_filters=TIME_FILTERS,
        time_values={key: _input_time(key, filters.get(key)) for key in TIME_FILTERS},
        query=urlencode({**filters, **({"before": before} if before else {})}),
        notice=_notice(request),
    )


def _input_time(key, value):
    """A time filter as its ``datetime-local`` input shows it (UTC, no
    offset: ``2026-12-01T08:00:00`` for ``...T09:00+01:00``), the text as
    given when it is not a time (the page says why)."""
    try:
        parsed = JobService._time(key, value)
    except JobError:
        return value
    return "" if parsed is None else parsed.strftime("%Y-%m-%dT%H:%M:%S")


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
    moments = [
        (label, job[key])
        for label, key in (
            ("created", "created_at"),
            ("published", "published_at"),
            ("started", "started_at"),
            ("last heartbeat", "heartbeat_at"),
            ("finished", "finished_at"),
        )
        if job[key] is not None
    ] + _retried(job)
    # In the order they happened (ISO times in UTC, to the microsecond: a
    # retry comes between two runs); the time it was due for, a plan that
    # may lie ahead, next to its creation.
    moments.sort(key=lambda moment: moment[1])
    if job["eta"] is not None:
        moments.insert(1, ("due", job["eta"]))
    timeline = [(label, when(at)) for label, at in moments]
    children = service.list(parent=job_id, limit=CHILDREN + 1, fields=CHILD_FIELDS)
    total = len(children)
    if total > CHILDREN:  # more than the page lists: counted, up to the cap
        children, total = children[:CHILDREN], children_count(service, job_id)
    for child in children:
        child["created"] = when(child["created_at"])
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
        workspace=None
        if job["workspace"] is None
        else pretty(job["workspace"], pattern),
        timeline=timeline,
        error=error,
        done=DONE_JOB.get(done),
        can_retry=job["state"] in RETRYABLE,
        can_cancel=job["state"] in UNFINISHED,
        can_delete=job["state"] not in UNFINISHED,
        children=children,
        children_total=total,
        cap=CAP,
        can_run=job["state"] == SCHEDULED,
    )


def _retried(job):
    """The timeline's entry of the job's last retry, when its options
    recorded one (an operator's retry, Celery's ``retry()``)."""
    mark = ((job["options"] or {}).get("headers") or {}).get(RETRY_HEADER)
    if not mark:
        return []
    return [(RETRIED_BY.get(mark["by"], "retried"), mark["at"])]


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
