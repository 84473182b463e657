"""``tasks-celery CONFIG_URI jobs COMMAND``: the operators' commands.

``jobs init-db`` runs as the real console script on the demo app with
durable mode turned on from the INI (``pyramid.includes``), against a
PostgreSQL schema of the test's own and a SQLite file.  The command-line
mistakes run in-process through ``main``.
"""

import os
import subprocess
from datetime import UTC, datetime

import pytest
import sqlalchemy
from celery.bin.celery import celery as celery_command
from sqlalchemy import insert

from pyramid_tasks.cli import main
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.cli import USAGE

from .conftest import ROOT, free_port, tasks_celery

INDEXES = {
    "ix_pyramid_tasks_job_state_created": (["state", "created_at"], False),
    "ix_pyramid_tasks_job_queue_state_created": (
        ["queue", "state", "created_at"],
        False,
    ),
    "ix_pyramid_tasks_job_name_state_created": (["name", "state", "created_at"], False),
    "ix_pyramid_tasks_job_error_state_created": (["state", "created_at"], False),
    "ix_pyramid_tasks_job_finished": (["finished_at", "state", "name"], False),
    "ix_pyramid_tasks_job_parent_state_created": (
        ["parent_id", "state", "created_at"],
        False,
    ),
    "ix_pyramid_tasks_job_unique_key": (["unique_key"], True),
}
# The demo app takes these over its INI settings; Celery takes the brokers.
OVERRIDES = ("DATABASE_URL", "REDIS_URL", "SITE_URL", "BROKER_URL", "CELERY_BROKER_URL")
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
UNFINISHED = ("pending", "queued", "scheduled", "started", "retrying")


@pytest.fixture(autouse=True)
def celery_app_option():
    """``main`` hands its app to Celery's CLI as the default of ``-A``: undo it."""
    option = celery_command.params[0]
    default = option.default
    yield option
    option.default = default


