"""The JSON API over the job table: ``config.include('pyramid_tasks.jobs.api')``.

The operations of ``tasks-celery CONFIG jobs`` over HTTP, under
``tasks.jobs.api_prefix`` (default ``/_tasks/api``)::

    GET  /jobs          list (?state= &queue= &name= &title= &error=
                        &created_after= &created_before= &finished_after=
                        &finished_before= &workspace= &limit= &before=)
    GET  /jobs/{id}     show
    POST /cancel        {"ids": [...]}
    POST /retry         {"ids": [...]}
    POST /run-now       {"ids": [...]}       (scheduled jobs, run now)
    POST /clear         {"queues": [...]}    (every queue when absent)
    POST /test          {"queue": "..."}     (optional)
    GET  /depth         (?include_scheduled=true)
    GET  /metrics       Prometheus (with prometheus_client installed)

Reads need ``tasks.jobs.view_permission`` (``tasks.view``), actions
``tasks.jobs.manage_permission`` (``tasks.manage``); actions check Pyramid's
CSRF token (the ``X-CSRF-Token`` header).  Every answer is JSON, errors too:
``{"error": "...", "parameter": "..."}`` with 400 (a bad parameter), 403,
404 (an unknown job), 405 or 503 (the database failed: it is down, or the
job table is missing).  The work is :class:`.service.JobService`'s.
"""

import functools
import json
import logging
import traceback

from pyramid.exceptions import BadCSRFToken, PredicateMismatch
from pyramid.response import Response
from sqlalchemy.exc import SQLAlchemyError

from ..config import _action
from ..masking import mask_secrets
from ..settings import parse_jobs_settings
from .access import check_operator_include
from .service import JobError, JobService, UnknownJob
from .store import JobTableMissing, one_line

__all__ = ["includeme"]

log = logging.getLogger(__name__)

_INCLUDE = "pyramid_tasks.jobs.api"
_ROUTE = "pyramid_tasks.jobs.api."


class _Refused(Exception):
    """A request the API refuses: ``status``, ``message``, ``parameter``."""

    def __init__(self, status, message, parameter=None):
        super().__init__(message)
        self.status = status
        self.parameter = parameter


def _answer(body, status=200):
    response = Response(json=body, status=status)
    # Job data (arguments, errors) is the site's: no cache keeps it.
    response.cache_control.no_store = True
    return response


def _error(status, message, parameter=None):
    body = {"error": mask_secrets(message), "parameter": parameter}
    return _answer(body, status)


def _database_failed(request, exc):
    """503: the database failed, not the request.  One line to the caller;
    one ERROR record with the traceback, masked (``exc_info`` would print
    the raw exception: SQL parameters, a password in a URL)."""
    if isinstance(exc, JobTableMissing):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {one_line(exc)}"
    log.error(
        "%s %s: the job table did not answer: %s\n%s",
        request.method,
        request.path,
        mask_secrets(message),
        mask_secrets("".join(traceback.format_exception(exc))).rstrip(),
    )
    return _error(503, message)


def _api(**renames):
    """A view of the service: its answer as JSON (unless it is a Response),
    its errors as JSON too.

    ``renames``: the service's parameter names that the request spells
    otherwise (``id="ids"``: the ids of a body); an unknown job is 404.
    """

    def decorate(view):
        @functools.wraps(view)
        def api_view(request):
            try:
                service = JobService.from_registry(request.registry)
                answer = view(request, service)
                return answer if isinstance(answer, Response) else _answer(answer)
            except _Refused as exc:
                return _error(exc.status, str(exc), exc.parameter)
            except UnknownJob as exc:
                return _error(404, str(exc), renames.get("id", "id"))
            except JobError as exc:  # a BadParameter names its parameter
                name = getattr(exc, "name", None)
                return _error(400, str(exc), renames.get(name, name))
            except (JobTableMissing, SQLAlchemyError) as exc:
                return _database_failed(request, exc)

        return api_view

    return decorate


# -- reading the request -----------------------------------------------------


def _query(request, allowed):
    """The query string: only ``allowed`` parameters, each once unless it is
    in ``allowed``'s repeatable set (``{name: repeatable}``)."""
    for name in request.GET:
        if name not in allowed:
            expected = ", ".join(allowed) or "none"
            raise _Refused(
                400, f"unknown parameter {name!r} (expected: {expected})", name
            )
    values = {}
    for name, repeatable in allowed.items():
        found = request.GET.getall(name)
        if len(found) > 1 and not repeatable:
            raise _Refused(400, f"parameter {name!r} is given more than once", name)
        if found:
            values[name] = found if repeatable else found[0]
    return values


def _body(request, allowed):
    """The JSON object of the request body ({} when there is none), with
    only ``allowed`` keys; a query string is refused."""
    _query(request, {})
    if not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise _Refused(400, f"the request body is not JSON: {exc}", "body") from exc
    if not isinstance(body, dict):
        raise _Refused(400, "the request body must be a JSON object", "body")
    for name in body:
        if name not in allowed:
            expected = ", ".join(allowed)
            raise _Refused(
                400, f"unknown parameter {name!r} (expected: {expected})", name
            )
    return body


def _strings(body, name, required=False):
    """``body[name]``: a non-empty list of non-empty strings, or None when
    absent and not ``required`` (a null is refused: ``{"queues": null}``
    from a client's bug must not clear every queue)."""
    if name not in body and not required:
        return None
    value = body.get(name)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise _Refused(
            400, f"{name!r} must be a non-empty list of strings, got {value!r}", name
        )
    return value


