"""``tasks-celery CONFIG_URI jobs COMMAND``: the operators' commands.

A thin skin over :class:`~pyramid_tasks.jobs.service.JobService`: each
command parses its options, calls the service and prints what it returns.
A refused request (:class:`~pyramid_tasks.jobs.service.JobError`) is one
line on stderr and exit status 1, with nothing changed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from sqlalchemy import func, inspect, select, text
from sqlalchemy.schema import CreateColumn

from ..masking import mask_secrets
from .model import STATES, Job, metadata, table_indexes
from .workflow import WORKFLOW_TASK

__all__ = ["USAGE", "parse", "run"]

USAGE = "tasks-celery CONFIG_URI [--var name=value ...] jobs COMMAND ..."

# What ``drain`` waits for: a job in one of these states is not done yet.  A
# ``scheduled`` or ``retrying`` one waits for its eta (a countdown), which may
# be days away: not waited for.
_LEFT = ("pending", "queued", "started")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        from ..cli import UsageError

        raise UsageError(message)


def parser():
    parser = _Parser(prog="tasks-celery CONFIG_URI jobs", usage=USAGE)
    # Each command's own usage line: "... jobs init-db [-h]".
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", prog=USAGE.removesuffix(" COMMAND ...")
    )
    commands.required = True

    def command(name, help, description):
        return commands.add_parser(name, help=help, description=description)

    def as_json(sub):
        sub.add_argument(
            "--json", action="store_true", help="print JSON (docs/operating.rst)"
        )

    sub = command(
        "list",
        "list jobs, newest first",
        "One line per job, newest first: created, id, queue, state, title or name.",
    )
    sub.add_argument(
        "--state",
        action="append",
        metavar="S",
        help=f"only jobs in this state (repeatable): {', '.join(STATES)}",
    )
    sub.add_argument(
        "--queue", action="append", metavar="Q", help="only this queue (repeatable)"
    )
    sub.add_argument(
        "--name", action="append", metavar="N", help="only this task (repeatable)"
    )
    sub.add_argument("--title", metavar="TEXT", help="titles containing TEXT")
    sub.add_argument("--error", metavar="TEXT", help="errors containing TEXT")
    sub.add_argument(
        "--workspace",
        action="append",
        metavar="KEY=VALUE",
        help="workspaces holding KEY with VALUE (JSON if it parses; repeatable)",
    )
    for when in ("created", "finished"):
        sub.add_argument(
            f"--{when}-after",
            metavar="TIME",
            help=f"{when} at or after TIME (ISO 8601, UTC unless it names an offset)",
        )
        sub.add_argument(f"--{when}-before", metavar="TIME", help=f"{when} before TIME")
    sub.add_argument(
        "--before",
        metavar="ID",
        help="the jobs older than this one (the last id of the previous page)",
    )
    sub.add_argument("--limit", default="50", metavar="N", help="1 to 1000 (50)")
    as_json(sub)

    sub = command("show", "show one job", "Every field of the job ID.")
    sub.add_argument("id", metavar="ID")
    as_json(sub)

    sub = command(
        "cancel",
        "cancel jobs",
        "Cancel the jobs ID...: an unfinished job never runs (revoked at the "
        "broker too); a running one is asked to stop.",
    )
    sub.add_argument("ids", nargs="+", metavar="ID")

    sub = command(
        "clear",
        "cancel every waiting job of queues and purge them",
        "Cancel every waiting job (pending or queued) of the queues (all when "
        "none is given) and purge them at the broker.",
    )
    sub.add_argument("queues", nargs="*", metavar="QUEUE")

    sub = command(
        "retry",
        "run failed, cancelled or dead jobs again",
        "Run the failed, cancelled or dead jobs ID... again: a new attempt of "
        "each, under its id, sent now.",
    )
    sub.add_argument("ids", nargs="+", metavar="ID")

    sub = command(
        "run-now",
        "run scheduled jobs now",
        "Run the scheduled jobs ID... now instead of at their eta: each sent "
        "again under its id, without eta. When its eta comes, the old message "
        "does nothing if the job succeeded; it is one more attempt if the job "
        "failed, and for a task that is not transactional, a second run if "
        "the job is still running.",
    )
    sub.add_argument("ids", nargs="+", metavar="ID")

    sub = command(
        "test",
        "send the package's test job",
        "Send the test job pyramid_tasks.jobs.test and print its id; the "
        "worker that runs it logs one INFO line naming it.",
    )
    sub.add_argument("--queue", metavar="Q", help="its queue (the default queue)")

    sub = command(
        "depth",
        "waiting jobs per queue, table and broker",
        "Per queue: the jobs waiting in the table (pending or queued), the "
        "messages at the broker, and the age of the oldest waiting job.",
    )
    sub.add_argument(
        "--include-scheduled",
        action="store_true",
        help="count the scheduled and retrying jobs (an eta ahead) too",
    )
    as_json(sub)

    sub = command(
        "prune",
        "delete old finished jobs",
        "Delete the finished jobs that finished longer ago than --older-than, "
        "in batches.",
    )
    sub.add_argument(
        "--older-than",
        metavar="DURATION",
        help="such as 12h or 30d (tasks.jobs.retention, 7d by default)",
    )
    sub.add_argument(
        "--state",
        action="append",
        metavar="S",
        help="only this finished state (repeatable): succeeded, failed, "
        "cancelled, dead",
    )

    sub = command(
        "drain",
        "run a worker until the queues are empty",
        "Run a worker until no job of the queues waits or runs, then exit 0; "
        "exit 1 at the timeout (for cron-driven sites).",
    )
    sub.add_argument(
        "--queue",
        action="append",
        metavar="Q",
        help="a queue to drain (repeatable; the app's configured queues)",
    )
    sub.add_argument(
        "--timeout", default="10m", metavar="DURATION", help="10m by default"
    )

    commands.add_parser(
        "init-db",
        help="create the job table (for apps without migrations)",
        description="Create the table pyramid_tasks_job and its indexes in "
        "the app's database, unless it exists.",
    )
    return parser


def parse(args):
    """The parsed ``jobs`` command line (UsageError when it is wrong)."""
    if {"-h", "--help"} & set(args):
        parser().parse_args(args)  # prints the help and exits 0
    return parser().parse_args(args)


def run(app, options, out=None):
    """Run the parsed command on ``app``, printing to ``out`` (stdout); the
    exit status.

    Raises :class:`~pyramid_tasks.jobs.service.JobError` for what the
    service refused."""
    from ..cli import LoadError

    out = out or sys.stdout
    jobs = getattr(app.pyramid_registry, "pyramid_tasks_jobs", None)
    if jobs is None:
        raise LoadError(
            "the app does not include pyramid_tasks.jobs: add "
            "config.include('pyramid_tasks.jobs') to use the jobs commands."
        )
    if options.command == "init-db":
        return init_db(jobs, options, out)
    from .service import JobService

    service = JobService.from_registry(app.pyramid_registry)
    return _COMMANDS[options.command](service, options, out)


def _json(value, out):
    print(json.dumps(value, indent=2, sort_keys=False), file=out)


def _when(iso):
    """``2026-12-02T03:20:11.123456+00:00`` as ``2026-12-02 03:20:11``."""
    return iso[:19].replace("T", " ") if iso else "-"


def list_jobs(service, options, out):
    page = service.list_page(
        state=options.state,
        queue=options.queue,
        name=options.name,
        title=options.title,
        error=options.error,
        created_after=options.created_after,
        created_before=options.created_before,
        finished_after=options.finished_after,
        finished_before=options.finished_before,
        before=options.before,
        limit=options.limit,
        workspace=options.workspace,
    )
    found = page["jobs"]
    if options.json:
        _json(found, out)
        return 0
    searched = page["searched"]
    more = (
        f"Searched the newest {service.search_depth} jobs the other filters "
        f"select; the older ones: --before {searched}"
    )
    if not found:
        filtered = any(
            getattr(options, key)
            for key in (
                *("state", "queue", "name", "title", "error", "before"),
                "workspace",
                *("created_after", "created_before"),
                *("finished_after", "finished_before"),
            )
        )
        none = "No job matches these filters." if filtered else "There are no jobs."
        print(more if searched else none, file=out)
        return 0
    queue_width = max(len(job["queue"] or "-") for job in found)
    for job in found:
        print(
            f"{_when(job['created_at'])}  {job['id']}  "
            f"{(job['queue'] or '-'):<{queue_width}}  {job['state']:<9}  "
            f"{job['title'] or job['name']}",
            file=out,
        )
    if searched:
        print(more, file=out)
    return 0


# ``show``: the JSON columns pretty-printed, the long texts indented below.
_BLOCKS = ("args", "kwargs", "options", "traceback", "workspace")


def show(service, options, out):
    job = service.get(options.id)
    if options.json:
        _json(job, out)
        return 0
    width = max(len(key) for key in job) + 1
    for key, value in job.items():
        if key in _BLOCKS and value not in (None, [], {}):
            text = value if key == "traceback" else json.dumps(value, indent=2)
            print(f"{key}:", file=out)
            for line in text.rstrip("\n").splitlines():
                print(f"  {line}", file=out)
            continue
        if key == "progress" and value is not None:
            message = job["progress_message"]
            value = f"{value} %" + (f" ({message})" if message else "")
        print(f"{key + ':':<{width}} {'-' if value is None else value}", file=out)
    if job["name"] == WORKFLOW_TASK:  # its steps, in their order
        steps = service.list(parent=job["id"], limit=service.max_limit)
        print("steps:", file=out)
        for number, step in enumerate(reversed(steps), start=1):
            print(
                f"  {number}. {step['state']:<9} {step['name']} {step['id']}", file=out
            )
    return 0


def cancel(service, options, out):
    for result in service.cancel(options.ids):
        if result["cancelled"]:
            print(
                f"Cancelled job {result['id']} (it was {result['state_before']}).",
                file=out,
            )
        elif result["state"] is None:  # deleted (pruned) since it was read
            print(f"Job {result['id']} no longer exists: not cancelled.", file=out)
        else:
            print(
                f"Job {result['id']} is already {result['state']}: left as it is.",
                file=out,
            )
    return 0


def clear(service, options, out):
    from .service import _purge_text

    result = service.clear(options.queues or None)
    for queue, count in result["queues"].items():
        broker = _purge_text(result["purged"][queue], result["scheduled"][queue])
        print(f"Queue {queue}: {count} waiting job(s) cancelled, {broker}.", file=out)
    return 0


def retry(service, options, out):
    for result in service.retry(options.ids):
        then = (
            "queued again"
            if result["state"] == "queued"
            else "pending: the relay sends it when the broker takes it"
        )
        resumed = f", resumed at its step {result['step']}" if "step" in result else ""
        print(
            f"Job {result['id']} (it was {result['state_before']}) is {then}{resumed}.",
            file=out,
        )
    return 0


def run_now(service, options, out):
    for result in service.run_now(options.ids):
        then = (
            "queued to run now"
            if result["state"] == "queued"
            else "pending: the relay sends it when the broker takes it"
        )
        print(f"Job {result['id']} (it was scheduled) is {then}.", file=out)
    return 0


def test(service, options, out):
    print(service.test(options.queue), file=out)
    return 0


def _age(seconds):
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def depth(service, options, out):
    found = service.depth(include_scheduled=options.include_scheduled)
    if options.json:
        _json(found, out)
        return 0
    headers = ["QUEUE", "WAITING", "BROKER", "OLDEST"]
    if options.include_scheduled:
        headers.append("SCHEDULED")
    rows = [
        [
            entry["queue"],
            str(entry["waiting"]),
            "?" if entry["broker"] is None else str(entry["broker"]),
            _age(entry["oldest_waiting_age"]),
            *([str(entry["scheduled"])] if options.include_scheduled else []),
        ]
        for entry in found
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip(), file=out)
    return 0


def prune(service, options, out):
    deleted = service.prune(older_than=options.older_than, states=options.state)
    details = ", ".join(f"{count} {state}" for state, count in deleted.items())
    print(f"Deleted {sum(deleted.values())} finished job(s): {details}.", file=out)
    return 0


def drain(service, options, out):
    """Run a worker (``tasks-celery CONFIG -- worker -Q ...``) until the
    table and the broker show nothing waiting or running in the queues."""
    timeout = service.duration("timeout", options.timeout, None)
    queues = service.check_queues(options.queue) or service.configured_queues()
    command = [sys.executable, "-c", _WORKER, options.config_uri]
    for name, value in options.variables.items():
        command += ["--var", f"{name}={value}"]
    command += ["--", "--quiet", "worker", "-Q", ",".join(queues)]
    command += ["-n", f"drain-{os.getpid()}@%h", "--without-mingle", "--without-gossip"]
    worker = subprocess.Popen(command)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = _left(service, queues)
            if worker.poll() is not None:
                print(
                    "tasks-celery: error: jobs drain: its worker exited with "
                    f"status {worker.returncode}",
                    file=sys.stderr,
                )
                return 1
            if not left:
                print(f"Drained {', '.join(queues)}: nothing waits or runs.", file=out)
                return 0
            if time.monotonic() >= deadline:
                print(
                    f"tasks-celery: error: jobs drain: timed out after "
                    f"{options.timeout}: {'; '.join(left)}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(DRAIN_POLL)
    finally:
        _stop(worker)


# tasks-celery, as the running Python has it.
_WORKER = "import sys; from pyramid_tasks.script import main; sys.exit(main())"

# Seconds between two looks at the table and the broker while draining.
DRAIN_POLL = 0.5


def _left(service, queues):
    """What is left in ``queues``, one text a queue with anything left (or
    not known to be empty: the broker did not answer)."""
    store = service.store
    with service._connect(), store.engine.connect() as connection:
        counts = dict(
            connection.execute(
                select(Job.queue, func.count())
                .where(Job.queue.in_(queues), Job.state.in_(_LEFT))
                .group_by(Job.queue)
            ).all()
        )
    sizes = service.broker_sizes(queues)
    left = []
    for queue, size in zip(queues, sizes, strict=True):
        if counts.get(queue) or size is None or size:
            broker = (
                "the broker did not answer"
                if size is None
                else f"{size} message(s) at the broker"
            )
            left.append(
                f"queue {queue}: {counts.get(queue, 0)} job(s) waiting or running, "
                f"{broker}"
            )
    return left


def _stop(worker, timeout=60):
    """A warm shutdown of the worker: it finishes what it runs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _add_missing_columns(connection, inspector, schema):
    """``ALTER TABLE ... ADD COLUMN`` for each column of the job table that
    ``connection``'s table lacks (all of them nullable); their names."""
    present = {c["name"] for c in inspector.get_columns(Job.__tablename__, schema)}
    quote = connection.dialect.identifier_preparer.quote
    name = ".".join(quote(part) for part in (schema, Job.__tablename__) if part)
    added = []
    for column in Job.__table__.columns:
        if column.name not in present:
            definition = CreateColumn(column).compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {name} ADD COLUMN {definition}"))
            added.append(column.name)
    return added


