"""Scenarios P5 and P9: durable mode (``pyramid_tasks.jobs``) against the same
app without it, on PostgreSQL and Redis.

The baseline is pyramid_tasks itself, not plain Celery: the same
``bench.apps`` app, built with ``bench.durable = false`` and ``true``.

- P5 web: request-like transactions (a session joined to it, one INSERT of
  business data, one task scheduled with ``tm=``) committed back to back, the
  clock stopped once the marks' thread has marked the last one ``queued``:
  the steady state of a busy web process, its marks' work included.
- P5 worker: a real worker drains one-INSERT ``RetryableTransactionTask`` jobs
  that were sent on commit by the same kind of app.
- P9: 10,000 jobs scheduled in one transaction, from the first
  ``apply_async`` until every row is ``queued`` (the marks' thread done).
"""

import os
import time
import uuid

import transaction
from sqlalchemy import func, insert, select

from pyramid_tasks.jobs import Job
from pyramid_tasks.sqlalchemy import get_tm_session, mark_changed

from .apps import main as build_app
from .harness import CPUMeter, Scenario, alternate
from .schema import rows
from .worker import Bench


class App:
    """``bench.apps`` in this process: the web side of one variant."""

    def __init__(self, bench, durable):
        self.durable = durable
        self.bench = bench
        self.queue = f"bench_web_{uuid.uuid4().hex[:8]}"
        self.registry = build_app(
            {},
            **{
                "bench.database_url": bench.database_url,
                "bench.schema": bench.schema,
                "bench.durable": str(durable).lower(),
                "celery.broker_url": bench.redis_url,
                "celery.task_default_queue": self.queue,
            },
        ).registry
        self.factory = self.registry["bench_dbsession_factory"]
        self.jobs = getattr(self.registry, "pyramid_tasks_jobs", None)
        self.task = self.registry.celery_app.tasks["bench.insert"]
        self.tm = transaction.TransactionManager(explicit=True)

    def close(self):
        self.bench.redis.delete(self.queue)
        self.factory.kw["bind"].dispose()

    def business_write(self):
        """What a view does before it schedules: one INSERT, joined to tm."""
        session = get_tm_session(self.factory, self.tm)
        session.execute(insert(rows).values(n=0))
        mark_changed(session)

    def commit_one(self):
        """P5 web: begin, one INSERT, one task with ``tm=``, commit."""
        self.tm.begin()
        self.business_write()
        self.task.apply_async((1,), tm=self.tm)
        self.tm.commit()

    def commit_one_no_sql(self):
        """One task with ``tm=`` in a transaction that joined no session."""
        self.tm.begin()
        self.task.apply_async((1,), tm=self.tm)
        self.tm.commit()

    def marked(self):
        """Wait until every row published so far is marked ``queued`` (a
        thread of durable mode's marks them after the commit)."""
        if self.jobs is not None and not self.jobs.flush(60):
            raise RuntimeError("the published rows were not marked in 60 s")

    def schedule(self, queue, count):
        """``count`` jobs sent on one commit to ``queue``; seconds from the
        first ``apply_async`` to the rows marked ``queued``."""
        self.tm.begin()
        self.business_write()
        start = time.perf_counter()
        for n in range(count):
            self.task.apply_async((n,), tm=self.tm, queue=queue)
        self.tm.commit()
        self.marked()
        return time.perf_counter() - start

    def fill(self, queue, task, count):
        """``Bench.drain``'s filler: ``count`` jobs of ``task`` sent on one
        commit, then the marker (sent at once)."""
        assert task == "bench.insert"
        self.schedule(queue, count)
        key = f"bench:done:{uuid.uuid4().hex}"
        self.bench.sender.send_task("bench.done", (key,), queue=queue)
        return key