def write_ini(path, url, *settings, jobs=True):
    """The demo app on ``url``; durable mode turned on in the INI."""
    lines = ["[app:main]", "use = egg:demo_app", f"sqlalchemy.url = {url}"]
    if jobs:
        lines.append("pyramid.includes = pyramid_tasks.jobs")
    lines += ["celery.broker_url = memory://", *settings]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_jobs(ini, *args, cwd):
    """The console script: ``(status, stdout, stderr)``."""
    result = subprocess.run(
        [tasks_celery(), str(ini), "jobs", *args],
        cwd=cwd,
        env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout, result.stderr


def with_password(database_url):
    """``database_url`` with a password to mask (PostgreSQL's trust
    authentication ignores one it did not ask for)."""
    url = sqlalchemy.make_url(database_url)
    return url.set(password=url.password or "s3cret-never-shown")


def indexes(engine, schema=None):
    found = sqlalchemy.inspect(engine).get_indexes(Job.__tablename__, schema=schema)
    return {ix["name"]: ix for ix in found}


def check_indexes(found, where_key):
    expected = dict(INDEXES)
    if where_key == "postgresql_where":  # the workspace's GIN index: none on SQLite
        expected["ix_pyramid_tasks_job_workspace"] = (["workspace"], False)
        workspace = found["ix_pyramid_tasks_job_workspace"]["dialect_options"]
        assert workspace["postgresql_using"] == "gin", workspace
        assert workspace["postgresql_ops"] == {"workspace": "jsonb_path_ops"}
        assert "workspace IS NOT NULL" in str(workspace[where_key]), workspace
    assert {n: (ix["column_names"], bool(ix["unique"])) for n, ix in found.items()} == (
        expected
    )
    where = str(found["ix_pyramid_tasks_job_unique_key"]["dialect_options"][where_key])
    assert all(f"'{state}'" in where for state in UNFINISHED), where
    assert "succeeded" not in where
    assert "unique_key IS NOT NULL" in where, where
    where = str(
        found["ix_pyramid_tasks_job_error_state_created"]["dialect_options"][where_key]
    )
    assert where.lower().replace("(", "").replace(")", "") == "error is not null", where
    finished = found["ix_pyramid_tasks_job_finished"]["dialect_options"][where_key]
    assert str(finished).strip("()") == "finished_at IS NOT NULL", finished
    parent = str(
        found["ix_pyramid_tasks_job_parent_state_created"]["dialect_options"][where_key]
    )
    assert "parent_id IS NOT NULL" in parent, parent
    partial = (
        "ix_pyramid_tasks_job_unique_key",
        "ix_pyramid_tasks_job_error_state_created",
        "ix_pyramid_tasks_job_finished",
        "ix_pyramid_tasks_job_parent_state_created",
        "ix_pyramid_tasks_job_workspace",
    )
    for name, ix in found.items():
        if name not in partial:
            assert not ix["dialect_options"].get(where_key), name


def check_unique_key_is_partial(engine):
    """Two unfinished jobs never share a unique_key; a finished one may."""

    def add(job_id, state):
        row = {"id": job_id, "name": "t", "state": state, "unique_key": "k"}
        with engine.begin() as connection:
            connection.execute(
                insert(Job.__table__).values(created_at=datetime.now(UTC), **row)
            )

    add("done", "succeeded")
    add("first", "queued")
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        add("second", "pending")
    add("another-done", "failed")


def test_init_db_on_postgresql_creates_the_table_once(
    database_url, pg_schema, tmp_path
):
    url = with_password(database_url)
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{pg_schema}"'))
    engine.dispose()
    ini = write_ini(
        tmp_path / "pg.ini",
        url.render_as_string(hide_password=False),
        f"demo.schema = {pg_schema}",
        # The demo would create the job table with its own at start.
        "demo.create_tables = false",
    )
    masked = url.render_as_string(hide_password=True)
    table = f"{pg_schema}.pyramid_tasks_job"

    first = run_jobs(ini, "init-db", cwd=tmp_path)
    second = run_jobs(ini, "init-db", cwd=tmp_path)

    print(f"first: {first}\nsecond: {second}")
    assert first == (0, f"Created table {table} in {masked}.\n", "")
    assert second == (0, f"Table {table} already exists in {masked}.\n", "")
    assert url.password not in first[1] + second[1]
    engine = sqlalchemy.create_engine(database_url)
    try:
        check_indexes(indexes(engine, pg_schema), "postgresql_where")
        # A table of a release before workspaces: the column and its index
        # are added, the rows kept.
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text(
                    f'ALTER TABLE "{pg_schema}".pyramid_tasks_job DROP COLUMN workspace'
                )
            )
        third = run_jobs(ini, "init-db", cwd=tmp_path)
        print(f"third: {third}")
        assert third == (
            0,
            f"Table {table} already exists in {masked}.\n"
            "Added its missing columns: workspace.\n"
            "Created its missing indexes: ix_pyramid_tasks_job_workspace.\n",
            "",
        )
        check_indexes(indexes(engine, pg_schema), "postgresql_where")
        engine = engine.execution_options(schema_translate_map={None: pg_schema})
        check_unique_key_is_partial(engine)
    finally:
        engine.dispose()


def test_init_db_adds_the_columns_and_indexes_an_older_table_lacks(tmp_path):
    path = tmp_path / "var" / "app.sqlite"
    ini = write_ini(tmp_path / "lite.ini", "sqlite:///%(here)s/var/app.sqlite")
    assert run_jobs(ini, "init-db", cwd=tmp_path)[0] == 0
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:  # a table of an earlier release
        for name in ("queue_state_created", "name_state_created"):
            connection.execute(
                sqlalchemy.text(f"DROP INDEX ix_pyramid_tasks_job_{name}")
            )
        connection.execute(
            sqlalchemy.text("ALTER TABLE pyramid_tasks_job DROP COLUMN workspace")
        )

    again = run_jobs(ini, "init-db", cwd=tmp_path)

    print(f"again: {again}")
    assert again == (
        0,
        f"Table pyramid_tasks_job already exists in sqlite:///{path}.\n"
        "Added its missing columns: workspace.\n"
        "Created its missing indexes: ix_pyramid_tasks_job_name_state_created, "
        "ix_pyramid_tasks_job_queue_state_created.\n",
        "",
    )
    columns = sqlalchemy.inspect(engine).get_columns("pyramid_tasks_job")
    assert "workspace" in [column["name"] for column in columns]
    try:
        check_indexes(indexes(engine), "sqlite_where")
    finally:
        engine.dispose()


