"""``tasks-celery CONFIG_URI [--var name=value ...] -- CELERY_ARGS...``"""

import argparse
import configparser
import os
import re
import sys

from celery.bin.celery import celery as celery_command
from pyramid.exceptions import ConfigurationError, ConfigurationExecutionError
from sqlalchemy.exc import SQLAlchemyError

from .broker import broker_required
from .loader import load_celery_app
from .masking import mask_secrets

__all__ = ["LoadError", "UsageError", "main"]

USAGE = "tasks-celery CONFIG_URI [--var name=value ...] -- CELERY_ARGS..."
EXAMPLE = "tasks-celery conf/production.ini -- worker --loglevel=info"


class UsageError(Exception):
    """A command-line mistake: one paragraph and the usage line, exit status 1."""


class LoadError(Exception):
    """The INI or its app cannot be loaded: one paragraph, exit status 1.

    The command line was right, so no usage line follows.
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser():
    parser = _Parser(
        prog="tasks-celery",
        usage=USAGE,
        description=(
            "Load a Pyramid INI file, then run a Celery command on its app: "
            "everything after -- is passed to Celery's own command line."
        ),
        epilog=(
            f"Example: {EXAMPLE}. The job table's commands (durable mode): "
            "tasks-celery CONFIG_URI jobs --help"
        ),
    )
    parser.add_argument("config_uri", help="the INI file, e.g. conf/production.ini")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a %%(NAME)s variable for the INI file (repeatable)",
    )
    return parser


def parse_args(argv):
    """``(config_uri, vars, celery_args)`` from the command line."""
    if not argv:
        raise UsageError("missing CONFIG_URI, for example: " + EXAMPLE)
    if "--" not in argv:
        if {"-h", "--help"} & set(argv):
            _parser().print_help()
            raise SystemExit(0)
        raise UsageError("the Celery command must follow '--', for example: " + EXAMPLE)
    split = argv.index("--")
    ours, celery_args = argv[:split], argv[split + 1 :]
    if celery_args[:1] == ["multi"]:
        raise UsageError(
            "celery multi starts workers with `celery -A`, which does not know "
            "the INI file: run one `tasks-celery CONFIG -- worker` per worker "
            "under your process supervisor instead"
        )
    options = _parser().parse_args(ours)
    variables = {}
    for item in options.var:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--var {item!r} must be NAME=VALUE")
        variables[name.strip()] = value
    return options.config_uri, variables, celery_args


def _check_file(config_uri):
    path = config_uri.partition("#")[0]
    if "://" not in path and not os.path.isfile(path):
        raise UsageError(f"config file {path} not found (cwd: {os.getcwd()})")


def load(config_uri, variables, celery_args=()):
    """The Celery app of the INI.

    Raises :class:`UsageError` for a missing file, :class:`LoadError` for
    what goes wrong loading it, each in one paragraph.  A broker given to
    Celery's command line in ``celery_args`` (``-b URL``) is put in
    ``CELERY_BROKER_URL`` first, as Celery's command line would do after:
    Celery prefers it to every broker setting of the INI.
    """
    _check_file(config_uri)
    broker = broker_option(celery_args)
    if broker:
        os.environ["CELERY_BROKER_URL"] = broker
    # Eager mode, or pyramid_tasks.testing, spares the web process a broker,
    # never this command: the app is refused without one as it is built.
    token = broker_required.set(True)
    try:
        app = load_celery_app(config_uri, variables)
    except ConfigurationExecutionError as exc:
        raise _bad_configuration(config_uri, exc.evalue) from exc
    except (
        ConfigurationError,
        configparser.Error,
        LookupError,
        ImportError,
        ValueError,
        SQLAlchemyError,
    ) as exc:
        # configparser.Error: INI syntax or a %(var)s with no value; LookupError:
        # a missing [app:...] section or setting; ImportError: a ``use =`` naming
        # nothing; SQLAlchemyError: a bad sqlalchemy.url or database at start-up.
        raise LoadError(f"cannot load {config_uri}: {_describe(exc)}") from exc
    finally:
        broker_required.reset(token)
    return app


# The global options of Celery's command line (celery.bin.celery.celery) that
# take a value; they come before the subcommand.
_VALUE_OPTIONS = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}


def broker_option(celery_args):
    """The broker Celery's command line will use, or ``""``.

    That of its global option ``-b``/``--broker`` (``-b URL``, ``-bURL``,
    ``--broker URL``, ``--broker=URL``; the last one wins), else of the
    ``BROKER_URL`` environment variable, which Click reads for that option.
    """
    broker = None
    args = iter(celery_args)
    for arg in args:
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break  # the subcommand: what follows is its own
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            if not equals and name in _VALUE_OPTIONS:
                value = next(args, "")
        else:
            # A cluster of short options (``-qb URL``): the first that takes
            # a value takes the rest of the cluster, or the next argument.
            name = value = ""
            for i, letter in enumerate(arg[1:], start=2):
                if f"-{letter}" in _VALUE_OPTIONS:
                    name, value = f"-{letter}", arg[i:] or next(args, "")
                    break
        if name in ("-b", "--broker"):
            broker = value
    if broker is None:
        broker = os.environ.get("BROKER_URL")
    return broker or ""


def _bad_configuration(config_uri, exc):
    return LoadError(f"bad configuration in {config_uri}: {_describe(exc)}")


def _describe(exc):
    """The error in one paragraph, secrets masked; our own errors need no type."""
    text = _SQLALCHEMY_LINK.sub("", mask_secrets(exc))
    text = " ".join(text.split())
    if isinstance(exc, ConfigurationError):
        return text
    return f"{type(exc).__name__}: {text}"


_SQLALCHEMY_LINK = re.compile(r"\(Background on this error at: [^)]*\)")


def _jobs_split(argv):
    """``(ours, jobs_args)`` for ``CONFIG [--var ...] jobs ...``, else None."""
    if "jobs" not in argv[1:]:
        return None
    split = argv.index("jobs", 1)
    if "--" in argv[:split]:
        return None
    return argv[:split], argv[split + 1 :]


def main_jobs(ours, jobs_args):
    """``tasks-celery CONFIG jobs COMMAND``: the status."""
    from .jobs import cli as jobs_cli
    from .jobs.service import JobError
    from .jobs.store import JobTableMissing

    try:
        options = jobs_cli.parse(jobs_args)
        config_uri, variables, _ = parse_args([*ours, "--"])
        # drain runs a worker on the same INI.
        options.config_uri, options.variables = config_uri, variables
        app = load(config_uri, variables)
        return jobs_cli.run(app, options)
    except (JobError, JobTableMissing) as exc:  # refused, or no table: unchanged
        return _error(f"jobs {options.command}: {exc}")
    except SQLAlchemyError as exc:  # the database, at the command's work
        from .jobs.store import one_line

        return _error(f"jobs {options.command}: {type(exc).__name__}: {one_line(exc)}")
    except UsageError as exc:
        return _error(exc, jobs_cli.USAGE)
    except LoadError as exc:
        return _error(exc)


def _error(message, usage=None):
    """Print ``message`` (and the usage line) on stderr: exit status 1."""
    usage = f"\nusage: {usage}" if usage else ""
    print(f"tasks-celery: error: {message}{usage}", file=sys.stderr)
    return 1


def main(argv=None):
    """Console script entry point; returns or exits with the status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = _jobs_split(argv)
    if jobs is not None:
        return main_jobs(*jobs)
    try:
        config_uri, variables, celery_args = parse_args(argv)
        app = load(config_uri, variables, celery_args)
    except UsageError as exc:
        return _error(exc, USAGE)
    except LoadError as exc:
        return _error(exc)
    # The way ``Celery.start`` hands an app object to Celery's CLI, but in
    # standalone mode so Click reports usage errors and exit codes itself.
    celery_command.params[0].default = app
    return celery_command.main(
        args=celery_args, prog_name=f"tasks-celery {config_uri} --"
    )
