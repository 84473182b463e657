"""The Alembic recipe of docs/jobs.rst, followed as written.

A Pyramid app's Alembic project (the cookiecutter's ``env.py``, with the job
table's metadata listed next to the app's) autogenerates the first revision
against an empty PostgreSQL schema of the test's own; after the one edit the
docs ask for, ``alembic upgrade head`` creates the table and its indexes, and
a second autogenerate finds nothing to do.
"""

import re
import textwrap
from pathlib import Path

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

import pyramid_tasks.jobs
from demo_app.models import Base

# The table's indexes as init-db makes them: a migration makes the same.
from .test_jobs_cli import INDEXES as SHARED_INDEXES

# On PostgreSQL, the workspace's GIN index too.
INDEXES = {**SHARED_INDEXES, "ix_pyramid_tasks_job_workspace": (["workspace"], False)}

# The env.py of docs/jobs.rst ("Creating the table", Alembic).
ENV_PY = '''\
"""Pyramid bootstrap environment, with pyramid_tasks' job table."""

from alembic import context
from pyramid.paster import get_appsettings
from sqlalchemy import engine_from_config

import pyramid_tasks.jobs
from demo_app.models import Base

config = context.config
settings = get_appsettings(config.config_file_name)

target_metadata = [Base.metadata, pyramid_tasks.jobs.metadata]


def run_migrations_offline():
    context.configure(url=settings["sqlalchemy.url"], target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    engine = engine_from_config(settings, prefix="sqlalchemy.")
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''

# Alembic's own script template (``alembic init``'s generic one, trimmed).
SCRIPT_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

UNFINISHED = (
    "unique_key IS NOT NULL AND "
    "state IN ('pending', 'queued', 'scheduled', 'started', 'retrying')"
)


@pytest.fixture
def schema_url(database_url, pg_schema):
    """The URL of an empty schema of this test's own (as the search_path)."""
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{pg_schema}"'))
    engine.dispose()
    url = sqlalchemy.make_url(database_url)
    return url.update_query_dict({"options": f"-csearch_path={pg_schema}"})


def alembic_project(folder, url):
    """The app's INI (with an [alembic] section, as the cookiecutter's) and
    its migrations folder."""
    migrations = folder / "migrations"
    (migrations / "versions").mkdir(parents=True)
    (migrations / "env.py").write_text(ENV_PY)
    (migrations / "script.py.mako").write_text(SCRIPT_MAKO)
    # PasteDeploy interpolates %(name)s: a literal % is written %%.
    sqlalchemy_url = url.render_as_string(hide_password=False).replace("%", "%%")
    ini = folder / "development.ini"
    ini.write_text(
        textwrap.dedent(f"""\
            [app:main]
            use = egg:demo_app
            pyramid.includes = pyramid_tasks.jobs
            sqlalchemy.url = {sqlalchemy_url}
            celery.broker_url = memory://

            [alembic]
            script_location = %(here)s/migrations
            """)
    )
    return Config(str(ini))


def differences(url):
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            return compare_metadata(
                context, [Base.metadata, pyramid_tasks.jobs.metadata]
            )
    finally:
        engine.dispose()


def test_autogenerate_creates_the_job_table_and_upgrade_applies_it(
    schema_url, pg_schema, tmp_path
):
    config = alembic_project(tmp_path, schema_url)
    before = differences(schema_url)

    script = command.revision(config, message="init", autogenerate=True)
    path = Path(script.path)
    source = path.read_text()

    tables = re.findall(r"op\.create_table\('(\w+)'", source)
    indexes = re.findall(r"op\.create_index\('(\w+)'", source)
    print(f"differences before: {len(before)}, tables: {tables}, indexes: {indexes}")
    assert sorted(tables) == ["orders", "pyramid_tasks_job", "reports"]
    assert sorted(indexes) == sorted(INDEXES)
    [unique] = [
        line
        for line in source.splitlines()
        if "create_index('ix_pyramid_tasks_job_unique_key'" in line
    ]
    assert "unique=True" in unique
    assert f'postgresql_where=sa.text("{UNFINISHED}")' in unique
    # The revision needs nothing of pyramid_tasks: plain SQLAlchemy types.
    assert "pyramid_tasks.jobs" not in source
    assert source.count("sa.JSON()") == 3  # args, kwargs, options
    # The workspace: JSONB on PostgreSQL, with its GIN index.
    assert "postgresql.JSONB(" in source
    assert "postgresql_using='gin'" in source

    command.upgrade(config, "head")

    engine = sqlalchemy.create_engine(schema_url)
    try:
        inspector = sqlalchemy.inspect(engine)
        found = {ix["name"]: ix for ix in inspector.get_indexes("pyramid_tasks_job")}
        columns = {
            c["name"]: c["type"] for c in inspector.get_columns("pyramid_tasks_job")
        }
        with engine.connect() as connection:
            schema = connection.scalar(sqlalchemy.text("SELECT current_schema()"))
    finally:
        engine.dispose()
    assert schema == pg_schema
    assert {n: (ix["column_names"], ix["unique"]) for n, ix in found.items()} == (
        INDEXES
    )
    finished = found["ix_pyramid_tasks_job_finished"]["dialect_options"]
    assert finished["postgresql_where"] == "(finished_at IS NOT NULL)"
    where = found["ix_pyramid_tasks_job_unique_key"]["dialect_options"]
    assert "'retrying'" in where["postgresql_where"]
    assert "'succeeded'" not in where["postgresql_where"]
    parent = found["ix_pyramid_tasks_job_parent_state_created"]["dialect_options"]
    assert "parent_id IS NOT NULL" in parent["postgresql_where"]
    assert all(
        isinstance(columns[name], sqlalchemy.JSON)
        for name in ("args", "kwargs", "options")
    )

    after = differences(schema_url)
    print(f"differences after upgrade: {after}")
    assert after == []
    command.check(config)  # `alembic check`: a second autogenerate, no changes
