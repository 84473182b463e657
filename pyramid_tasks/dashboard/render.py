"""Rendering the dashboard's pages: Jinja2 templates, autoescaped, and the
small formatting helpers they use."""

import json
from datetime import datetime

from jinja2 import Environment, PackageLoader, StrictUndefined
from pyramid.csrf import get_csrf_token
from pyramid.response import Response

from ..jobs.model import utcnow
from . import ROUTE
from .counts import CAP

__all__ = ["ago", "count", "pretty", "redacted", "render", "when"]

_env = Environment(
    loader=PackageLoader("pyramid_tasks.dashboard", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# -- formatting ----------------------------------------------------------------


def parse_time(text):
    """An ISO time of :func:`.job_json` as an aware datetime (None: None)."""
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


def when(text):
    """``(UTC time, "5 min ago" or "in 1 h")`` of an ISO time of
    :func:`.job_json` (or an aware datetime), or None."""
    value = text if isinstance(text, datetime) else parse_time(text)
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


def pretty(value, pattern):
    return json.dumps(redacted(value, pattern), indent=2, ensure_ascii=False)


def count(number, about=None, cap=CAP):
    """A capped count: ``"about 12,345"`` with an estimate above the cap,
    ``"1000+"`` without (or when the estimate is below the cap: stale)."""
    if number <= cap:
        return str(number)
    if about is not None and about > cap:
        return f"about {about:,}"
    return f"{cap}+"


_env.filters.update(count=count, ago=ago)


# -- rendering -----------------------------------------------------------------


def dashboard_settings(request):
    return request.registry.pyramid_tasks_dashboard


def render(request, template, status=200, **values):
    """The page ``template`` with ``values``, uncached."""
    settings = dashboard_settings(request)
    can_act = not settings.read_only and bool(
        request.has_permission(settings.manage_permission)
    )
    body = _env.get_template(template).render(
        request=request,
        route=lambda route_name, **kw: request.route_path(ROUTE + route_name, **kw),
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
