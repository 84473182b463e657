"""Pure parsing of the ``celery.*`` and ``tasks.*`` settings.

Every function here takes the Pyramid settings mapping and returns plain
values; none touches Celery's app, the network or the registry, so each is
unit-testable on a dict.  Every bad value raises
:class:`pyramid.exceptions.ConfigurationError` naming the full key and the
value (passwords in URLs masked), chained from the cause.
"""

import difflib
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from celery.app.defaults import NAMESPACES, flatten
from pyramid.exceptions import ConfigurationError

from .masking import mask_secrets

__all__ = [
    "JOBS_INCLUDE_KEYS",
    "REDBEAT_OPTIONS",
    "JobsSettings",
    "TasksSettings",
    "bad_setting",
    "mask_secrets",
    "parse_celery_settings",
    "parse_duration",
    "parse_jobs_settings",
    "parse_tasks_settings",
]

CELERY_PREFIX = "celery."
TASKS_PREFIX = "tasks."

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})

# Celery's own option table: lowercase name -> Option (its type drives coercion).
_CELERY_OPTIONS = dict(flatten(NAMESPACES))

# Settings whose value names a serializer; pickle in any of them needs opt-in.
_SERIALIZER_KEYS = (
    "task_serializer",
    "result_serializer",
    "event_serializer",
    "accept_content",
    "result_accept_content",
)
# Pickle by name, or by the content type kombu registers it under.
_PICKLE_WORDS = ("pickle", "application/x-python-serialize")


def bad_setting(key, value, expected):
    """The :class:`ConfigurationError` for ``key = value`` not being ``expected``.

    Raise it ``from`` the cause.
    """
    return ConfigurationError(
        f"Invalid setting {key} = {mask_secrets(value)!r}: expected {expected}."
    )


def _unknown_key(key, name, candidates, prefix):
    message = f"Unknown setting {key}"
    close = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    if close:
        message += f": did you mean {prefix}{close[0]}?"
    return ConfigurationError(message)


def as_bool(key, value):
    """A strict boolean: only true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise bad_setting(key, value, "one of true/false, yes/no, on/off, 1/0")


def as_int(key, value, minimum=None):
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise bad_setting(key, value, "an integer") from exc
    if minimum is not None and number < minimum:
        raise bad_setting(key, value, f"an integer >= {minimum}")
    return number


def as_float(key, value, minimum=None):
    try:
        number = float(str(value).strip())
    except ValueError as exc:
        raise bad_setting(key, value, "a number") from exc
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        expected = "a finite number" if minimum is None else f"a number >= {minimum}"
        raise bad_setting(key, value, expected)
    return number


def as_json(key, value, kind):
    """Decode JSON and check it is a ``kind`` (``dict`` or ``list``)."""
    name = {dict: "a JSON object", list: "a JSON list"}[kind]
    if isinstance(value, kind):
        return value
    try:
        decoded = json.loads(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise bad_setting(key, value, name) from exc
    if not isinstance(decoded, kind):
        raise bad_setting(key, value, name)
    return decoded


def _as_words(value):
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and value.lstrip().startswith("["):
        decoded = _loose_json(value)  # a JSON list is taken as one, too
        if isinstance(decoded, list):
            return [str(word) for word in decoded]
    return [word for word in re.split(r"[\s,]+", str(value)) if word]


def _loose_json(value):
    """JSON when the text is JSON (numbers, objects, true), else the text.

    A value that is not text (settings given as Python objects) is kept as is.
    """
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value.strip()


# Where Celery's table says less than Celery accepts or needs: "any" settings
# that want a number, and bool settings that also take a dict of TLS options.
_KIND_OVERRIDES = {
    "worker_concurrency": "int_or_auto",
    "broker_use_ssl": "bool_or_dict",
    "redis_backend_use_ssl": "bool_or_dict",
}


def _kind(name, option):
    return _KIND_OVERRIDES.get(name, option.type)


# The settings of RedBeat (``celery-redbeat``, the ``redbeat`` extra), which
# it reads from the Celery app's configuration: name -> kind, as above.
REDBEAT_OPTIONS = {
    "redbeat_redis_url": "redis_url",
    "redbeat_key_prefix": "redis_key",
    "redbeat_lock_key": "redis_key",
    "redbeat_lock_timeout": "positive_int",
    "redbeat_redis_options": "dict",
    "redbeat_redis_use_ssl": "bool_or_dict",
}
# The URL schemes RedBeat connects with (redbeat/schedulers.py, get_redis).
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis-sentinel", "redis-cluster")
_REDIS_URL = "a Redis URL (" + ", ".join(f"{s}://" for s in _REDIS_SCHEMES) + ")"


def _redis_url(key, value):
    url = str(value).strip()
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # a broken IPv6 host: ``redis://[::1``
        raise bad_setting(key, value, _REDIS_URL) from exc
    if scheme not in _REDIS_SCHEMES:
        raise bad_setting(key, value, _REDIS_URL)
    return url


def _redis_key(key, value):
    # An empty lock key would turn RedBeat's lock off: two beats, two sends.
    text = str(value).strip()
    if not text or any(c.isspace() for c in text):
        raise bad_setting(key, value, "a Redis key name (not empty, no spaces)")
    return text


def _coerce_celery(key, kind, value):
    if kind == "int_or_auto":
        if str(value).strip() == "auto":
            return "auto"
        try:
            return as_int(key, value, minimum=1)
        except ConfigurationError as exc:
            raise bad_setting(key, value, "an integer >= 1 or auto") from exc
    if kind == "bool_or_dict":
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return as_json(key, value, dict)
        return as_bool(key, value)
    if kind == "bool":
        return as_bool(key, value)
    if kind == "positive_int":
        return as_int(key, value, minimum=1)
    if kind == "redis_url":
        return _redis_url(key, value)
    if kind == "redis_key":
        return _redis_key(key, value)
    if kind in ("int", int):
        return as_int(key, value)
    if kind == "float":
        return as_float(key, value)
    if kind == "dict":
        return as_json(key, value, dict)
    if kind == "list":
        return _as_words(value)
    if kind == "tuple":
        return tuple(_as_words(value))
    if kind == "any":
        return _any_value(key, value)
    return value.strip() if isinstance(value, str) else value


def _any_value(key, value):
    """JSON for what looks like JSON (an error if it is broken), else the text."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise bad_setting(key, value, "valid JSON") from exc
    return _loose_json(value)