def test_init_db_on_a_sqlite_file(tmp_path):
    path = tmp_path / "var" / "app.sqlite"  # the demo makes var/
    ini = write_ini(tmp_path / "lite.ini", "sqlite:///%(here)s/var/app.sqlite")

    first = run_jobs(ini, "init-db", cwd=tmp_path)
    second = run_jobs(ini, "init-db", cwd=tmp_path)

    print(f"first: {first}\nsecond: {second}")
    assert first == (0, f"Created table pyramid_tasks_job in sqlite:///{path}.\n", "")
    assert second == (
        0,
        f"Table pyramid_tasks_job already exists in sqlite:///{path}.\n",
        "",
    )
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        check_indexes(indexes(engine), "sqlite_where")
        check_unique_key_is_partial(engine)
    finally:
        engine.dispose()


def test_init_db_without_durable_mode_is_one_line(tmp_path):
    ini = write_ini(
        tmp_path / "plain.ini", f"sqlite:///{tmp_path}/app.sqlite", jobs=False
    )

    status, out, err = run_jobs(ini, "init-db", cwd=tmp_path)

    assert (status, out) == (1, "")
    assert err == (
        "tasks-celery: error: the app does not include pyramid_tasks.jobs: add "
        "config.include('pyramid_tasks.jobs') to use the jobs commands.\n"
    )
    assert not (tmp_path / "app.sqlite").exists()  # never connected


def test_init_db_database_down_is_one_line_without_the_password(tmp_path, capsys):
    url = f"postgresql+psycopg://ann:s3cret@127.0.0.1:{free_port()}/x"
    ini = write_ini(tmp_path / "down.ini", url)

    assert main([str(ini), "jobs", "init-db"]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tasks-celery: error: jobs init-db: OperationalError: ")
    assert err.count("\n") == 1
    assert "s3cret" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (
            ["nope"],
            "argument COMMAND: invalid choice: 'nope' (choose from 'list', 'show', "
            "'cancel', 'clear', 'retry', 'run-now', 'test', 'depth', 'prune', 'drain', "
            "'init-db')",
        ),
        (["init-db", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_jobs_usage_errors_print_the_usage_line(args, message, tmp_path, capsys):
    ini = write_ini(tmp_path / "app.ini", "sqlite://")

    assert main([str(ini), "jobs", *args]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"tasks-celery: error: {message}\nusage: {USAGE}\n"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["init-db", "-h"]])
def test_jobs_help_exits_0_without_loading_the_app(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-file.ini", "jobs", *args])

    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    if args[0] == "init-db":
        assert out.startswith(f"usage: {USAGE.removesuffix(' COMMAND ...')} init-db")
        assert "Create the table pyramid_tasks_job and its indexes" in out
    else:
        assert out.startswith(f"usage: {USAGE}\n")
        assert "init-db   create the job table (for apps without migrations)" in out


def test_a_word_jobs_after_double_dash_goes_to_celery(tmp_path, capsys):
    """``CONFIG -- ...`` is Celery's command line, "jobs" in it or not."""
    ini = write_ini(tmp_path / "app.ini", "sqlite://")

    with pytest.raises(SystemExit) as info:
        main([str(ini), "--", "jobs"])

    assert info.value.code == 2  # Click's own usage error
    err = capsys.readouterr().err
    assert err.startswith(f"Usage: tasks-celery {ini} -- ")
    assert "No such command 'jobs'" in err


def test_a_database_error_is_its_own_first_line(database_url, pg_schema, tmp_path):
    """The schema named by demo.schema does not exist: init-db does not make
    it, and says so in one line, without the SQL."""
    url = with_password(database_url)
    ini = write_ini(
        tmp_path / "noschema.ini",
        url.render_as_string(hide_password=False),
        f"demo.schema = {pg_schema}",
        "demo.create_tables = false",
    )
    status, out, err = run_jobs(ini, "init-db", cwd=tmp_path)
    print(err)
    assert (status, out) == (1, "")
    assert err.startswith("tasks-celery: error: jobs init-db: ProgrammingError: ")
    assert "CREATE TABLE" not in err and len(err.splitlines()) == 1
