"""The dashboard at scale: ``python -m bench.dashboard [--rows N] [--keep]``
(or ``python -m bench --only dashboard``).

Fills a PostgreSQL schema of its own with ``N`` job rows (default
10,000,000, a tenth unfinished) in one ``INSERT ... SELECT
generate_series``, builds the job table's indexes (those of
:class:`pyramid_tasks.jobs.Job`) after the load, ANALYZEs, then times each
page of the dashboard through WebTest (the ``pyramid_tasks.dashboard``
include, a security policy granting ``tasks.view``): the overview, its
count badges alone, the unfiltered list and the list under each single
filter.  Prints p50 and p95 of each and writes them as JSON under
``bench/results/``.

``--keep`` keeps the schema (``--schema``, default ``bench_dashboard``)
after the run and reuses it when it already holds ``N`` rows: a rerun
skips the load.  Without it the run fills a schema of its own and drops
it at the end.
"""

import argparse
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import sqlalchemy
import webtest
from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.security import Allowed
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.schema import CreateTable

from pyramid_tasks.dashboard.counts import CAP, overview
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import JobService
from pyramid_tasks.sqlalchemy import register_factory

from .dispatch import REDIS_URL
from .harness import RESULTS
from .worker import DATABASE_URL

ROWS = 10_000_000
ROUNDS = 20
SCHEMA = "bench_dashboard"
PREFIX = "/_tasks"

#: Queues and their share of the jobs (a few busy, a long tail).
QUEUES = (
    ("default", 40),
    ("emails", 20),
    ("reports", 12),
    ("billing", 10),
    ("imports", 8),
    ("webhooks", 6),
    ("search", 3),
    ("slow", 1),
)
#: Task names per queue.
VERBS = ("send", "build", "sync", "notify", "export")
#: (error, share of the failures): exception class and message, with ids.
ERRORS = (
    "TimeoutError: read of https://api.example.com/v2/orders/%s timed out after 30s",
    "ConnectionRefusedError: [Errno 111] Connection refused (smtp.example.com:%s)",
    "KeyError: 'customer_%s'",
    "ValueError: invalid literal for int() with base 10: 'x%s'",
    "IntegrityError: duplicate key value violates unique constraint "
    '"orders_pkey" (id=%s)',
    "PermissionError: [Errno 13] Permission denied: '/data/exports/%s.csv'",
)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    + '  File "/srv/app/tasks.py", line 120, in run\n    result = step(job)\n' * 12
)

_started = time.monotonic()


def say(message):
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", flush=True)


