"""Which broker the Celery app will use, checked when the app is built.

Without a broker URL Celery falls back to kombu's default, ``amqp://localhost``,
and a RabbitMQ that happens to answer there takes the app's tasks: that is a
configuration error here, not a default.
"""

import logging
import os
from contextvars import ContextVar

from kombu.transport import get_transport_cls
from pyramid.exceptions import ConfigurationError

from .masking import mask_secrets
from .settings import as_bool

__all__ = [
    "broker_required",
    "check_broker",
    "default_confirms",
    "warn_environment_overrides",
]

log = logging.getLogger(__name__)

# True while tasks-celery loads its INI: every Celery command talks to a
# broker, so neither eager mode nor pyramid_tasks.testing spares the app one.
broker_required = ContextVar("pyramid_tasks_broker_required", default=False)

_SIDES = {"read": "consume from", "write": "publish to"}
_EXAMPLE = "for example redis://127.0.0.1:6379/0"


# The transports kombu falls back to without a URL or celery.broker_transport
# (kombu.Connection: ``transport or "amqp"``): named without a URL they still
# mean amqp://localhost.
_DEFAULT_TRANSPORTS = {"", "amqp", "pyamqp", "librabbitmq"}


def check_broker(conf, eager_ok=True):
    """Refuse Celery's fallback broker: raise :class:`ConfigurationError`.

    ``conf`` is the Celery app's ``conf``.  A broker is set by
    ``celery.broker_url`` (or Celery's legacy ``celery.broker_host``, or both
    ``celery.broker_read_url`` and ``celery.broker_write_url``), or by the
    ``CELERY_BROKER_URL`` environment variable, which Celery honours, or by a
    ``celery.broker_transport`` that needs no URL (``memory``), any but
    AMQP's.  Eager mode (``celery.task_always_eager = true``) needs none,
    unless ``eager_ok`` is false: ``tasks-celery`` always talks to a broker.
    """
    eager = conf.task_always_eager
    if eager and eager_ok:
        return
    # Celery's own resolution (Celery._connection): the side's URL (the
    # environment, then broker_read_url or broker_write_url, then broker_url,
    # then broker_host) and broker_transport, which kombu uses when the URL is
    # None; with neither, kombu's default, amqp://localhost.
    if str(conf.broker_transport or "").strip() not in _DEFAULT_TRANSPORTS:
        return
    missing = [side for side in _SIDES if not getattr(conf, f"broker_{side}_url")]
    if not missing:
        return
    if eager:
        advice = (
            "eager mode (celery.task_always_eager = true) runs tasks in the web "
            "process without one, but workers, beat and every tasks-celery "
            f"command need one: set celery.broker_url, {_EXAMPLE}"
        )
    elif eager_ok:
        advice = (
            f"set celery.broker_url, {_EXAMPLE}, or celery.task_always_eager = "
            "true to run tasks in-process without a broker (development); "
            "Celery would otherwise use amqp://localhost"
        )
    else:
        advice = (
            f"set celery.broker_url, {_EXAMPLE}; Celery would otherwise use "
            "amqp://localhost"
        )
    if len(missing) == 2:
        raise ConfigurationError(f"No broker: {advice}.")
    [side] = missing
    raise ConfigurationError(
        f"No broker to {_SIDES[side]}: neither celery.broker_{side}_url nor "
        f"celery.broker_url is set; {advice}."
    )


# The URL schemes (and celery.broker_transport names) of kombu's AMQP
# transports; ``amqp`` is py-amqp unless librabbitmq is installed.
_AMQP_TRANSPORTS = {"amqp", "amqps", "pyamqp", "pyamqps"}
_CONFIRM_KEY = "celery.broker_transport_options.confirm_publish"


def default_confirms(app):
    """Turn RabbitMQ's publisher confirms on, unless the INI chose.

    On a py-amqp broker (``amqp://``, ``pyamqp://``) each publish is then
    acknowledged by the broker, and one it refuses (an exchange that does not
    exist, a full queue with ``x-overflow = reject-publish``) is an error
    instead of a message silently lost.  ``celery.broker_transport_options.
    confirm_publish = false`` turns them off; the value is a strict boolean.
    """
    options = app.conf.broker_transport_options
    if "confirm_publish" in options:
        confirm = as_bool(_CONFIRM_KEY, options["confirm_publish"])
    elif app.conf.broker_write_url and _pyamqp(app):
        confirm = True
    else:
        return
    # A new dict: Celery's default one is shared by every app.
    app.conf.broker_transport_options = {**options, "confirm_publish": confirm}


def _pyamqp(app):
    """Whether the app publishes through py-amqp (no connection is made)."""
    alias = app.connection_for_write().transport_cls
    return (
        isinstance(alias, str)
        and alias in _AMQP_TRANSPORTS
        and get_transport_cls(alias).driver_name == "py-amqp"
    )


def _first(pairs):
    """The first ``(name, value)`` whose value is set, or ``(None, None)``."""
    return next(((name, value) for name, value in pairs if value), (None, None))


def _overrides(conf):
    """``(variable, value, setting, ini_value, sides)`` of each override.

    For each side of the broker, Celery takes its URL from the first of
    CELERY_BROKER_<SIDE>_URL, broker_<side>_url, CELERY_BROKER_URL,
    broker_url, broker_host that is set (``celery.app.utils.Settings``); the
    INI alone would give the first of its own three.  The environment
    overrides the INI when it gives that side another URL.
    """
    found = {}
    for side in _SIDES:
        environment = os.environ.get(f"CELERY_BROKER_{side.upper()}_URL")
        setting = f"broker_{side}_url"
        variable, value = _first(
            [
                (f"CELERY_BROKER_{side.upper()}_URL", environment),
                (None, conf.get(setting)),
                ("CELERY_BROKER_URL", os.environ.get("CELERY_BROKER_URL")),
            ]
        )
        name, ini_value = _first(
            [(n, conf.get(n)) for n in (setting, "broker_url", "broker_host")]
        )
        if variable and ini_value and value != ini_value:
            found.setdefault((variable, value, name, ini_value), []).append(side)
    value = os.environ.get("CELERY_RESULT_BACKEND")
    ini_value = conf.get("result_backend")
    if value and ini_value and value != ini_value:
        found[("CELERY_RESULT_BACKEND", value, "result_backend", ini_value)] = []
    return [(*key, sides) for key, sides in found.items()]


def warn_environment_overrides(conf):
    """Log a WARNING for each setting Celery will take from the environment.

    ``conf`` is the parsed ``celery.*`` settings.  Celery prefers
    ``CELERY_BROKER_URL`` (and its read/write twins, and
    ``CELERY_RESULT_BACKEND``) to the INI's value: a WARNING names the
    variable and the setting it overrides (for one side of the broker only,
    which side).
    """
    for variable, value, name, ini_value, sides in _overrides(conf):
        where = f" as the broker to {_SIDES[sides[0]]}" if len(sides) == 1 else ""
        log.warning(
            "The environment variable %s = %s overrides celery.%s = %s%s "
            "(Celery gives the environment precedence).",
            variable,
            mask_secrets(value),
            name,
            mask_secrets(ini_value),
            where,
        )
