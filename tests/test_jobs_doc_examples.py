"""The examples of docs/jobs.rst, run as written, and what the docs say of them.

The task and the subscriber of "In your tasks" and "Events" are taken from
the docs and executed as a module of their own, with the models they name
(``Row``, ``Incident``) defined here; the app runs its tasks eagerly, through
the same worker-side code a delivered message goes through.
"""

import itertools
import logging
import re
import sys
import textwrap
import types
from dataclasses import fields
from pathlib import Path

import pytest
from pyramid.config import Configurator
from pyramid.scripting import prepare
from sqlalchemy import Column, Integer, Text, func, select
from sqlalchemy.orm import declarative_base

from pyramid_tasks import RetryableTransactionTask
from pyramid_tasks.jobs import Job, JobStarted, JobSucceeded, metadata
from pyramid_tasks.settings import (
    JOBS_INCLUDE_KEYS,
    JobsSettings,
    parse_jobs_settings,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "jobs.rst"

Base = declarative_base()


class Row(Base):
    __tablename__ = "rows"
    id = Column(Integer, primary_key=True)
    upload_id = Column(Integer)
    data = Column(Text)


class Incident(Base):
    __tablename__ = "incidents"
    id = Column(Integer, primary_key=True)
    job_id = Column(Text)
    task = Column(Text)
    error = Column(Text)


def docs_block(marker):
    """The ``.. code-block:: python`` of docs/jobs.rst with ``marker`` in it."""
    lines = DOC.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if marker in line)
    start = max(i for i in range(end) if lines[i] == ".. code-block:: python")
    block = itertools.takewhile(
        lambda line: not line or line.startswith(" "), lines[start + 1 :]
    )
    return textwrap.dedent("\n".join(block)).strip()


@pytest.fixture
def example():
    """A module made of the docs' task and subscriber."""
    name = "tests_jobs_doc_example"
    module = types.ModuleType(name)
    module.__dict__.update(Row=Row, Incident=Incident, log=logging.getLogger(name))
    sys.modules[name] = module
    try:
        for marker in ("def import_rows(", "def record_failure("):
            exec(compile(docs_block(marker), str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[name]


def explode(self):
    raise ValueError("no such upload")


def make_app(settings, example, *subscribers):
    settings = {
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
        **settings,
    }
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks.jobs")
        config.scan(example)
        config.add_task(explode, bind=True, base=RetryableTransactionTask)
        for subscriber, event in subscribers:
            config.add_subscriber(subscriber, event)
    registry = config.registry
    engine = registry["dbsession_factory"].kw["bind"]
    metadata.create_all(engine)
    Base.metadata.create_all(engine)
    return registry, engine


def schedule(registry, *calls):
    """Each ``(task, args)`` scheduled in one committed transaction; the ids."""
    env = prepare(registry=registry)
    request = env["request"]
    try:
        with request.tm:
            request.dbsession.execute(select(1))  # the view's session joins
            ids = [t.apply_async(args, tm=request.tm).id for t, args in calls]
    finally:
        env["closer"]()
    return ids


def jobs(engine):
    columns = (Job.id, Job.state, Job.attempts, Job.progress, Job.progress_message)
    with engine.connect() as connection:
        rows = connection.execute(select(*columns, Job.error)).all()
    return {row.id: row for row in rows}


def count(engine, model):
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(model))


@pytest.fixture
def pg_settings(database_url, pg_schema):
    return {
        "sqlalchemy.url": database_url,
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
    }


def test_the_task_and_the_subscriber_of_the_docs(pg_settings, example, caplog):
    registry, engine = make_app(pg_settings, example)
    caplog.set_level(logging.INFO, logger=example.__name__)

    failing = registry.celery_app.tasks[f"{__name__}.explode"]
    ok, bad = schedule(
        registry, (example.import_rows, (7, ["a", "b", "c"])), (failing, ())
    )

    found = jobs(engine)
    print(f"jobs: {found}")
    assert found[ok][1:] == ("succeeded", 1, 100, "row 3 of 3", None)
    assert found[bad][1:] == ("failed", 1, None, None, "ValueError: no such upload")
    assert count(engine, Row) == 3
    with engine.connect() as connection:
        incidents = connection.execute(select(Incident.job_id, Incident.task)).all()
    assert incidents == [(bad, failing.name)]
    assert f"job {ok}, attempt 1" in caplog.messages


def test_a_job_cancelled_before_its_lock_runs_nothing_and_never_succeeds(
    pg_settings, example
):
    heard = []

    def cancel(event):
        heard.append(("started", event.job_id))
        event.request.registry.pyramid_tasks_jobs.store.cancel([event.job_id])

    registry, engine = make_app(
        pg_settings,
        example,
        (cancel, JobStarted),
        (lambda event: heard.append(("succeeded", event.job_id)), JobSucceeded),
    )

    [job_id] = schedule(registry, (example.import_rows, (7, ["a", "b"])))

    print(f"events: {heard}, rows: {count(engine, Row)}")
    assert heard == [("started", job_id)]
    assert jobs(engine)[job_id][1] == "cancelled"
    assert count(engine, Row) == 0


def test_on_sqlite_a_transactional_task_runs_without_recording_progress(
    tmp_path, example, caplog
):
    settings = {"sqlalchemy.url": f"sqlite:///{tmp_path}/app.sqlite"}
    registry, engine = make_app(settings, example)

    [job_id] = schedule(registry, (example.import_rows, (7, ["a", "b", "c"])))

    found = jobs(engine)[job_id]
    warnings = [m for m in caplog.messages if "progress is not recorded" in m]
    print(f"job: {found}, warnings: {warnings}")
    # progress 100 is the succeeded mark's, written in the task's transaction
    assert found[1:] == ("succeeded", 1, 100, None, None)
    assert count(engine, Row) == 3
    assert warnings == [
        f"Job tests_jobs_doc_example.import_rows[{job_id}]: progress is not "
        "recorded on SQLite while a transactional task holds the database."
    ]


_INI_SETTING = r"^    (tasks\.jobs\.\w+) = (\S+)$"
_PYTHON_SETTING = r'^        "(tasks\.jobs\.\w+)": "([^"]+)",$'


def test_the_settings_shown_are_every_setting_and_its_default():
    """docs/jobs.rst shows the job table's settings; docs/operating.rst
    those of the JSON API and the dashboard, which only they read (and which
    the app refuses without them): each page in Python and in INI alike,
    each setting described with its default."""
    api = sorted(f"tasks.jobs.{key}" for key in JOBS_INCLUDE_KEYS)
    shown = {}
    for page in (DOC, DOC.with_name("operating.rst")):
        text = page.read_text()
        ini = dict(re.findall(_INI_SETTING, text, re.M))
        python = dict(re.findall(_PYTHON_SETTING, text, re.M))
        if page is not DOC:  # its other examples set other values
            ini = {key: value for key, value in ini.items() if key in api}
        assert ini == python
        for key, value in ini.items():
            assert f"``{key}`` (``{value}``)" in text  # described, with its default
        shown[page.name] = ini
    assert sorted(shown["operating.rst"]) == api
    every = sorted(f"tasks.jobs.{f.name}" for f in fields(JobsSettings))
    assert sorted(shown["jobs.rst"]) == sorted(set(every) - set(api))
    assert parse_jobs_settings({**shown["jobs.rst"], **shown["operating.rst"]}) == (
        JobsSettings()
    )