def _array(values):
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def fill_sql(rows, now):
    """The one ``INSERT ... SELECT`` of ``rows`` jobs, oldest first, created
    over the 30 days before ``now``; the newest eighth holds the unfinished
    ones (a tenth of all), finished jobs are 94 % succeeded, 4 % failed, 1 %
    cancelled, 1 % dead."""
    queues = [q for q, share in QUEUES for _ in range(share)]
    errors = _array(ERRORS)
    unfinished_from = rows - rows // 8
    # r: a pseudo-random number in [0, 1) per row (a hash, so reruns agree).
    return f"""
    INSERT INTO pyramid_tasks_job (
        id, name, title, queue, priority, args, kwargs, options, state,
        attempts, publish_attempts, lost, created_at, eta, published_at,
        started_at, finished_at, worker, error, traceback, progress
    )
    SELECT
        md5(i::text)::uuid::text,
        name, title, queue, NULL,
        json_build_array(i % 100000, 'customer_' || (i % 7919)),
        json_build_object('customer_id', i % 7919, 'token', 'secret'),
        '{{}}'::json,
        state,
        CASE WHEN state IN ('pending', 'queued', 'scheduled') THEN 0
             WHEN state = 'failed' THEN 3 ELSE 1 END,
        CASE WHEN state = 'pending' THEN 0 ELSE 1 END,
        0,
        created,
        CASE WHEN state IN ('scheduled', 'retrying')
             THEN created + interval '1 day' END,
        CASE WHEN state <> 'pending' THEN created + interval '5 ms' END,
        CASE WHEN state IN ('pending', 'queued', 'scheduled') THEN NULL
             ELSE created + interval '1 s' END,
        CASE WHEN state IN ('succeeded', 'failed', 'cancelled', 'dead')
             THEN created + interval '1 s' + r2 * r2 * interval '600 s' END,
        CASE WHEN state NOT IN ('pending', 'queued', 'scheduled', 'dead')
             THEN 'celery@worker' || (i % 12) END,
        CASE WHEN state IN ('failed', 'retrying', 'dead') THEN format(
            ({errors})[1 + (i / 7) % {len(ERRORS)}], (i * 7919) % 1000003) END,
        CASE WHEN state IN ('failed', 'retrying') THEN $tb${TRACEBACK}$tb$ END,
        CASE WHEN state = 'started' THEN (i % 100) END
    FROM (
        SELECT i, r, r2, created, queue, name,
            CASE WHEN (i % 10) < 7
                 THEN 'Order ' || (i % 1000003) || ' for customer '
                      || (i % 7919)
            END AS title,
            CASE WHEN i > {unfinished_from} THEN
                CASE WHEN r < 0.8 * 0.85 THEN 'queued'
                     WHEN r < 0.8 * 0.97 THEN 'scheduled'
                     WHEN r < 0.8 * 0.985 THEN 'started'
                     WHEN r < 0.8 * 0.995 THEN 'retrying'
                     WHEN r < 0.8 THEN 'pending'
                     ELSE 'succeeded' END
            ELSE
                CASE WHEN r < 0.94 THEN 'succeeded'
                     WHEN r < 0.98 THEN 'failed'
                     WHEN r < 0.99 THEN 'cancelled'
                     ELSE 'dead' END
            END AS state
        FROM (
            SELECT i,
                (hashint8(i) & 2147483647) / 2147483648.0 AS r,
                (hashint8(-i) & 2147483647) / 2147483648.0 AS r2,
                TIMESTAMPTZ '{now.isoformat()}'
                    - (({rows} - i) * interval '30 days') / {rows} AS created,
                ({_array(queues)})[1 + (hashint8(i * 3) & 65535) % {len(queues)}]
                    AS queue
            FROM generate_series(1::bigint, {rows}) AS i
        ) AS base0
        CROSS JOIN LATERAL (
            SELECT 'app.' || queue || '.' || ({_array(VERBS)})[
                1 + (hashint8(i * 5) & 65535) % {len(VERBS)}] AS name
        ) AS named
    ) AS base
    """


class Policy:
    """Everyone may view: the bench measures pages, not access."""

    def identity(self, request):
        return "bench"

    def authenticated_userid(self, request):
        return "bench"

    def permits(self, request, context, permission):
        return Allowed("bench")