def parse_celery_settings(settings, prefix=CELERY_PREFIX):
    """Celery configuration from ``celery.<name>`` settings.

    Values are coerced with Celery's own option table; RedBeat's settings
    (``celery.redbeat_*``, :data:`REDBEAT_OPTIONS`) are known too.  Dict settings take
    JSON or dotted sub-keys (``celery.broker_transport_options.visibility_timeout``;
    sub-key values are JSON when they parse as JSON, text otherwise).
    """
    conf, sub_keys = {}, {}
    for key, value in settings.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        head, _, sub = name.partition(".")
        option = _CELERY_OPTIONS.get(head)
        if option is None and head not in REDBEAT_OPTIONS:
            raise _unknown_key(key, head, [*_CELERY_OPTIONS, *REDBEAT_OPTIONS], prefix)
        if head == "beat_schedule":
            raise ConfigurationError(
                f"Setting {key} is not supported: declare each beat entry as "
                f"tasks.beat.<name>.task and tasks.beat.<name>.schedule instead."
            )
        kind = REDBEAT_OPTIONS[head] if option is None else _kind(head, option)
        if sub:
            if kind not in ("dict", "bool_or_dict"):
                raise ConfigurationError(
                    f"Invalid setting {key}: {prefix}{head} is not a dict "
                    "setting, so it takes no dotted sub-keys."
                )
            sub_keys.setdefault(head, {})[sub] = _loose_json(value)
        else:
            conf[head] = _coerce_celery(key, kind, value)
    for head, extra in sub_keys.items():
        base = conf.get(head)
        conf[head] = {**(base if isinstance(base, dict) else {}), **extra}
    return conf


def check_serializers(conf, allow_pickle, prefix=CELERY_PREFIX):
    """Refuse pickle unless ``tasks.allow_pickle = true``."""
    if allow_pickle:
        return
    for name in _SERIALIZER_KEYS:
        value = conf.get(name)
        words = _as_words(value) if value is not None else []
        if any(bad in str(word).lower() for word in words for bad in _PICKLE_WORDS):
            raise ConfigurationError(
                f"Setting {prefix}{name} = {value!r} enables pickle, which runs "
                "arbitrary code from the broker. Use json, or opt in with "
                f"{TASKS_PREFIX}allow_pickle = true."
            )


