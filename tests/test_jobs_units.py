"""Small parts of durable mode, in-process: the JSON columns, the model's
repr, a relay never started, and the task API outside a tracked run."""

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy
from pyramid.config import Configurator
from sqlalchemy import select

from pyramid_tasks import PyramidTask
from pyramid_tasks.jobs import Job, metadata
from pyramid_tasks.jobs.model import utcnow
from pyramid_tasks.jobs.relay import Relay


def observe(self, other=None):
    """Report what the task API gives in this run (and on another task)."""
    target = self if other is None else self.app.tasks[other]
    target.set_progress(1, 2, "half")  # nothing to record: not a tracked run
    return {
        "job": target.job,
        "cancel_requested": target.cancel_requested(),
    }


def app_with(settings, *includes):
    config = Configurator(settings=settings)
    config.include("demo_app.models")
    config.include("pyramid_tasks")
    for name in includes:
        config.include(name)
    config.add_task(observe, bind=True, base=PyramidTask, name="observe")
    config.add_task(observe, bind=True, base=PyramidTask, name="other")
    config.commit()
    return config.registry


def test_json_columns_keep_celery_types_and_nulls(database_url, pg_schema):
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{pg_schema}"'))
    engine = engine.execution_options(schema_translate_map={None: pg_schema})
    metadata.create_all(engine)
    when = datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC)
    key = uuid.uuid4()
    job_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            Job.__table__.insert(),
            [
                {
                    "id": job_id,
                    "name": "t",
                    "state": "pending",
                    "created_at": utcnow(),
                    "args": [when, key, Decimal("1.5")],
                    "kwargs": None,
                    "options": {"eta": when},
                }
            ],
        )
    with engine.connect() as connection:
        row = connection.execute(select(Job.__table__)).one()
        raw = connection.execute(
            select(sqlalchemy.cast(Job.__table__.c.args, sqlalchemy.Text))
        ).scalar()
    assert row.args == [when, key, Decimal("1.5")]
    assert (row.kwargs, row.options) == (None, {"eta": when})
    assert '"__type__": "datetime"' in raw  # plain JSON in the database
    job = Job(id=job_id, name="t", state="pending")
    assert repr(job) == f"<Job t[{job_id}] pending>"
    engine.dispose()


def test_the_task_api_outside_a_tracked_run(database_url, pg_schema):
    """Called directly, eagerly without durable mode, or on another task:
    no job, never cancelled, progress ignored."""
    settings = {
        "sqlalchemy.url": database_url,
        "demo.schema": pg_schema,
        "demo.create_tables": "true",
        "celery.broker_url": "memory://",
        "celery.task_always_eager": "true",
    }
    plain = app_with(settings).celery_app
    assert plain.tasks["observe"].apply().get() == {
        "job": None,
        "cancel_requested": False,
    }
    durable = app_with(settings, "pyramid_tasks.jobs").celery_app
    task = durable.tasks["observe"]
    assert task() == {"job": None, "cancel_requested": False}  # called directly
    # A tracked eager run asking about another task gets nothing of its own.
    assert task.apply(("other",)).get() == {"job": None, "cancel_requested": False}
    Relay(durable).stop()  # never started: nothing to stop


def tx_body(self):
    return "ran"


def test_a_wrong_request_session_is_named(database_url, pg_schema):
    from pyramid.exceptions import ConfigurationError

    from pyramid_tasks import TransactionalTask

    config = Configurator(
        settings={
            "sqlalchemy.url": database_url,
            "demo.schema": pg_schema,
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "tasks.jobs.request_session": "db_session",
        }
    )
    config.include("demo_app.models")
    config.include("pyramid_tasks.jobs")
    config.add_task(tx_body, bind=True, base=TransactionalTask, name="tx")
    config.commit()
    result = config.registry.celery_app.tasks["tx"].apply()
    assert isinstance(result.result, ConfigurationError)
    assert str(result.result) == (
        "Setting tasks.jobs.request_session = 'db_session': the request of "
        "task tx has no attribute 'db_session'; name the request attribute of "
        "the session joined to request.tm (the cookiecutter's is dbsession)."
    )
