"""Prometheus metrics of the job table, read at each scrape.

Two queries a scrape, each bounded whatever the size of the table:

* the unfinished jobs (``state IN (pending, queued, ...)``, a range of the
  ``(state, created_at)`` index): jobs per queue and state, the age of the
  oldest waiting job per queue, the relay's backlog.  Their cost grows with
  the backlog, never with the history;
* the finished jobs created within ``tasks.jobs.metrics_window`` (default an
  hour; ``state IN (...) AND created_at >= now - window``, a range of the same
  index): outcomes and durations per task name.

Counts over the whole history would read every row (and go down when
``jobs prune`` deletes): the outcomes are gauges over the window instead.
Needs ``prometheus_client`` (``pip install pyramid_tasks[metrics]``).
"""

from collections import defaultdict
from datetime import timedelta

from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.utils import floatToGoString
from sqlalchemy import Float, case, cast, extract, func, select

from .model import FINISHED, PENDING, UNFINISHED, Job, utcnow
from .service import WAITING  # pending or queued, as ``jobs depth`` counts
from .store import explain_missing_table

__all__ = ["BUCKETS", "JobMetrics"]

# Upper bounds, in seconds, of the duration histogram's buckets (+Inf added).
BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# The outcomes whose run time the histogram shows.
_TIMED = ("succeeded", "failed")

_c = Job.__table__.c


def _duration(dialect):
    """The last run's duration in seconds, as SQL."""
    if dialect == "sqlite":  # times stored as text
        days = func.julianday(_c.finished_at) - func.julianday(_c.started_at)
        return cast(days * 86400.0, Float)
    return cast(extract("epoch", _c.finished_at - _c.started_at), Float)


class JobMetrics:
    """A ``prometheus_client`` collector over the job table of ``store``."""

    def __init__(self, store, settings):
        self.store = store
        self.settings = settings

    def collect(self):
        now = utcnow()
        engine = self.store.engine
        with explain_missing_table(engine), engine.connect() as connection:
            unfinished = connection.execute(self._unfinished(now)).all()
            finished = connection.execute(self._finished(now)).all()
        queues = {queue or "" for queue, *_ in unfinished}
        queues |= {queue or "" for queue, *_ in finished}
        yield from self._unfinished_families(now, unfinished, queues)
        yield from self._finished_families(finished)

    # -- the queries --------------------------------------------------------

    def _unfinished(self, now):
        grace = now - timedelta(seconds=self.settings.relay_grace)
        return (
            select(
                _c.queue,
                _c.state,
                func.count(),
                func.min(_c.created_at),
                # The relay publishes pending rows older than relay_grace.
                func.count().filter(_c.state == PENDING, _c.created_at <= grace),
            )
            .where(_c.state.in_(UNFINISHED))
            .group_by(_c.queue, _c.state)
        )

    def _finished(self, now):
        since = now - timedelta(seconds=self.settings.metrics_window)
        timed = _c.state.in_(_TIMED) & _c.started_at.is_not(None)
        timed &= _c.finished_at.is_not(None)
        # The duration computed once a row (None when not timed).
        rows = (
            select(
                _c.queue,
                _c.name,
                _c.state,
                case((timed, _duration(self.store.dialect))).label("duration"),
            )
            .where(_c.state.in_(FINISHED), _c.created_at >= since)
            .subquery()
        )
        duration = rows.c.duration
        return select(
            rows.c.queue,
            rows.c.name,
            rows.c.state,
            func.count(),
            func.count(duration),
            func.coalesce(func.sum(duration), 0.0),
            *(func.count().filter(duration <= bound) for bound in BUCKETS),
        ).group_by(rows.c.queue, rows.c.name, rows.c.state)

    # -- the metric families ---------------------------------------------------

    def _unfinished_families(self, now, rows, queues):
        jobs = GaugeMetricFamily(
            "pyramid_tasks_jobs",
            "Unfinished jobs in the job table, per queue and state.",
            labels=("queue", "state"),
        )
        counts = {(queue or "", state): count for queue, state, count, *_ in rows}
        for queue in sorted(queues):
            for state in UNFINISHED:
                jobs.add_metric((queue, state), counts.get((queue, state), 0))
        yield jobs

        oldest = {}
        for queue, state, _count, created_at, _pending in rows:
            if state in WAITING:
                queue = queue or ""
                oldest[queue] = min(created_at, oldest.get(queue, created_at))
        age = GaugeMetricFamily(
            "pyramid_tasks_jobs_oldest_waiting_age_seconds",
            "Age of the oldest job waiting for a worker (pending or queued) "
            "per queue; 0 when none waits.",
            labels=("queue",),
        )
        for queue in sorted(queues):
            created_at = oldest.get(queue)
            seconds = 0.0 if created_at is None else _seconds(now, created_at)
            age.add_metric((queue,), seconds)
        yield age

        yield GaugeMetricFamily(
            "pyramid_tasks_relay_backlog_jobs",
            "Pending jobs older than tasks.jobs.relay_grace: the relay's to send.",
            value=sum(row[4] for row in rows),
        )

    def _finished_families(self, rows):
        window = f"created in the last {self.settings.metrics_window:g} seconds"
        finished = GaugeMetricFamily(
            "pyramid_tasks_jobs_finished",
            f"Finished jobs {window} (tasks.jobs.metrics_window), per queue, "
            "task name and state.",
            labels=("queue", "name", "state"),
        )
        per_name = defaultdict(lambda: [0] * (len(BUCKETS) + 2))
        for queue, name, state, count, timed, total, *buckets in rows:
            finished.add_metric((queue or "", name, state), count)
            sums = per_name[name]
            sums[0] += timed
            sums[1] += total
            for index, in_bucket in enumerate(buckets):
                sums[2 + index] += in_bucket
        yield finished

        durations = GaugeHistogramMetricFamily(
            "pyramid_tasks_job_duration_seconds",
            f"Run time of the last attempt of the jobs {window} that succeeded "
            "or failed, per task name.",
            labels=("name",),
        )
        for name in sorted(per_name):
            timed, total, *buckets = per_name[name]
            if not timed:  # only cancelled or dead jobs: no run to show
                continue
            bounds = [*map(floatToGoString, BUCKETS), "+Inf"]
            durations.add_metric(
                (name,), list(zip(bounds, [*buckets, timed], strict=True)), total
            )
        yield durations


def _seconds(now, then):
    if then.tzinfo is None:  # SQLite gives the times back naive (in UTC)
        then = then.replace(tzinfo=now.tzinfo)
    return max(0.0, (now - then).total_seconds())