class Board:
    """The job table of ``rows`` rows in ``schema`` and the dashboard over it."""

    def __init__(self, rows, schema, keep, database_url=DATABASE_URL):
        self.rows, self.schema, self.keep = rows, schema, keep
        self.base = sqlalchemy.create_engine(database_url)
        self.engine = self.base.execution_options(schema_translate_map={None: schema})
        with self.base.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        self.ensure_filled()
        self.app, self.registry = self.build_app()
        self.statements = Statements(self.base)

    def close(self):
        if not self.keep:
            with self.base.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        self.base.dispose()

    def _filled(self, connection):
        """When the schema's table was filled: the ``now`` of its rows, or
        None when it holds no complete load of :attr:`rows` rows."""
        comment = connection.execute(
            text("SELECT obj_description(to_regclass(:t), 'pg_class')"),
            {"t": f'"{self.schema}".pyramid_tasks_job'},
        ).scalar()
        words = (comment or "").split()
        if words[:2] == ["bench.dashboard", f"rows={self.rows}"]:
            return datetime.fromisoformat(words[2].removeprefix("now="))
        return None

    def _table(self, sql):
        return text(sql.replace("{t}", f'"{self.schema}".pyramid_tasks_job'))

    def ensure_filled(self):
        with self.base.connect() as connection:
            self.now = self._filled(connection)
        if self.now is not None:
            say(f"schema {self.schema} already holds {self.rows:,} rows")
            self.indexes()
            return
        with self.engine.begin() as connection:
            connection.execute(self._table("DROP TABLE IF EXISTS {t}"))
            connection.execute(CreateTable(Job.__table__))  # no index yet
            connection.execute(
                self._table("ALTER TABLE {t} SET (autovacuum_enabled = false)")
            )
        self.now = datetime.now(UTC).replace(microsecond=0)
        say(f"loading {self.rows:,} rows into {self.schema}")
        with self.base.begin() as connection:
            connection.execute(text(f'SET search_path TO "{self.schema}"'))
            connection.execute(text(fill_sql(self.rows, self.now)))
        self.indexes()
        with self.base.connect() as connection:
            connection.execute(
                self._table("ALTER TABLE {t} RESET (autovacuum_enabled)")
            )
            comment = f"bench.dashboard rows={self.rows} now={self.now.isoformat()}"
            connection.execute(self._table(f"COMMENT ON TABLE {{t}} IS '{comment}'"))
            connection.commit()
        say("ready")

    def indexes(self):
        """Build the model's indexes the table lacks (all, after a load),
        then VACUUM ANALYZE if any was built."""
        with self.engine.begin() as connection:
            present = {
                index["name"]
                for index in sqlalchemy.inspect(connection).get_indexes(
                    Job.__tablename__, schema=self.schema
                )
            }
            connection.execute(text("SET maintenance_work_mem = '1GB'"))
            built = False
            for index in sorted(Job.__table__.indexes, key=lambda i: i.name):
                if index.name not in present:
                    say(f"building {index.name}")
                    index.create(connection)
                    built = True
        if built:
            say("VACUUM ANALYZE")
            with self.base.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").execute(
                    self._table("VACUUM (ANALYZE) {t}")
                )

    def build_app(self):
        settings = {
            "celery.broker_url": REDIS_URL,
            "celery.task_default_queue": "default",
            "tasks.jobs.session_factory": "bench_dbsession_factory",
            "tasks.jobs.relay": "false",
        }
        with Configurator(settings=settings) as config:
            config.include("pyramid_tm")
            config.include("pyramid_tasks")
            factory = register_factory(sessionmaker(bind=self.engine))
            config.registry["bench_dbsession_factory"] = factory
            config.include("pyramid_tasks.jobs")
            config.set_security_policy(Policy())
            config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
            config.include("pyramid_tasks.dashboard")
        app = webtest.TestApp(config.make_wsgi_app())
        return app, config.registry


def pages(now):
    """``(label, path, query)`` of each page the bench times: filter values
    as an operator would type them, on the data :func:`fill_sql` makes."""
    day = timedelta(days=1)
    return (
        ("overview", "/", {}),
        ("list, unfiltered", "/jobs", {}),
        ("list, state=failed", "/jobs", {"state": "failed"}),
        ("list, state=queued", "/jobs", {"state": "queued"}),
        ("list, queue=billing", "/jobs", {"queue": "billing"}),
        ("list, name=app.reports.export", "/jobs", {"name": "app.reports.export"}),
        ("list, title=for customer 42", "/jobs", {"title": "for customer 42"}),
        ("list, title=Order 4242 (rare)", "/jobs", {"title": "Order 4242 "}),
        ("list, error=timed out", "/jobs", {"error": "timed out"}),
        ("list, error=orders/34843 (rare)", "/jobs", {"error": "orders/34843"}),
        (
            "list, created in a day",
            "/jobs",
            {
                "created_after": _utc(now - 3 * day),
                "created_before": _utc(now - 2 * day),
            },
        ),
        (
            "list, finished in a day",
            "/jobs",
            {
                "finished_after": _utc(now - 10 * day),
                "finished_before": _utc(now - 9 * day),
            },
        ),
        ("list, finished after (open)", "/jobs", {"finished_after": _utc(now - day)}),
    )


