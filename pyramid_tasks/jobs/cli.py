"""``tasks-celery CONFIG_URI jobs COMMAND``: the operators' commands."""

import argparse
import sys

from sqlalchemy import inspect

from ..masking import mask_secrets
from .model import Job, metadata

__all__ = ["USAGE", "parse", "run"]

USAGE = "tasks-celery CONFIG_URI [--var name=value ...] jobs COMMAND ..."


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


def run(app, options, out=sys.stdout):
    """Run the parsed command on ``app``; the exit status."""
    from ..cli import LoadError

    jobs = getattr(app.pyramid_registry, "pyramid_tasks_jobs", None)
    if jobs is None:
        raise LoadError(
            "the app does not include pyramid_tasks.jobs: add "
            "config.include('pyramid_tasks.jobs') to use the jobs commands."
        )
    return _COMMANDS[options.command](jobs, options, out)


def init_db(jobs, options, out):
    engine = jobs.store.engine
    url = mask_secrets(engine.url.render_as_string(hide_password=True))
    with engine.begin() as connection:
        # The schema the table goes to: an engine's schema_translate_map
        # (the demo's demo.schema) moves it out of the default one.
        schema = connection.schema_for_object(Job.__table__)
        table = f"{schema}.{Job.__tablename__}" if schema else Job.__tablename__
        if inspect(connection).has_table(Job.__tablename__, schema=schema):
            print(f"Table {table} already exists in {url}.", file=out)
            return 0
        metadata.create_all(connection)
    print(f"Created table {table} in {url}.", file=out)
    return 0


_COMMANDS = {"init-db": init_db}
