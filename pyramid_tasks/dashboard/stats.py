"""The overview's throughput, failure rate and durations over a window.

A window is the last hour by minute, the last day by hour or the last 30
days by day (UTC).  Per bucket, the jobs that finished in it (their
``finished_at``): succeeded, and failed or dead (cancelled jobs are not
counted).  Per task name over the window: the same counts, and the median
and 95th percentile of the run time (``finished_at - started_at``) of the
newest :data:`SAMPLE` jobs of the window that ran (succeeded or failed).

Every query reads one range of the ``(finished_at, state, name)`` index
(PostgreSQL and SQLite answer the counts from the index alone).  A bucket
that ended more than :data:`SETTLE` seconds ago is closed: it is counted
once, kept in the process, and never read again.  Only the open buckets
are counted at each view, and a coarse open bucket (today, this hour) is
the sum of its closed finer buckets (cached too) and of the last minutes,
so a view reads at most a minute and :data:`SETTLE` seconds of jobs, plus
the sample.  A closed bucket keeps what finished in it: jobs pruned, deleted
or retried since are still counted there until the process restarts.
"""

import threading
import weakref
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import Float, cast, extract, func, literal_column, select
from sqlalchemy.sql.expression import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from ..jobs.model import DEAD, FAILED, SUCCEEDED, Job, utcnow
from ..jobs.service import BadParameter

__all__ = ["SAMPLE", "SETTLE", "WINDOWS", "percentile", "throughput"]

#: The windows: ``name: (unit of its buckets, buckets)``.
WINDOWS = {"hour": ("minute", 60), "day": ("hour", 24), "month": ("day", 30)}
#: The buckets' sizes, in seconds.
UNITS = {"minute": 60, "hour": 3600, "day": 86400}
# An open bucket of a unit is the sum of its buckets of the finer unit.
_FINER = {"hour": "minute", "day": "hour"}
# Buckets of each unit kept: a window's, and those of the coarser bucket
# the unit makes up (this hour's minutes, today's hours).
_KEEP = {"minute": 120, "hour": 48, "day": 31}

#: Seconds after its end a bucket is closed: a job's end commits a moment
#: after its ``finished_at``, written by the clock of its worker's host.
SETTLE = 15.0
#: The newest jobs of the window whose run times give the percentiles.
SAMPLE = 5000

#: The outcomes counted; failed or dead is a failure.
COUNTED = (SUCCEEDED, FAILED, DEAD)
# The outcomes with a run time (a dead job never ran).
_TIMED = (SUCCEEDED, FAILED)

_table = Job.__table__
_c = _table.c


def _state(dialect):
    """The state column in a query's WHERE.  SQLite without ANALYZE's
    statistics (most apps never run it) would take ``state IN (...)`` along
    ``(state, created_at)``, every succeeded job: ``+state`` keeps SQLite
    off that index, so the range of ``finished_at`` leads."""
    if dialect == "sqlite":
        return UnaryExpression(_c.state, operator=custom_op("+"))
    return _c.state


# SQLite keeps the times as text, ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC: a
# bucket is a prefix of it.
_PREFIX = {"minute": 16, "hour": 13, "day": 10}