@dataclass(frozen=True)
class TasksSettings:
    """The parsed ``tasks.*`` settings (beat entries aside)."""

    site_url: str = "http://localhost"
    queue_prefix: str = ""
    # Eight workers incrementing one row under SERIALIZABLE lost 2-8 % of the
    # increments with 3 attempts; the slowest of 9,600 needed 10 attempts
    # (bench/contention.py, docs/transactions.rst).
    retry_attempts: int = 20
    retry_backoff: float = 0.1
    retry_backoff_max: float = 2.0
    allow_pickle: bool = False
    publish_timeout: float | None = 2.0
    # Seconds; sets celery.task_time_limit (CKAN's ckan.jobs.timeout).
    default_time_limit: float | None = None

    def queue_name(self, name):
        """``name`` with ``tasks.queue_prefix`` applied (idempotent)."""
        if not self.queue_prefix or name.startswith(f"{self.queue_prefix}."):
            return name
        return f"{self.queue_prefix}.{name}"


def _site_url(key, value):
    url = str(value).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise bad_setting(
            key, value, "an http(s) URL such as https://example.com/app"
        ) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_setting(key, value, "an http(s) URL such as https://example.com/app")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise bad_setting(key, value, "a URL without query, fragment or credentials")
    return url


def _queue_prefix(key, value):
    prefix = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]*", prefix):
        raise bad_setting(key, value, "a queue-name prefix of letters, digits, _ . : -")
    return prefix


_PUBLISH_TIMEOUT = "a number of seconds > 0 (2, 2.5, 2s), or none for no bound"


def _publish_timeout(key, value):
    """Seconds (``2``, ``2.5``, ``2s``) above zero; ``none`` turns the bound off."""
    text = str(value).strip().lower()
    if value is None or text == "none":
        return None
    try:
        seconds = float(text.removesuffix("s"))
    except ValueError as exc:
        raise bad_setting(key, value, _PUBLISH_TIMEOUT) from exc
    if not math.isfinite(seconds) or seconds <= 0:
        raise bad_setting(key, value, _PUBLISH_TIMEOUT)
    return seconds


_TASKS_KEYS = {
    "site_url": ("site_url", _site_url),
    "queue_prefix": ("queue_prefix", _queue_prefix),
    "retry.attempts": ("retry_attempts", lambda k, v: as_int(k, v, minimum=1)),
    "retry.backoff": ("retry_backoff", lambda k, v: as_float(k, v, minimum=0)),
    "retry.backoff_max": ("retry_backoff_max", lambda k, v: as_float(k, v, minimum=0)),
    "allow_pickle": ("allow_pickle", as_bool),
    "publish_timeout": ("publish_timeout", _publish_timeout),
    # parse_duration is defined below: looked up at the call.
    "default_time_limit": (
        "default_time_limit",
        lambda k, v: parse_duration(k, v, positive=True),
    ),
}


def parse_tasks_settings(settings, prefix=TASKS_PREFIX):
    """:class:`TasksSettings` from ``tasks.*`` (``tasks.beat.*`` is skipped).

    An unknown ``tasks.*`` key is an error, with a suggestion.
    """
    values = {}
    for key, value in settings.items():
        if not key.startswith(prefix) or key.startswith(
            # Each parsed by its own include.
            (f"{prefix}beat.", f"{prefix}jobs.", f"{prefix}dashboard.")
        ):
            continue
        name = key[len(prefix) :]
        if name not in _TASKS_KEYS:
            candidates = [*_TASKS_KEYS, "beat.<name>.task"]
            candidates += [f"jobs.{job_key}" for job_key in _JOBS_KEYS]
            raise _unknown_key(key, name, candidates, prefix)
        field, parse = _TASKS_KEYS[name]
        values[field] = parse(key, value)
    parsed = TasksSettings(**values)
    if parsed.retry_backoff_max < parsed.retry_backoff:
        raise bad_setting(
            f"{prefix}retry.backoff_max",
            parsed.retry_backoff_max,
            f"a number >= {prefix}retry.backoff ({parsed.retry_backoff})",
        )
    return parsed


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_DURATION_EXPECTED = "a duration such as 0.2, 200ms, 10s, 5m, 2h or 7d"