def web(bench, apps, rounds, calls):
    """P5 web: a commit with one task, durable against not.

    A round is ``calls`` commits back to back, as a busy web process makes
    them, and ends when the marks' thread has marked the last one
    ``queued``: that thread's work is inside the time, though no request
    waits for it (it batches what several commits published into one
    UPDATE, beside the requests).  Also reported: each commit followed by a
    wait for its own mark (one UPDATE per commit, nothing beside: a bound
    no request sees), and a transaction with no session."""
    plain, durable = apps

    def measure(app, operation, each, calls, cpu):
        meter = CPUMeter(os.getpid())  # this process: the web side

        def one_round():
            meter.start()
            start = time.perf_counter()
            for _ in range(calls):
                operation()
                if each:
                    app.marked()
            app.marked()
            result = (time.perf_counter() - start) * 1000 / calls
            cpu.append(meter.stop(calls))
            bench.redis.delete(plain.queue, durable.queue)
            return result

        return one_round

    scenarios = []
    for title, target, name, each in (
        ("P5 web: commit, 1 INSERT + 1 task (ms)", "<= 1.30", "commit_one", False),
        ("P5 web: the same, each waiting its mark (ms)", "report", "commit_one", True),
        (
            "P5 web: commit, 1 task, no session (ms)",
            "report",
            "commit_one_no_sql",
            False,
        ),
    ):
        for app in apps:  # warm up
            getattr(app, name)()
        count = max(1, calls // 5) if each else calls
        scenario = Scenario(title, target)
        scenario.baseline, scenario.ours = alternate(
            rounds,
            measure(plain, getattr(plain, name), each, count, scenario.cpu_baseline),
            measure(durable, getattr(durable, name), each, count, scenario.cpu_ours),
        )
        scenarios.append(scenario)
    return scenarios


def drain(bench, apps, rounds, count):
    """P5 worker: one-INSERT RetryableTransactionTask jobs, durable against not."""
    plain, durable = apps
    workers = bench.start_workers("ours", "durable")
    try:
        scenario = Scenario(
            "P5 worker: drain, 1 INSERT (ms/task)",
            ">= 0.80",
            unit="ms/task",
            higher_is_better=True,
        )
        for variant, app in (("ours", plain), ("durable", durable)):  # warm-up
            bench.drain(workers[variant], "bench.insert", min(20, count), app.fill)
        scenario.baseline, scenario.ours = alternate(
            rounds,
            lambda: bench.drain(
                workers["ours"],
                "bench.insert",
                count,
                plain.fill,
                cpu=scenario.cpu_baseline,
            ),
            lambda: bench.drain(
                workers["durable"],
                "bench.insert",
                count,
                durable.fill,
                cpu=scenario.cpu_ours,
            ),
        )
    finally:
        for worker in workers.values():
            worker.stop()
    return [scenario]


def bulk(bench, apps, rounds, count):
    """P9: ``count`` jobs in one transaction; jobs/s, durable and not."""
    jobs = Job.__table__

    def one_round(app):
        def run():
            queue = f"bench_bulk_{uuid.uuid4().hex[:8]}"
            elapsed = app.schedule(queue, count)
            # Every message at the broker and, durable, every row queued.
            sent = bench.redis.llen(queue)
            bench.redis.delete(queue)
            queued = count
            if app.durable:
                with app.factory.kw["bind"].connect() as connection:
                    queued = connection.execute(
                        select(func.count())
                        .select_from(jobs)
                        .where(jobs.c.queue == queue, jobs.c.state == "queued")
                    ).scalar_one()
            if (sent, queued) != (count, count):
                raise RuntimeError(
                    f"P9: {count} jobs scheduled, {sent} at the broker, "
                    f"{queued} rows queued"
                )
            return count / elapsed

        return run

    plain, durable = apps
    scenario = Scenario(
        f"P9: {count} jobs in one transaction (jobs/s)",
        ">= 10000 jobs/s (durable)",
        unit="jobs/s",
        absolute=True,
    )
    scenario.baseline, scenario.ours = alternate(
        rounds, one_round(plain), one_round(durable)
    )
    scenario.note = (
        f"durable {scenario.median('ours'):.0f} jobs/s, not durable "
        f"{scenario.median('baseline'):.0f} jobs/s: durable at "
        f"{scenario.median('ours') / scenario.median('baseline'):.2f}x"
    )
    return [scenario]


SIZES = {
    # (web rounds, commits a round), (drain rounds, tasks a drain),
    # (bulk rounds, jobs a round)
    "full": ((15, 500), (7, 2000), (5, 10000)),
    "quick": ((5, 200), (3, 300), (3, 10000)),
}


def run(quick, sizes=None, bench=None):
    """The P5 and P9 scenarios; ``sizes`` as in :data:`SIZES` (tests pass
    tiny ones, and a ``Bench`` on their own services)."""
    sizes = sizes or SIZES["quick" if quick else "full"]
    owned = bench is None
    bench = bench or Bench()
    apps = (App(bench, durable=False), App(bench, durable=True))
    try:
        return [
            *web(bench, apps, *sizes[0]),
            *drain(bench, apps, *sizes[1]),
            *bulk(bench, apps, *sizes[2]),
        ]
    finally:
        for app in apps:
            app.close()
        if owned:
            bench.close()