def init_db(jobs, options, out):
    engine = jobs.store.engine
    url = mask_secrets(engine.url.render_as_string(hide_password=True))
    with engine.begin() as connection:
        # The schema the table goes to: an engine's schema_translate_map
        # (the demo's demo.schema) moves it out of the default one.
        schema = connection.schema_for_object(Job.__table__)
        table = f"{schema}.{Job.__tablename__}" if schema else Job.__tablename__
        inspector = inspect(connection)
        if inspector.has_table(Job.__tablename__, schema=schema):
            # An older table gets the columns and indexes added since it was
            # made.
            columns = _add_missing_columns(connection, inspector, schema)
            present = {
                index["name"]
                for index in inspector.get_indexes(Job.__tablename__, schema=schema)
            }
            indexes = sorted(
                table_indexes(connection.dialect.name), key=lambda index: index.name
            )
            added = [index.name for index in indexes if index.name not in present]
            for index in indexes:
                if index.name in added:
                    index.create(connection)
            print(f"Table {table} already exists in {url}.", file=out)
            if columns:
                print(f"Added its missing columns: {', '.join(columns)}.", file=out)
            if added:
                print(f"Created its missing indexes: {', '.join(added)}.", file=out)
            return 0
        metadata.create_all(connection)
    print(f"Created table {table} in {url}.", file=out)
    return 0


_COMMANDS = {
    "list": list_jobs,
    "show": show,
    "cancel": cancel,
    "clear": clear,
    "retry": retry,
    "run-now": run_now,
    "test": test,
    "depth": depth,
    "prune": prune,
    "drain": drain,
}