class _Cache:
    """The closed buckets of one database: ``{unit: {start: Counter}}``,
    each Counter ``{(name, state): jobs}``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.closed = {unit: {} for unit in UNITS}

    def forget_before(self, now):
        for unit, keep in _KEEP.items():
            oldest = _floor(now, unit) - keep * _size(unit)
            buckets = self.closed[unit]
            for start in [s for s in buckets if s < oldest]:
                del buckets[start]


# One cache per engine (an app's job table), gone with it.
_caches = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache_of(engine):
    with _caches_lock:
        cache = _caches.get(engine)
        if cache is None:
            cache = _caches[engine] = _Cache()
        return cache


def _size(unit):
    return timedelta(seconds=UNITS[unit])


def _floor(when, unit):
    """The start of the bucket of ``unit`` holding ``when``."""
    seconds = when.timestamp()
    return datetime.fromtimestamp(seconds - seconds % UNITS[unit], UTC)


def _bucket(dialect, unit):
    """The bucket of ``unit`` a row finished in, as SQL."""
    if dialect == "sqlite":
        return func.substr(_c.finished_at, 1, literal_column(str(_PREFIX[unit])))
    # ``finished_at AT TIME ZONE 'UTC'``: buckets of UTC whatever the
    # session's time zone.  Constants inline: GROUP BY repeats the
    # expression, which must be the SELECT's to the letter.
    return func.date_trunc(
        literal_column(f"'{unit}'"),
        func.timezone(literal_column("'UTC'"), _c.finished_at),
    )


def _start(value):
    """A bucket as the database gives it, as an aware datetime."""
    if isinstance(value, str):  # SQLite's prefix of the text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)


def _count(connection, unit, start, end):
    """``{bucket start: Counter}`` of the jobs finished in ``[start, end)``."""
    bucket = _bucket(connection.dialect.name, unit).label("bucket")
    query = (
        select(bucket, _c.name, _c.state, func.count())
        .where(
            _c.finished_at >= start,
            _c.finished_at < end,
            _state(connection.dialect.name).in_(COUNTED),
        )
        .group_by(bucket, _c.name, _c.state)
    )
    found = {}
    for when, name, state, jobs in connection.execute(query):
        found.setdefault(_start(when), Counter())[name, state] += jobs
    return found


def _buckets(connection, cache, unit, start, end, now):
    """``{start: Counter}`` of each bucket of ``unit`` from ``start`` up to
    ``end`` or the open one (the one holding ``now``)."""
    size = _size(unit)
    end = min(end, _floor(now, unit) + size)
    cut = _floor(now - timedelta(seconds=SETTLE), unit)  # closed before it
    closed = cache.closed[unit]
    starts = []
    while start < end:
        starts.append(start)
        start += size
    missing = [s for s in starts if s < cut and s not in closed]
    if missing:
        found = _count(connection, unit, missing[0], missing[-1] + size)
        for start in missing:
            closed[start] = found.get(start, Counter())
    buckets = {s: closed[s] for s in starts if s < cut}
    # Never empty: ``end`` is at most the end of the bucket holding ``now``.
    open_ = [s for s in starts if s >= cut]
    if unit in _FINER:
        for start in open_:
            finer = _buckets(connection, cache, _FINER[unit], start, start + size, now)
            buckets[start] = sum(finer.values(), Counter())
    else:  # the last minutes: counted at each view
        found = _count(connection, unit, open_[0], end)
        buckets.update({s: found.get(s, Counter()) for s in open_})
    return buckets


def percentile(values, fraction):
    """The ``fraction`` percentile of sorted ``values``, interpolated as
    PostgreSQL's ``percentile_cont``; None for no values."""
    if not values:
        return None
    position = fraction * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _durations(connection, since, sample):
    """``{name: (timed jobs, p50, p95)}`` of the newest ``sample`` jobs that
    ran and finished since ``since``; their run times in seconds."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:  # times as text
        days = func.julianday(_c.finished_at) - func.julianday(_c.started_at)
        seconds = cast(days * 86400.0, Float)
    else:
        seconds = cast(extract("epoch", _c.finished_at - _c.started_at), Float)
    newest = (
        select(_c.name, seconds.label("seconds"))
        .where(
            _c.finished_at >= since,
            _state(connection.dialect.name).in_(_TIMED),
            _c.started_at.is_not(None),
        )
        .order_by(_c.finished_at.desc())
        .limit(sample)
        .subquery()
    )
    if sqlite:  # no percentile_cont: the sample in Python
        runs = {}
        for name, value in connection.execute(select(newest.c.name, newest.c.seconds)):
            runs.setdefault(name, []).append(value)
        return {
            name: (len(values), percentile(values, 0.5), percentile(values, 0.95))
            for name, values in ((n, sorted(v)) for n, v in runs.items())
        }
    query = select(
        newest.c.name,
        func.count(),
        func.percentile_cont(0.5).within_group(newest.c.seconds),
        func.percentile_cont(0.95).within_group(newest.c.seconds),
    ).group_by(newest.c.name)
    return {name: (n, p50, p95) for name, n, p50, p95 in connection.execute(query)}


def throughput(service, window="hour", now=None, sample=None):
    """The figures of ``window`` (``hour``, ``day`` or ``month``) up to
    ``now`` (the present when None)::

        {"window", "unit", "start", "end", "sample",
         "buckets": [{"start", "succeeded", "failed"}, ...],  # oldest first
         "succeeded", "failed",
         "tasks": [{"name", "count", "failed", "timed", "p50", "p95"}, ...]}

    ``failed`` counts failed and dead jobs; ``tasks`` has the most run task
    first, ``timed`` of its jobs among the ``sample`` (:data:`SAMPLE` when
    None) newest that ran, whose run times give ``p50`` and ``p95`` (seconds,
    None without any).  A bad ``window`` is :class:`.BadParameter`.
    """
    if window not in WINDOWS:
        raise BadParameter(
            "window",
            window,
            f"unknown window {window!r}: expected one of {', '.join(WINDOWS)}",
        )
    now = utcnow() if now is None else now
    sample = SAMPLE if sample is None else sample
    unit, count = WINDOWS[window]
    end = _floor(now, unit) + _size(unit)
    start = end - count * _size(unit)
    cache = _cache_of(service.store.engine)
    with service._connect(), service.store.engine.connect() as connection:
        # One view at a time fills a database's cache: a second waits for
        # the first's closed buckets rather than counting them again.
        with cache.lock:
            cache.forget_before(now)
            buckets = _buckets(connection, cache, unit, start, end, now)
        durations = _durations(connection, start, sample)
    return _figures(window, unit, start, end, sample, buckets, durations)


def _figures(window, unit, start, end, sample, buckets, durations):
    rows, tasks = [], {}
    for when in sorted(buckets):
        row = {"start": when, "succeeded": 0, "failed": 0}
        for (name, state), jobs in buckets[when].items():
            outcome = "succeeded" if state == SUCCEEDED else "failed"
            row[outcome] += jobs
            task = tasks.setdefault(name, {"name": name, "count": 0, "failed": 0})
            task["count"] += jobs
            task["failed"] += jobs if outcome == "failed" else 0
        rows.append(row)
    for name, task in tasks.items():
        task["timed"], task["p50"], task["p95"] = durations.get(name, (0, None, None))
    return {
        "window": window,
        "unit": unit,
        "start": start,
        "end": end,
        "sample": sample,
        "buckets": rows,
        "succeeded": sum(row["succeeded"] for row in rows),
        "failed": sum(row["failed"] for row in rows),
        "tasks": sorted(tasks.values(), key=lambda t: (-t["count"], t["name"])),
    }
