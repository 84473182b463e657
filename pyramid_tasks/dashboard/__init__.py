"""The jobs dashboard: ``config.include('pyramid_tasks.dashboard')``.

HTML pages over the job table, rendered inside the host app under
``tasks.dashboard.prefix`` (default ``/_tasks``)::

    GET  /                     overview: per queue, what waits, runs, failed
    GET  /jobs                 the jobs, filtered (?state= &queue= &name= &title=
                               &workspace=key=value ...)
    GET  /jobs/{id}            one job: every field, its timeline and progress
    GET  /failures             the failed jobs grouped by signature
    GET  /periodic             the beat entries, their last and next runs
    GET  /workers              the workers that answer, and what they run
    GET  /queues               per queue its counts and consumers
    POST /jobs/{id}/retry      run a failed, cancelled or dead job again
    POST /jobs/{id}/cancel     cancel an unfinished job
    POST /jobs/{id}/delete     delete a finished job
    POST /actions/retry        the same for the checked jobs (``id=``...)
    POST /actions/cancel
    POST /actions/delete
    GET  /queues/{queue}/clear ask, then POST: cancel the waiting jobs of a
                               queue and purge it at the broker
    POST /periodic/{name}/run  send a beat entry's task now
    POST /failures/{key}/retry retry (or /delete) every job of a failure group
    POST /jobs/{id}/run        run a scheduled job now (/actions/run: checked)
    POST /queues/{queue}/pause stop the workers consuming a queue (/resume)
    GET  /bulk/{action}        ask, then POST: retry, cancel or delete every
                               job matching the list's filters, as a job

Reading needs ``tasks.jobs.view_permission`` (``tasks.view``), acting
``tasks.jobs.manage_permission`` (``tasks.manage``) and the CSRF token the
forms carry; ``tasks.dashboard.read_only = true`` hides the actions and
refuses them.  Keys of the jobs' arguments matching ``tasks.dashboard.redact``
are shown as ``***``.  The work is :class:`.jobs.service.JobService`'s, as
for the ``jobs`` command and the JSON API.
"""

import re
from dataclasses import dataclass

from ..config import _action
from ..jobs.access import check_operator_include
from ..settings import _route_prefix, as_bool, bad_setting, parse_jobs_settings
from .events import JobsActedOn

__all__ = ["DashboardSettings", "JobsActedOn", "includeme", "parse_dashboard_settings"]

_INCLUDE = "pyramid_tasks.dashboard"
ROUTE = "pyramid_tasks.dashboard."

#: Argument names shown as ``***`` by default (searched, any case).
DEFAULT_REDACT = "password|passwd|secret|token|key|credential|authorization"


@dataclass(frozen=True)
class DashboardSettings:
    """The parsed ``tasks.dashboard.*`` settings."""

    prefix: str = "/_tasks"
    read_only: bool = False
    redact: re.Pattern = re.compile(DEFAULT_REDACT, re.IGNORECASE)
    # The permissions are the JSON API's: ``tasks.jobs.*_permission``.
    view_permission: str = "tasks.view"
    manage_permission: str = "tasks.manage"


def _redact(key, value):
    try:
        return re.compile(str(value).strip(), re.IGNORECASE)
    except re.error as exc:
        raise bad_setting(key, value, f"a regular expression ({exc})") from exc


_KEYS = {
    "prefix": _route_prefix,
    "read_only": as_bool,
    "redact": _redact,
}


def parse_dashboard_settings(settings, prefix="tasks.dashboard."):
    """:class:`DashboardSettings` from ``tasks.dashboard.*`` (and the
    permission names of ``tasks.jobs.*``); unknown keys are errors."""
    from ..settings import _unknown_key

    values = {}
    for key, value in settings.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            if name not in _KEYS:
                raise _unknown_key(key, name, list(_KEYS), prefix)
            values[name] = _KEYS[name](key, value)
    jobs = parse_jobs_settings(settings)
    return DashboardSettings(
        **values,
        view_permission=jobs.view_permission,
        manage_permission=jobs.manage_permission,
    )


def includeme(config):
    """Serve the dashboard under ``tasks.dashboard.prefix`` (needs
    ``pyramid_tasks.jobs``, a security policy and a CSRF token store)."""
    from .actions import add_actions
    from .bulk import add_bulk
    from .queues import add_queues
    from .views import add_pages

    settings = parse_dashboard_settings(config.get_settings())
    config.registry.pyramid_tasks_dashboard = settings
    add_pages(config, settings)
    add_actions(config, settings)
    add_queues(config, settings)
    add_bulk(config, settings)
    config.action(
        "pyramid_tasks:dashboard",
        _action(check_operator_include, config.registry, _INCLUDE),
        # After the security and CSRF policies (order 0), before
        # check_jobs_settings (order 2).
        order=1,
    )