def _utc(moment):
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


class Statements:
    """The SQL statements an engine runs while :attr:`on`."""

    def __init__(self, engine):
        self.on, self.seen = False, []
        sqlalchemy.event.listen(engine, "before_cursor_execute", self.record)

    def record(self, connection, cursor, statement, parameters, context, many):
        if self.on:
            self.seen.append((statement, parameters))


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(board, rounds, explain=None):
    """Times of each page (and of the count badges alone), in ms."""
    now = board.now
    results = []
    service = JobService.from_registry(board.registry)
    targets = [("overview count badges", None, None), *pages(now)]
    for label, path, query in targets:
        if path is None:

            def call():
                overview(service, cap=CAP)

        else:

            def call(path=path, query=query):
                board.app.get(PREFIX + path, query)

        call()  # warm
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        target = 50 if path is None else 100
        entry = {
            "page": label,
            "url": None if path is None else f"{PREFIX}{path}?{urlencode(query)}",
            "p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(percentile(times, 0.95), 1),
            "max_ms": round(max(times), 1),
            "target_ms": target,
        }
        results.append(entry)
        say(
            f"{label:<36} p50 {entry['p50_ms']:7.1f}  p95 {entry['p95_ms']:7.1f}"
            f"  max {entry['max_ms']:7.1f}  (target p95 < {target} ms)"
        )
        if explain is not None:
            explain.write(f"\n=== {label}: {entry['url'] or 'overview()'}\n")
            statements = board.statements
            statements.seen.clear()
            statements.on = True
            try:
                call()
            finally:
                statements.on = False
            with board.engine.connect() as connection:
                for statement, parameters in statements.seen:
                    if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
                        continue
                    plan = connection.exec_driver_sql(
                        "EXPLAIN (ANALYZE, COSTS OFF, BUFFERS) " + statement,
                        parameters,
                    ).scalars()
                    explain.write(f"\n{statement}\n{parameters}\n")
                    explain.write("\n".join(plan) + "\n")
    return results


def run(
    rows=ROWS, rounds=ROUNDS, schema=None, keep=False, explain=False, results=RESULTS
):
    """Fill (or reuse, with ``keep``), time, write under ``results``; the
    figures of each page.  ``schema``: :data:`SCHEMA` with ``keep``, else
    one of the run's own (a kept schema is never dropped by a run without
    ``keep``)."""
    if schema is None:
        schema = SCHEMA if keep else f"{SCHEMA}_{uuid.uuid4().hex[:8]}"
    board = Board(rows, schema, keep)
    try:
        results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        plans = None
        if explain:
            plans = (results / f"dashboard-{stamp}-plans.txt").open("w")
        try:
            figures = measure(board, rounds, plans)
        finally:
            if plans is not None:
                plans.close()
                say(f"plans: {plans.name}")
        path = results / f"dashboard-{stamp}.json"
        path.write_text(
            json.dumps({"rows": rows, "rounds": rounds, "pages": figures}, indent=2)
        )
        say(f"results: {path}")
        return figures
    finally:
        board.close()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.dashboard", description=__doc__
    )
    parser.add_argument("--rows", type=int, default=ROWS, help="job rows (10,000,000)")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="times per page (20)"
    )
    parser.add_argument(
        "--schema",
        help=f"the schema ({SCHEMA} with --keep, else one of the run's own)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the schema; reuse a filled one"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="write each page's EXPLAIN (ANALYZE) plans under bench/results/",
    )
    parser.add_argument(
        "--load-only", action="store_true", help="fill the schema, time nothing"
    )
    args = parser.parse_args(argv)
    if args.load_only:
        Board(args.rows, args.schema or SCHEMA, keep=True).close()
        return
    run(args.rows, args.rounds, args.schema, args.keep, args.explain)


if __name__ == "__main__":
    main()
