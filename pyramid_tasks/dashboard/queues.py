"""The queues page: per queue its counts, its consumers, and pause / resume.

Pausing a queue broadcasts Celery's ``cancel_consumer`` to the workers, and
resuming it ``add_consumer``: what the workers that answer do now, nothing
more.  A worker started later consumes its ``-Q`` queues (every queue of the
app without ``-Q``), paused or not, and a worker that did not answer misses
the command.
"""

from pyramid.httpexceptions import HTTPSeeOther

from ..jobs.service import JobError, JobService
from ..jobs.store import one_line
from . import ROUTE
from .actions import _read_only, audit
from .counts import CAP, COLUMNS, overview
from .events import JobsActedOn
from .render import render
from .workers import TIMEOUT

__all__ = ["add_queues", "consumers", "pause_or_resume", "queues_page"]

#: The Celery control command of each action.
COMMANDS = {"pause": "cancel_consumer", "resume": "add_consumer"}

_DONE = {
    "pause": "paused: {n} worker(s) stopped consuming it",
    "resume": "resumed: {n} worker(s) consume it",
}


def consumers(service, timeout=TIMEOUT):
    """``({queue: [worker, ...]}, workers, error)``: the queues each worker
    that answered within ``timeout`` consumes (Celery's ``active_queues``),
    and those workers; ``error``: why the broker could not be asked (one
    line), else None."""
    try:
        with service._broker() as connection:
            answers = service.app.control.inspect(
                timeout=timeout, connection=connection
            ).active_queues()
    except Exception as exc:
        return {}, [], one_line(exc)
    found = {}
    for worker, queues in sorted((answers or {}).items()):
        for queue in queues or ():
            found.setdefault(queue["name"], []).append(worker)
    return found, sorted(answers or {}), None


def queues_page(request):
    service = JobService.from_registry(request.registry)
    queues = overview(service, cap=CAP)
    found, workers, error = consumers(service)
    for row in queues:
        row["consumers"] = found.get(row["queue"], [])
    done, count = request.GET.get("done"), request.GET.get("count", "")
    notice = None
    if done in _DONE and count.isdigit():
        notice = f"Queue {request.GET.get('queue', '')} " + _DONE[done].format(n=count)
    return render(
        request,
        "queues.jinja2",
        queues=queues,
        workers=workers,
        columns=COLUMNS,
        cap=CAP,
        error=error,
        timeout=TIMEOUT,
        notice=notice,
    )


def pause_or_resume(request):
    """Broadcast ``cancel_consumer`` (pause) or ``add_consumer`` (resume)
    of the queue to the workers; then to the queues page (303)."""
    action, queue = request.matchdict["action"], request.matchdict["queue"]
    refused = _read_only(request, f"{action} of queue {queue}")
    if refused is not None:
        return refused
    service = JobService.from_registry(request.registry)
    try:
        # The name as the workers know it (tasks.queue_prefix added).
        queue = service.check_queues([queue])[0]
    except JobError as exc:
        return render(request, "missing.jinja2", status=404, message=str(exc))
    who = request.authenticated_userid
    error, workers = None, None
    if action == "pause":  # the workers consuming it now
        found, _all, error = consumers(service)
        workers = found.get(queue, [])
    else:  # the workers chosen, or every one that answers
        workers = [w for w in request.POST.getall("worker") if w] or None
    try:
        if error is not None:
            raise ConnectionError(error)
        replies = []
        if workers is None or workers:
            with service._broker() as connection:
                replies = service.app.control.broadcast(
                    COMMANDS[action],
                    arguments={"queue": queue},
                    destination=workers,
                    connection=connection,
                    reply=True,
                    timeout=TIMEOUT,
                    limit=None if workers is None else len(workers),
                )
    except Exception as exc:
        error = one_line(exc)
        audit.warning("%s: %s of queue %s failed: %s", who, action, queue, error)
        return render(
            request,
            "missing.jinja2",
            status=503,
            message=f"The broker did not answer: {error}",
        )
    workers = sorted(name for reply in replies or () for name in reply)
    audit.info(
        "%s: %s of queue %s: %d worker(s) answered%s",
        who,
        action,
        queue,
        len(workers),
        f" ({', '.join(workers)})" if workers else "",
    )
    results = {"queue": queue, "workers": workers}
    request.registry.notify(JobsActedOn(request, action, [], results, queues=[queue]))
    query = {"done": action, "queue": queue, "count": len(workers)}
    return HTTPSeeOther(request.route_path(ROUTE + "queues", _query=query))


def add_queues(config, settings):
    config.add_route(ROUTE + "queues", settings.prefix + "/queues")
    config.add_view(
        queues_page,
        route_name=ROUTE + "queues",
        request_method="GET",
        permission=settings.view_permission,
    )
    config.add_route(
        ROUTE + "consume", settings.prefix + "/queues/{queue}/{action:pause|resume}"
    )
    config.add_view(
        pause_or_resume,
        route_name=ROUTE + "consume",
        request_method="POST",
        permission=settings.manage_permission,
        require_csrf=True,
    )