def _boolean(name, text):
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise _Refused(400, f"{name}={text!r} is not true or false", name)


# -- the views ---------------------------------------------------------------

_LIST = {
    "state": True,
    "queue": True,
    "name": True,
    "title": False,
    "error": False,
    "created_after": False,
    "created_before": False,
    "finished_after": False,
    "finished_before": False,
    "before": False,
    "limit": False,
    "workspace": True,
}


@_api()
def list_jobs(request, service):
    """Newest first; ``before`` in the answer is the next page's (null on
    the last page).  A page of a search (``title``, ``error``, finished
    times) may hold fewer jobs than ``limit`` and still have a next page:
    the older jobs were not searched yet."""
    query = _query(request, _LIST)
    found = service.list_page(**query)  # checks every parameter, limit too
    jobs, following = found["jobs"], found["searched"]
    if following is None and jobs and len(jobs) == int(query.get("limit", 50)):
        # A full page: one more row after it, or this is the last page.
        more = service.list_page(**{**query, "before": jobs[-1]["id"], "limit": 1})
        following = jobs[-1]["id"] if more["jobs"] or more["searched"] else None
    return {"jobs": jobs, "before": following}


@_api()
def show_job(request, service):
    _query(request, {})
    return service.get(request.matchdict["id"])


@_api(id="ids")
def cancel_jobs(request, service):
    return {"jobs": service.cancel(_strings(_body(request, ("ids",)), "ids", True))}


@_api(id="ids")
def retry_jobs(request, service):
    return {"jobs": service.retry(_strings(_body(request, ("ids",)), "ids", True))}


@_api(id="ids")
def run_now_jobs(request, service):
    return {"jobs": service.run_now(_strings(_body(request, ("ids",)), "ids", True))}


@_api(queue="queues")
def clear_queues(request, service):
    return service.clear(_strings(_body(request, ("queues",)), "queues"))


@_api()
def test_job(request, service):
    queue = _body(request, ("queue",)).get("queue")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise _Refused(400, f"'queue' must be a queue name, got {queue!r}", "queue")
    return {"id": service.test(queue=queue)}


@_api()
def depth(request, service):
    query = _query(request, {"include_scheduled": False})
    scheduled = _boolean("include_scheduled", query.get("include_scheduled", "false"))
    return {"queues": service.depth(include_scheduled=scheduled)}


@_api()
def metrics(request, service):
    """The job table's metrics, in the format the scraper asks for."""
    from prometheus_client.exposition import choose_encoder

    from .metrics import JobMetrics

    _query(request, {})
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = Response(encode(JobMetrics(service.store, service.jobs.settings)))
    response.headers["Content-Type"] = content_type
    response.cache_control.no_store = True
    return response


# -- refusals before the view --------------------------------------------------


def _forbidden(exc, request):
    return _error(403, "forbidden: this needs a permission you do not have")


def _bad_csrf(exc, request):
    return _error(
        400,
        "missing or wrong CSRF token: send the session's token in the "
        "X-CSRF-Token header",
        "X-CSRF-Token",
    )


def _wrong_method(allowed):
    def wrong_method(exc, request):
        message = f"method {request.method} is not allowed here: use {allowed}"
        response = _error(405, message)
        response.allow = [allowed]
        return response

    return wrong_method


# (route, pattern, method, view, needs the manage permission)
_ENDPOINTS = (
    ("list", "/jobs", "GET", list_jobs, False),
    ("show", "/jobs/{id}", "GET", show_job, False),
    ("cancel", "/cancel", "POST", cancel_jobs, True),
    ("retry", "/retry", "POST", retry_jobs, True),
    ("run-now", "/run-now", "POST", run_now_jobs, True),
    ("clear", "/clear", "POST", clear_queues, True),
    ("test", "/test", "POST", test_job, True),
    ("depth", "/depth", "GET", depth, False),
    ("metrics", "/metrics", "GET", metrics, False),
)


def includeme(config):
    """Serve the API under ``tasks.jobs.api_prefix`` (needs
    ``pyramid_tasks.jobs``, a security policy and a CSRF token store)."""
    settings = parse_jobs_settings(config.get_settings())
    endpoints = _ENDPOINTS
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        endpoints = endpoints[:-1]
        log.info(
            "%s/metrics is not served: prometheus_client is not installed "
            "(pip install 'pyramid_tasks[metrics]').",
            settings.api_prefix,
        )
    for name, pattern, method, view, manage in endpoints:
        route = _ROUTE + name
        config.add_route(route, settings.api_prefix + pattern)
        permission = settings.manage_permission if manage else settings.view_permission
        config.add_view(
            view,
            route_name=route,
            request_method=method,
            permission=permission,
            require_csrf=True,  # checked on unsafe methods only
        )
        config.add_forbidden_view(_forbidden, route_name=route)
        config.add_exception_view(_bad_csrf, context=BadCSRFToken, route_name=route)
        config.add_exception_view(
            _wrong_method(method), context=PredicateMismatch, route_name=route
        )
    config.action(
        "pyramid_tasks:jobs.api",
        _action(_check, config.registry),
        # After the security and CSRF policies (order 0), before
        # check_jobs_settings (order 2).
        order=1,
    )


def _check(registry):
    """Refuse an API that could not work, or that anyone could use."""
    check_operator_include(registry, _INCLUDE)