def parse_duration(key, value, positive=False):
    """Seconds from ``10``, ``2.5``, ``200ms``, ``10s``, ``5m``, ``2h``, ``7d``."""
    match = _DURATION.fullmatch(str(value).strip().lower())
    if match is None:
        raise bad_setting(key, value, _DURATION_EXPECTED)
    seconds = float(match[1]) * _UNITS[match[2]]
    if positive and seconds == 0:
        raise bad_setting(key, value, f"{_DURATION_EXPECTED}, above zero")
    return seconds


@dataclass(frozen=True)
class JobsSettings:
    """The parsed ``tasks.jobs.*`` settings (durable mode)."""

    # A registry key (the cookiecutter's ``dbsession_factory``) or dotted name.
    session_factory: str = "dbsession_factory"
    # The request attribute holding the session joined to ``request.tm``.
    request_session: str = "dbsession"
    relay: bool = True
    relay_interval: float = 1.0
    relay_grace: float = 10.0
    publish_attempts: int = 10
    # The after-commit publish gives up after this; the relay sends the rest.
    publish_timeout: float = 0.2
    # A started job whose worker sent no heartbeat for this long is re-queued,
    lease: float = 60.0
    # ... unless its workers were lost this many times: then it is failed.
    lost_attempts: int = 3
    retention: float = 7 * 86400.0
    # The JSON API (and later the dashboard): ``pyramid_tasks.jobs.api``.
    api_prefix: str = "/_tasks/api"
    view_permission: str = "tasks.view"
    manage_permission: str = "tasks.manage"
    # The metrics of finished jobs count those created this recently.
    metrics_window: float = 3600.0


# Keys read only by an include on top of pyramid_tasks.jobs (any one of those
# named): set without it they would be ignored (config.check_jobs_settings).
JOBS_INCLUDE_KEYS = {
    "api_prefix": ("pyramid_tasks.jobs.api",),
    "view_permission": ("pyramid_tasks.jobs.api", "pyramid_tasks.dashboard"),
    "manage_permission": ("pyramid_tasks.jobs.api", "pyramid_tasks.dashboard"),
    "metrics_window": ("pyramid_tasks.jobs.api",),
}


def _route_prefix(key, value):
    text = str(value).strip().rstrip("/")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*", text):
        raise bad_setting(key, value, "a URL path such as /_tasks/api")
    return text


def _permission(key, value):
    text = str(value).strip()
    if not text or any(c.isspace() for c in text):
        raise bad_setting(key, value, "a permission name such as tasks.view")
    return text


def _name(key, value):
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:]*", text):
        raise bad_setting(key, value, "a registry key or a dotted name")
    return text


def _identifier(key, value):
    text = str(value).strip()
    if not text.isidentifier():
        raise bad_setting(key, value, "a request attribute name")
    return text


_JOBS_KEYS = {
    "session_factory": _name,
    "request_session": _identifier,
    "relay": as_bool,
    "relay_interval": lambda k, v: parse_duration(k, v, positive=True),
    "relay_grace": parse_duration,
    "publish_attempts": lambda k, v: as_int(k, v, minimum=1),
    "publish_timeout": lambda k, v: parse_duration(k, v, positive=True),
    "lease": lambda k, v: parse_duration(k, v, positive=True),
    "lost_attempts": lambda k, v: as_int(k, v, minimum=1),
    "retention": parse_duration,
    "api_prefix": _route_prefix,
    "view_permission": _permission,
    "manage_permission": _permission,
    "metrics_window": lambda k, v: parse_duration(k, v, positive=True),
}


def parse_jobs_settings(settings, prefix=f"{TASKS_PREFIX}jobs."):
    """:class:`JobsSettings` from ``tasks.jobs.*``; unknown keys are errors."""
    values = {}
    for key, value in settings.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in _JOBS_KEYS:
            raise _unknown_key(key, name, list(_JOBS_KEYS), prefix)
        values[name] = _JOBS_KEYS[name](key, value)
    return JobsSettings(**values)
