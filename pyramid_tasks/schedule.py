"""The beat schedule grammar of ``tasks.beat.<name>.*`` settings.

Schedules are *parsed*, never evaluated: the keyword-call forms are read with
:func:`ast.parse` and only string and number literals are accepted as values.
"""

import ast
import re
from datetime import timedelta

from celery.schedules import crontab
from pyramid.exceptions import ConfigurationError

from .settings import as_json, bad_setting

__all__ = ["parse_beat_settings", "parse_schedule"]

BEAT_PREFIX = "tasks.beat."
_FIELDS = ("task", "schedule", "args", "kwargs", "options")

_EXPECTED = (
    "seconds (30, 2.5), a duration (90s, 15m, 2h, 1d), a five-field crontab "
    '(*/15 * * * *), crontab(minute="*/15", ...) or timedelta(minutes=30)'
)
# ASCII digits only: ``\d`` would take any Unicode digit.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,-]+")
_CALL = re.compile(r"(crontab|timedelta)\s*\(.*\)", re.DOTALL)
_CALL_KEYWORDS = {
    "crontab": ("minute", "hour", "day_of_week", "day_of_month", "month_of_year"),
    "timedelta": (
        "weeks",
        "days",
        "hours",
        "minutes",
        "seconds",
        "milliseconds",
        "microseconds",
    ),
}
# Longer than any sensible schedule; keeps ast.parse away from giant input.
_MAX_LENGTH = 500


def parse_schedule(text, key="schedule"):
    """A :class:`~datetime.timedelta` or :class:`~celery.schedules.crontab`.

    ``key`` is the setting name used in errors.
    """
    value = str(text).strip()
    try:
        return _parse(value)
    except _Invalid as exc:
        raise bad_setting(key, text, _EXPECTED) from exc.__cause__


class _Invalid(Exception):
    """Internal: the text is not in the grammar (cause attached)."""


def _parse(value):
    if _NUMBER.fullmatch(value):
        return _interval(seconds=float(value))
    match = _DURATION.fullmatch(value)
    if match:
        return _interval(**{_UNITS[match[2]]: float(match[1])})
    fields = value.split()
    if len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields):
        names = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        return _build(crontab, dict(zip(names, fields, strict=True)))
    if len(value) <= _MAX_LENGTH and _CALL.fullmatch(value):
        return _parse_call(value)
    raise _Invalid


def _interval(**parts):
    delta = _build(timedelta, parts)
    if delta <= timedelta(0):
        raise _Invalid
    return delta


def _build(factory, kwargs):
    try:
        return factory(**kwargs)
    except Exception as exc:  # the schedule classes validate with many types
        raise _Invalid from exc


def _parse_call(value):
    try:
        node = ast.parse(value, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _Invalid from exc
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise _Invalid
    allowed = _CALL_KEYWORDS[node.func.id]
    if node.args or not node.keywords:
        raise _Invalid
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg not in allowed or keyword.arg in kwargs:
            raise _Invalid
        kwargs[keyword.arg] = _literal(keyword.value, node.func.id)
    if node.func.id == "timedelta":
        return _interval(**kwargs)
    return _build(crontab, kwargs)


def _literal(node, func):
    """A string (crontab only) or non-negative number literal, nothing else."""
    value = node.value if isinstance(node, ast.Constant) else None
    if func == "crontab" and isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise _Invalid


def parse_beat_settings(settings, prefix=BEAT_PREFIX):
    """``{name: entry}`` for Celery's ``beat_schedule`` from ``tasks.beat.*``.

    Each entry needs ``task`` and ``schedule``; ``args`` is a JSON list,
    ``kwargs`` and ``options`` JSON objects.
    """
    raw = {}
    for key, value in settings.items():
        if not key.startswith(prefix):
            continue
        name, _, field = key[len(prefix) :].rpartition(".")
        if not name or field not in _FIELDS:
            raise ConfigurationError(
                f"Unknown setting {key}: beat entries are "
                f"{prefix}<name>.{{{','.join(_FIELDS)}}}"
            )
        raw.setdefault(name, {})[field] = (key, value)
    return {name: _entry(prefix, name, fields) for name, fields in sorted(raw.items())}


def _entry(prefix, name, fields):
    for required in ("task", "schedule"):
        if required not in fields:
            raise ConfigurationError(
                f"Beat entry {name!r} has no {prefix}{name}.{required} setting."
            )
    key, task = fields["task"]
    task = task.strip()
    if not re.fullmatch(r"[\w.:-]+", task):
        raise bad_setting(key, task, "a task name such as myapp.tasks.cleanup")
    key, schedule = fields["schedule"]
    entry = {"task": task, "schedule": parse_schedule(schedule, key=key)}
    for field, kind, convert in (
        ("args", list, tuple),
        ("kwargs", dict, dict),
        ("options", dict, dict),
    ):
        if field in fields:
            key, value = fields[field]
            entry[field] = convert(as_json(key, value, kind))
    return entry
