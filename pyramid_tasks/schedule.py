"""The beat schedule grammar of ``tasks.beat.<name>.*`` settings.

Schedules are *parsed*, never evaluated: the keyword-call forms are read with
:func:`ast.parse` and only string and number literals are accepted as values.
"""

import ast
import re
from datetime import timedelta

from celery.schedules import crontab
from pyramid.exceptions import ConfigurationError

from .masking import mask_secrets
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
# Longer than any sensible schedule; keeps ast.parse and int() away from
# giant input.
_MAX_LENGTH = 500


def parse_schedule(text, key="schedule"):
    """A :class:`~datetime.timedelta` or :class:`~celery.schedules.crontab`.

    ``key`` is the setting name used in errors.  A crontab field out of its
    range is an error naming the field, the value and the range.
    """
    value = str(text).strip()
    try:
        return _parse(value)
    except _Invalid as exc:
        if exc.args:
            raise ConfigurationError(
                f"Invalid setting {key} = {mask_secrets(text)!r}: "
                f"{mask_secrets(exc.args[0])}."
            ) from exc.__cause__
        raise bad_setting(key, text, _EXPECTED) from exc.__cause__


class _Invalid(Exception):
    """Internal: the text is not in the grammar (cause attached).

    Its argument, when there is one, says what is wrong in the user's terms.
    """


def _parse(value):
    if _NUMBER.fullmatch(value):
        return _interval(seconds=float(value))
    match = _DURATION.fullmatch(value)
    if match:
        return _interval(**{_UNITS[match[2]]: float(match[1])})
    fields = value.split()
    if (
        len(value) <= _MAX_LENGTH
        and len(fields) == 5
        and all(_CRON_FIELD.fullmatch(f) for f in fields)
    ):
        for name, spec in zip(_CRON_RANGES, fields, strict=True):
            _check_cron_field(name, spec, f"{_CRON_LABELS[name]} field {spec!r}")
        return _crontab(dict(zip(_CRON_RANGES, fields, strict=True)))
    if len(value) <= _MAX_LENGTH and _CALL.fullmatch(value):
        return _parse_call(value)
    raise _Invalid


def _interval(**parts):
    delta = _build(timedelta, parts)
    if delta <= timedelta(0):
        raise _Invalid
    return delta


def _crontab(fields):
    """Celery's crontab of fields already in range: it still refuses a date
    that never occurs (``30 2``)."""
    try:
        return crontab(**fields)
    except ValueError as exc:
        raise _Invalid(str(exc).rstrip(".")) from exc


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
    fields = {}
    for name, spec in kwargs.items():
        # Spaces around an item ("0, 30", " 5"): Celery takes them around a
        # number, this around any item, and hands Celery the items stripped.
        if isinstance(spec, str):
            fields[name] = ",".join(item.strip() for item in spec.split(","))
        else:
            fields[name] = spec
        _check_cron_field(name, fields[name], f"{name}={spec!r}")
    return _crontab(fields)


# The crontab fields in five-field order, with Celery's ranges and the names
# it reads (it takes a name's first three letters; we take the abbreviation
# or the full English name).
_MONTHS = ("january", "february", "march", "april", "may", "june", "july")
_MONTHS += ("august", "september", "october", "november", "december")
_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday")
_DAYS += ("saturday",)
_CRON_RANGES = {
    "minute": (0, 59, ()),
    "hour": (0, 23, ()),
    "day_of_month": (1, 31, ()),
    "month_of_year": (1, 12, _MONTHS),
    "day_of_week": (0, 6, _DAYS),
}
_CRON_LABELS = {
    "minute": "minute",
    "hour": "hour",
    "day_of_month": "day of month",
    "month_of_year": "month",
    "day_of_week": "day of week",
}


def _check_cron_field(name, spec, where):
    """Every item of a crontab field in its range, or ``_Invalid`` saying why.

    Celery's own parser wraps steps and names around silently: ``*/61`` is
    hourly, ``mon`` is 1 in any field.  An item is ``*``, a value or a range
    ``a-b`` (``b < a`` wraps around), ``*`` and ranges with an optional
    ``/step`` that leaves more than one value; items are separated by commas.
    """
    low, high, names = _CRON_RANGES[name]
    if isinstance(spec, float):
        raise _Invalid(f"{where}: expected a whole number or a crontab field")
    for item in str(spec).split(","):
        base, slash, step = item.partition("/")
        if base == "*":
            first, count = low, high - low + 1
        else:
            start, dash, end = base.partition("-")
            first = _cron_value(start or base, low, high, names, where)
            last = _cron_value(end, low, high, names, where) if dash else first
            if slash and not dash:
                raise _Invalid(f"{where}: a step needs * or a range before it")
            count = (last - first) % (high - low + 1) + 1
        if not slash:
            continue
        if not (step.isascii() and step.isdigit()):
            raise _Invalid(f"{where}: step {step!r} is not a number")
        if base == "*" and not 1 <= int(step) < count:
            raise _Invalid(f"{where}: step {int(step)} is outside 1-{count - 1}")
        if not 1 <= int(step) < count:
            raise _Invalid(f"{where}: step {int(step)} leaves only {first} of {base}")


def _cron_value(token, low, high, names, where):
    if not token:
        raise _Invalid(f"{where}: a value is missing")
    if token.isascii() and token.isdigit():
        number = int(token)
        if not low <= number <= high:
            raise _Invalid(f"{where}: {number} is outside {low}-{high}")
        return number
    word = token.lower()
    for number, full in enumerate(names, start=low):
        if word in (full, full[:3]):
            return number
    allowed = f"{low}-{high}"
    if names:
        allowed += f" or {names[0][:3]}-{names[-1][:3]}"
    raise _Invalid(f"{where}: {token!r} is not in {allowed}")


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
