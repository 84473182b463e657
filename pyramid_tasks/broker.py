"""Which broker the Celery app will use, checked when the app is built.

Without a broker URL Celery falls back to kombu's default, ``amqp://localhost``,
and a RabbitMQ that happens to answer there takes the app's tasks: that is a
configuration error here, not a default.
"""

import logging
import os

from pyramid.exceptions import ConfigurationError

from .masking import mask_secrets

__all__ = ["check_broker", "warn_environment_overrides"]

log = logging.getLogger(__name__)

# The settings Celery reads from the environment in preference to its own
# configuration (``celery.app.utils.Settings``).
_ENVIRONMENT_OVERRIDES = {
    "CELERY_BROKER_URL": "broker_url",
    "CELERY_BROKER_READ_URL": "broker_read_url",
    "CELERY_BROKER_WRITE_URL": "broker_write_url",
    "CELERY_RESULT_BACKEND": "result_backend",
}
_SIDES = {"read": "consume from", "write": "publish to"}
_EXAMPLE = "for example redis://127.0.0.1:6379/0"


def check_broker(conf, eager_ok=True):
    """Refuse Celery's fallback broker: raise :class:`ConfigurationError`.

    ``conf`` is the Celery app's ``conf``.  A broker is set by
    ``celery.broker_url`` (or Celery's legacy ``celery.broker_host``, or both
    ``celery.broker_read_url`` and ``celery.broker_write_url``), or by the
    ``CELERY_BROKER_URL`` environment variable, which Celery honours.  Eager
    mode (``celery.task_always_eager = true``) needs none, unless ``eager_ok``
    is false: ``tasks-celery`` always talks to a broker.
    """
    eager = conf.task_always_eager
    if eager and eager_ok:
        return
    # Celery's own resolution: the environment, then broker_read_url or
    # broker_write_url, then broker_url, then broker_host; None means kombu's
    # default, amqp://localhost.
    missing = [side for side in _SIDES if not getattr(conf, f"broker_{side}_url")]
    if not missing:
        return
    if eager:
        advice = (
            "eager mode (celery.task_always_eager = true) runs tasks in the web "
            "process without one, but workers, beat and every tasks-celery "
            f"command need one: set celery.broker_url, {_EXAMPLE}"
        )
    else:
        advice = (
            f"set celery.broker_url, {_EXAMPLE}, or celery.task_always_eager = "
            "true to run tasks in-process without a broker (development); "
            "Celery would otherwise use amqp://localhost"
        )
    if len(missing) == 2:
        raise ConfigurationError(f"No broker: {advice}.")
    [side] = missing
    raise ConfigurationError(
        f"No broker to {_SIDES[side]}: neither celery.broker_{side}_url nor "
        f"celery.broker_url is set; {advice}."
    )


def warn_environment_overrides(conf):
    """Log a WARNING for each setting Celery will take from the environment.

    ``conf`` is the parsed ``celery.*`` settings.  Celery prefers
    ``CELERY_BROKER_URL`` (and its read/write twins, and
    ``CELERY_RESULT_BACKEND``) to the INI's value.
    """
    for variable, name in _ENVIRONMENT_OVERRIDES.items():
        value = os.environ.get(variable)
        if value and conf.get(name) and value != conf[name]:
            log.warning(
                "The environment variable %s = %s overrides celery.%s = %s "
                "(Celery gives the environment precedence).",
                variable,
                mask_secrets(value),
                name,
                mask_secrets(conf[name]),
            )
