"""The cookiecutter's model wiring: ``request.dbsession`` bound to ``request.tm``."""

import os

from pyramid.settings import asbool
from sqlalchemy import engine_from_config, exc, text
from sqlalchemy.orm import sessionmaker

from pyramid_tasks import jobs
from pyramid_tasks.sqlalchemy import get_tm_session, register_factory

from .meta import Base
from .order import Order
from .report import Report

__all__ = [
    "Base",
    "Order",
    "Report",
    "get_engine",
    "get_session_factory",
    "get_tm_session",
]


def get_engine(settings, prefix="sqlalchemy."):
    engine = engine_from_config(settings, prefix)
    if engine.url.get_backend_name() == "sqlite" and engine.url.database:
        # The demo keeps its SQLite files under var/, created on first start.
        os.makedirs(
            os.path.dirname(os.path.abspath(engine.url.database)), exist_ok=True
        )
    schema = settings.get("demo.schema")
    if schema:
        # Every table in its own schema: several copies of the demo share a DB.
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


def get_session_factory(engine):
    # zope.sqlalchemy's listeners once on the factory, not on every session
    # (the cookiecutter's get_tm_session registers each one: ~0.1 ms).
    return register_factory(sessionmaker(bind=engine))


def create_tables(engine, schema=None):
    # The web server, the worker and beat start together and each creates
    # what is missing: create_all looks, then creates, so two of them can
    # both find a table missing, and the loser's CREATE fails ("already
    # exists"). Each such failure means another process created a table
    # meanwhile (on SQLite each CREATE commits by itself; on PostgreSQL the
    # loser waited for the winner's whole COMMIT), so looking again, at most
    # once per table, ends with all of them there.
    tables = len(Base.metadata.tables) + len(jobs.metadata.tables)
    for attempt in range(tables + 1):
        try:
            with engine.begin() as connection:
                if schema:
                    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                Base.metadata.create_all(connection)
                # pyramid_tasks_job, durable mode's job table (an app with
                # Alembic lists jobs.metadata in its env.py's
                # target_metadata instead).
                jobs.metadata.create_all(connection)
            return
        except exc.DBAPIError:
            if attempt == tables:
                raise


def includeme(config):
    settings = config.get_settings()
    settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    config.include("pyramid_tm")
    config.include("pyramid_retry")

    engine = get_engine(settings)
    if asbool(settings.get("demo.create_tables", "false")):
        create_tables(engine, settings.get("demo.schema"))
    session_factory = get_session_factory(engine)
    config.registry["dbsession_factory"] = session_factory

    def dbsession(request):
        dbsession = request.environ.get("app.dbsession")
        if dbsession is None:
            dbsession = get_tm_session(session_factory, request.tm, request=request)
            request.environ["app.dbsession"] = dbsession
        return dbsession

    config.add_request_method(dbsession, reify=True)
