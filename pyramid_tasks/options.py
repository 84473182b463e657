"""``apply_async`` options checked at the call: the job options (``title=``,
``unique_key=``, ``workspace=``) and a countdown or eta that Redis would
deliver early."""

import json
import logging
from datetime import UTC, datetime

from celery.utils.time import maybe_make_aware
from dateutil.parser import isoparse
from kombu.utils import json as kombu_json

from .datamanager import _check_times

__all__ = ["TITLE_HEADER", "WORKSPACE_HEADER", "job_options", "warn_far_eta"]

log = logging.getLogger(__name__)

# The message header carrying a job's ``title=`` to the worker, for a job
# whose row the worker makes (sent without ``tm=``).
TITLE_HEADER = "pyramid_tasks_title"
# The same for its ``workspace=``.
WORKSPACE_HEADER = "pyramid_tasks_workspace"


def job_options(task, jobs, options):
    """Take ``title=``, ``unique_key=`` and ``workspace=`` out of
    ``options``, checked: ``(title, unique_key, workspace)``.

    They are columns of the job row, never message options: Celery would put
    an option it does not know in the message's properties.  The workspace
    comes back as the row keeps it (:func:`checked_workspace`).
    """
    title = options.pop("title", None)
    unique_key = options.pop("unique_key", None)
    workspace = options.pop("workspace", None)
    if title is None and unique_key is None and workspace is None:
        return None, None, None
    given = (("title", title), ("unique_key", unique_key), ("workspace", workspace))
    for name, value in given:
        if value is None:
            continue
        if jobs is None:
            raise TypeError(
                f"{task.name}.apply_async({name}=...) needs the job table: "
                "include pyramid_tasks.jobs (config.include('pyramid_tasks.jobs')"
                f" or pyramid.includes), or leave out {name}=."
            )
        if name == "workspace":
            workspace = checked_workspace(value, f"{task.name}.apply_async")
        elif not isinstance(value, str) or not 0 < len(value) <= _MAX_LENGTH:
            raise ValueError(
                f"{task.name}.apply_async({name}={value!r:.80}): expected a "
                f"string of 1 to {_MAX_LENGTH} characters"
            )
    return title, unique_key, workspace


def checked_workspace(value, where):
    """``value`` as a job's workspace keeps it: a JSON object (a dict with
    text keys) as Celery's JSON serializer writes it (kombu's markers for
    dates, decimals, UUIDs); else ``ValueError`` naming ``where``."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(
            f"{where}(workspace={value!r:.80}): expected a dict with text keys "
            "(a JSON object)"
        )
    try:
        return json.loads(kombu_json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}(workspace=...): a workspace is kept as JSON, and {exc}"
        ) from exc


# The length of the title and unique_key columns.
_MAX_LENGTH = 255


def warn_far_eta(task, options):
    """Warn when a countdown or eta is further away than the Redis broker's
    ``visibility_timeout``: Redis gives a message a worker holds back (an eta
    task waits unacknowledged in the worker) to a worker again after that
    long, so the task would run again, early and more than once."""
    if "countdown" not in options and "eta" not in options:
        return
    timeout = _redis_visibility_timeout(task.app)
    if timeout is None:
        return
    _check_times(task, options)
    eta, countdown = options.get("eta"), options.get("countdown")
    if eta is not None:
        if isinstance(eta, str):
            eta = isoparse(eta)
        ahead = (maybe_make_aware(eta) - datetime.now(UTC)).total_seconds()
    else:
        ahead = countdown or 0
    if ahead > timeout:
        log.warning(
            "Task %s is due in %d s, beyond the Redis broker's "
            "visibility_timeout (%d s): Redis delivers it again every %d s "
            "until it runs, so it runs early and more than once. Raise "
            "celery.broker_transport_options.visibility_timeout above your "
            "longest countdown, or schedule it later (beat).",
            task.name,
            ahead,
            timeout,
            timeout,
        )


def _redis_visibility_timeout(app):
    """The ``visibility_timeout`` of ``app``'s Redis broker (kombu's default
    3600 s), or None for another transport or in eager mode; once per app."""
    try:
        return app.pyramid_visibility_timeout
    except AttributeError:
        timeout = None
        if not app.conf.task_always_eager:
            with app.connection_for_write() as connection:
                if getattr(connection.transport, "driver_type", None) == "redis":
                    options = app.conf.broker_transport_options or {}
                    timeout = options.get("visibility_timeout", 3600)
        app.pyramid_visibility_timeout = timeout
        return timeout
