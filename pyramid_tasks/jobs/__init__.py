"""Durable mode: a job table in the app's own database.

``config.include('pyramid_tasks.jobs')`` (after ``pyramid_tasks``) records
every task the app sends in ``pyramid_tasks_job``: rows written in the same
transaction as the business data, re-sent by a relay when the broker did not
take them, and run effectively once by the transactional task classes.
"""

from pyramid.config import PHASE2_CONFIG
from pyramid.exceptions import ConfigurationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from ..settings import parse_jobs_settings
from .events import JobCreated, JobEvent, JobFailed, JobStarted, JobSucceeded
from .model import FINISHED, STATES, UNFINISHED, Job, metadata
from .workflow import Workflow, workflow

__all__ = [
    "FINISHED",
    "STATES",
    "UNFINISHED",
    "Job",
    "JobCreated",
    "JobEvent",
    "JobFailed",
    "JobStarted",
    "JobSucceeded",
    "Workflow",
    "includeme",
    "metadata",
    "workflow",
]

_DISCRIMINATOR = "pyramid_tasks:jobs"


def includeme(config):
    """Turn durable mode on for this app (``tasks.jobs.*`` settings)."""
    config.include("pyramid_tasks")
    registry = config.registry
    config.action(
        _DISCRIMINATOR,
        lambda: setup(registry),
        # After the Celery app is built (PHASE2_CONFIG), before the tasks.
        order=PHASE2_CONFIG + 1,
    )
    # The package's own test job (`tasks-celery CONFIG jobs test`).
    config.add_task(
        "pyramid_tasks.jobs.service.test_job",
        name="pyramid_tasks.jobs.test",
        bind=True,
        base="pyramid_tasks.task_classes.ScheduleOnCommitTask",
    )
    # The dashboard's "everything matching this filter" (jobs.bulk).
    config.add_task(
        "pyramid_tasks.jobs.bulk.bulk_job",
        name="pyramid_tasks.jobs.bulk",
        bind=True,
        base="pyramid_tasks.task_classes.ScheduleOnCommitTask",
    )


def setup(registry):
    """Build ``registry.pyramid_tasks_jobs`` from the settings."""
    from dataclasses import replace

    from .store import JobStore
    from .web import JobRecorder

    settings = parse_jobs_settings(registry.settings)
    engine = _engine(registry, settings.session_factory)
    registry.pyramid_tasks_jobs = JobRecorder(
        registry, settings, JobStore(engine, settings)
    )
    # The after-commit publish gives up quickly: the rows are safe.
    options = registry.pyramid_tasks_settings
    timeout = options.publish_timeout
    if timeout is None or timeout > settings.publish_timeout:
        registry.pyramid_tasks_settings = replace(
            options, publish_timeout=settings.publish_timeout
        )


def _engine(registry, name):
    """The engine of the session factory ``tasks.jobs.session_factory`` names."""
    key = "tasks.jobs.session_factory"
    factory = registry.get(name)
    if factory is None and "." in name:
        from pyramid.path import DottedNameResolver

        try:
            factory = DottedNameResolver().resolve(name)
        except (ImportError, ValueError) as exc:
            raise ConfigurationError(
                f"Setting {key} = {name!r} names nothing importable: {exc}"
            ) from exc
    if factory is None:
        raise ConfigurationError(
            f"Setting {key} = {name!r}: no registry key of that name (the "
            "cookiecutter's models set registry['dbsession_factory']; include "
            "them before pyramid_tasks.jobs is committed) and not a dotted name."
        )
    # A sessionmaker, or the engine itself.
    bind = factory.kw.get("bind") if isinstance(factory, sessionmaker) else factory
    engine = getattr(bind, "engine", None)
    if not isinstance(engine, Engine):
        raise ConfigurationError(
            f"Setting {key} = {name!r}: {factory!r} is not a SQLAlchemy "
            "sessionmaker bound to an engine."
        )
    return engine
