"""How many increments of one hot row exhaust the retry policy.

Eight ``RetryableTransactionTask`` executions at a time (threads, eager
``apply``, as a ``-P threads -c 8`` worker runs them) each increment one row
under SERIALIZABLE, ``--rounds`` times in a row; every execution that ends in
``RetryAttemptsExhausted`` is counted.  Run from the repository root::

    .venv/bin/python -m bench.contention                      # the default policy
    .venv/bin/python -m bench.contention --attempts 3 5 10 --backoff 0.1:2.0

Each ``--backoff`` is ``backoff:backoff_max`` in seconds; ``--pool processes``
runs one process per execution (prefork), ``--herd`` starts every round together
and has all executions read before any writes (all but one conflict).
"""

import argparse
import collections
import itertools
import logging
import multiprocessing
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import text
from zope.sqlalchemy import mark_changed

from pyramid_tasks import RetryableTransactionTask, RetryAttemptsExhausted
from pyramid_tasks.settings import TasksSettings

DATABASE_URL = os.environ.get(
    "PYRAMID_TASKS_BENCH_DATABASE_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
)


def make_task(database_url, schema, attempts, backoff, backoff_max, herd=None):
    def increment(self):
        request = self.get_request()
        session = request.dbsession
        value = session.execute(
            text(f'SELECT value FROM "{schema}".counter WHERE id = 1')
        ).scalar()
        if herd is not None and request.transaction_attempt == 1:
            herd.wait(timeout=60)  # everyone has read: all but one conflict
        session.execute(
            text(f'UPDATE "{schema}".counter SET value = :v WHERE id = 1'),
            {"v": value + 1},
        )
        mark_changed(session)
        return request.transaction_attempt

    settings = {
        "sqlalchemy.url": database_url,
        "sqlalchemy.isolation_level": "SERIALIZABLE",
        "demo.schema": schema,
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
    }
    if attempts:
        settings["tasks.retry.attempts"] = str(attempts)
    if backoff:
        settings["tasks.retry.backoff"] = str(backoff)
        settings["tasks.retry.backoff_max"] = str(backoff_max)
    config = Configurator(settings=settings)
    config.include("demo_app.models")
    config.include("pyramid_tasks")
    config.add_task(
        increment, bind=True, base=RetryableTransactionTask, name="increment"
    )
    config.commit()
    return config.registry.celery_app.tasks["increment"]


def _run(task, start, rounds, herd):
    """Run ``rounds`` increments once everyone is ready; how many exhausted.

    With ``herd``, every round starts together.
    """
    start.wait()
    attempts = collections.Counter()  # attempts used -> increments; 0: exhausted
    for _ in range(rounds):
        if herd:
            start.wait(timeout=60)
        result = task.apply()
        if isinstance(result.result, RetryAttemptsExhausted):
            attempts[0] += 1
        elif result.failed():
            raise result.result
        else:
            attempts[result.result] += 1
    return attempts


def _process(policy, start, rounds, results, herd):
    results.put(_run(make_task(*policy, herd), start, rounds, herd))


def measure(database_url, workers, rounds, attempts, backoff, backoff_max, pool, herd):
    """(executions, attempts used, row value, seconds) of one run.

    Attempts used map each number of attempts to how many increments needed
    it; 0 counts the increments that exhausted the policy.
    """
    schema = f"pt_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        connection.execute(
            text(f'CREATE TABLE "{schema}".counter (id int PRIMARY KEY, value int)')
        )
        connection.execute(text(f'INSERT INTO "{schema}".counter VALUES (1, 0)'))
    try:
        policy = (database_url, schema, attempts, backoff, backoff_max)
        began = time.monotonic()
        if pool == "threads":
            start = threading.Barrier(workers)
            herd = threading.Barrier(workers) if herd else None
            task = make_task(*policy, herd)
            with ThreadPoolExecutor(max_workers=workers) as executor:
                futures = [
                    executor.submit(_run, task, start, rounds, herd)
                    for _ in range(workers)
                ]
                attempts = sum((f.result() for f in futures), collections.Counter())
        else:  # one process each, as a prefork worker's children
            context = multiprocessing.get_context("fork")
            start, results = context.Barrier(workers), context.SimpleQueue()
            herd = context.Barrier(workers) if herd else None
            arguments = (policy, start, rounds, results, herd)
            children = [
                context.Process(target=_process, args=arguments) for _ in range(workers)
            ]
            for child in children:
                child.start()
            attempts = sum((results.get() for _ in children), collections.Counter())
            for child in children:
                child.join()
        seconds = time.monotonic() - began
        with engine.connect() as connection:
            value = connection.scalar(
                text(f'SELECT value FROM "{schema}".counter WHERE id = 1')
            )
        return workers * rounds, attempts, value, seconds
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--attempts", type=int, nargs="*", default=[0])
    parser.add_argument("--backoff", nargs="*", default=[""])
    parser.add_argument("--pool", choices=["threads", "processes"], default="threads")
    parser.add_argument(
        "--herd",
        action="store_true",
        help="every round starts together and all read before anyone writes",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # every retry logs a WARNING
    default = TasksSettings()
    print(
        f"default policy: attempts {default.retry_attempts}, backoff "
        f"{default.retry_backoff}, backoff_max {default.retry_backoff_max}"
    )
    print(f"{args.workers} {args.pool} x {args.rounds} increments, {args.repeat} runs")
    for attempts, backoff in itertools.product(args.attempts, args.backoff):
        low, _, high = backoff.partition(":")
        figures = [
            measure(
                DATABASE_URL,
                args.workers,
                args.rounds,
                attempts,
                float(low) if low else None,
                float(high) if high else None,
                args.pool,
                args.herd,
            )
            for _ in range(args.repeat)
        ]
        rates = ", ".join(f"{100 * a[0] / n:.1f} %" for n, a, _, _ in figures)
        landed = all(v == n - a[0] for n, a, v, _ in figures)
        used = sum((a for _, a, _, _ in figures), collections.Counter())
        most = max(used)
        spread = " ".join(f"{n}:{used[n]}" for n in sorted(used) if n)
        seconds = ", ".join(f"{s:.1f}" for *_, s in figures)
        print(
            f"attempts {attempts or 'default'}, backoff {backoff or 'default'}: "
            f"exhausted {rates}; every other increment landed: {landed}; "
            f"most attempts a landed increment needed: {most}; {seconds} s\n"
            f"    increments by attempts used: {spread}"
        )


if __name__ == "__main__":
    main()
