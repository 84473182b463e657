"""Everything matching the list's filters: retried, cancelled or deleted by a
job of its own (:data:`.jobs.bulk.BULK_TASK`), never in the web request.

``GET /bulk/{action}?<the list's filters>`` asks first, with a capped count
of the jobs the action takes; the POST sends the bulk job and leads to its
page, where its progress bar moves.
"""

from ..jobs.bulk import ACTIONS, applicable, count_matching, send
from ..jobs.service import JobError, JobService
from ..masking import mask_secrets
from . import ROUTE
from .actions import _read_only, _read_only_answer, bulk_sent
from .counts import CAP
from .render import dashboard_settings, render
from .views import filters_of, jobs_page

__all__ = ["add_bulk", "confirm_bulk", "send_bulk"]

#: The queries a count of the matching jobs makes in the request at most: a
#: rare text is searched no deeper than this many windows of
#: :attr:`.JobService.search_depth` jobs (the bulk job counts them all).
READS = 3

_VERB = {"retry": "Retry", "cancel": "Cancel", "delete": "Delete"}


def _described(filters):
    return ", ".join(f"{key} {value!r}" for key, value in filters.items()) or (
        "none: every job"
    )


def confirm_bulk(request):
    """Ask before acting on every job matching the filters: the filters, and
    how many jobs the action takes (up to :data:`.counts.CAP`, then "more
    than")."""
    if dashboard_settings(request).read_only:
        return _read_only_answer()
    action, filters = request.matchdict["action"], filters_of(request)
    service = JobService.from_registry(request.registry)
    try:
        count, complete = count_matching(service, action, filters, CAP, READS)
    except JobError as exc:
        return jobs_page(request, mask_secrets(exc), 400)
    query = applicable(action, filters)
    return render(
        request,
        "bulk.jinja2",
        action=action,
        verb=_VERB[action],
        filters=filters,
        described=_described(filters),
        states=[] if query is None else query["state"],
        all_states=list(ACTIONS[action]),
        count=count,
        complete=complete,
        cap=CAP,
        searched=READS * service.search_depth,
    )


def send_bulk(request):
    """Send the bulk job for the action and the filters of the query string;
    then to its page (303)."""
    action, filters = request.matchdict["action"], filters_of(request)
    what = f"{action} of every job matching {_described(filters)}"
    refused = _read_only(request, what)
    if refused is not None:
        return refused
    service = JobService.from_registry(request.registry)
    try:
        count, complete = count_matching(service, action, filters, CAP, READS)
    except JobError as exc:
        return jobs_page(request, mask_secrets(exc), 400)
    title = f"{_VERB[action]} the jobs matching {_described(filters)}"
    job_id = send(service, action, filters, title=title[:255])
    shown = f"more than {CAP}" if count > CAP else str(count)
    if not complete and count <= CAP:
        shown = f"at least {count}"
    results = {"action": action, "filters": filters, "matching": count}
    return bulk_sent(request, what, shown, job_id, results)


def add_bulk(config, settings):
    config.add_route(
        ROUTE + "bulk", settings.prefix + "/bulk/{action:retry|cancel|delete}"
    )
    config.add_view(
        confirm_bulk,
        route_name=ROUTE + "bulk",
        request_method="GET",
        permission=settings.manage_permission,
    )
    config.add_view(
        send_bulk,
        route_name=ROUTE + "bulk",
        request_method="POST",
        permission=settings.manage_permission,
        require_csrf=True,
    )
