"""``tasks-celery CONFIG_URI [--var name=value ...] -- CELERY_ARGS...``

In-process tests of ``parse_args``, ``load`` and ``main`` on the apps of
``tests/ini/apps.ini`` (``tests/pkgs/cli_app``), and a few runs of the real
console script for what only a process shows: its exit status and stderr.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery.bin.celery import celery as celery_command

from pyramid_tasks.cli import (
    EXAMPLE,
    USAGE,
    LoadError,
    UsageError,
    broker_option,
    load,
    main,
    parse_args,
)

from .conftest import ROOT, TEST_INI, free_port, tasks_celery

INI_DIR = Path(__file__).resolve().parent / "ini"
APPS_INI = INI_DIR / "apps.ini"


@pytest.fixture(autouse=True)
def celery_app_option():
    """``main`` hands its app to Celery's CLI as the default of ``-A``: undo it."""
    option = celery_command.params[0]
    assert option.name == "app"
    default = option.default
    yield option
    option.default = default


def write_ini(
    tmp_path, *settings, use="call:tests.pkgs.cli_app:main", broker="memory://"
):
    path = tmp_path / "app.ini"
    lines = ["[app:main]", f"use = {use}"]
    if broker:
        lines.append(f"celery.broker_url = {broker}")
    path.write_text("\n".join([*lines, *settings]) + "\n")
    return path


def fails(argv, capsys):
    """``main(argv)``'s stderr, checking it is one line and status 1."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tasks-celery: error: ")
    assert "Traceback" not in err
    return err


def usage_error(argv, capsys):
    """A command-line mistake: the paragraph, then the usage line."""
    err = fails(argv, capsys)
    paragraph, usage = err.splitlines()
    assert usage == f"usage: {USAGE}"
    return paragraph


def load_error(argv, capsys):
    """The INI or its app is wrong, not the command line: no usage line."""
    err = fails(argv, capsys)
    assert err.count("\n") == 1, err
    assert "usage" not in err
    return err


# parse_args


def test_parse_args_splits_at_the_first_double_dash():
    argv = ["conf/x.ini", "--var", "a=1", "--var", "b=x=y", "--", "worker", "--"]

    config_uri, variables, celery_args = parse_args(argv)

    assert config_uri == "conf/x.ini"
    assert variables == {"a": "1", "b": "x=y"}
    assert celery_args == ["worker", "--"]


def test_parse_args_var_is_repeatable_the_last_one_wins_and_may_be_empty():
    argv = ["x.ini", "--var", "q=1", "--var", " q =2", "--var", "empty=", "--"]

    assert parse_args(argv) == ("x.ini", {"q": "2", "empty": ""}, [])


def test_parse_args_without_double_dash_is_a_usage_error_with_an_example():
    with pytest.raises(UsageError, match="must follow '--'") as info:
        parse_args(["conf/production.ini", "worker"])
    assert EXAMPLE in str(info.value)


@pytest.mark.parametrize(
    "argv", [["-h"], ["--help"], ["conf.ini", "--help"], ["-h", "--", "report"]]
)
def test_parse_args_help_prints_usage_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)

    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {USAGE}")
    assert "--var NAME=VALUE" in out
    assert f"Example: {EXAMPLE}" in out


@pytest.mark.parametrize("item", ["queue", "=value", " =value"])
def test_parse_args_var_needs_a_name_and_an_equals_sign(item):
    with pytest.raises(UsageError, match="must be NAME=VALUE") as info:
        parse_args(["x.ini", "--var", item, "--", "report"])
    assert repr(item) in str(info.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus", "x.ini", "--", "report"], "unrecognized arguments: --bogus"),
        (["x.ini", "y.ini", "--", "report"], "unrecognized arguments: y.ini"),
        (["--", "report"], "required: config_uri"),
        (["x.ini", "--var", "--", "report"], "expected one argument"),
    ],
)
def test_parse_args_argparse_errors_are_usage_errors_not_exit_2(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


# load: --var and %(here)s


def test_var_fills_a_variable_that_has_no_default_and_here_is_the_ini_folder():
    config_uri, variables, _ = parse_args(
        [str(APPS_INI), "--var", "queue=from_var", "--", "report"]
    )

    app = load(config_uri, variables)

    assert app.conf.task_default_queue == "from_var"
    assert app.conf.beat_schedule_filename == f"{INI_DIR}/beat-schedule"


def test_var_never_overrides_a_default_value_pastedeploy_keeps_the_file_one():
    # PasteDeploy merges --var into [DEFAULT] with overwrite=False, so a name
    # the file defines there cannot be changed from the command line; only a
    # %(name)s with no [DEFAULT] value is a real command-line variable.
    app = load(str(APPS_INI), {"queue": "q", "site_url": "https://example.org/ignored"})

    settings = app.pyramid_registry.pyramid_tasks_settings
    assert settings.site_url == "https://example.com/from-default"


# main: one paragraph on stderr and status 1


def test_main_missing_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.ini"

    err = usage_error([str(missing), "--", "report"], capsys)

    assert f"config file {missing} not found" in err


def test_main_without_double_dash_shows_the_example(capsys):
    err = usage_error([str(APPS_INI)], capsys)

    assert EXAMPLE in err


def test_main_reads_sys_argv_by_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tasks-celery", "--bogus", "x.ini", "--"])

    err = usage_error(None, capsys)

    assert "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "celery.broker_ulr = x",
            "Unknown setting celery.broker_ulr: did you mean celery.broker_url?",
        ),
        (
            "tasks.retry.attempts = three",
            "Invalid setting tasks.retry.attempts = 'three': expected an integer.",
        ),
        (
            "celery.broker_pool_limit = many",
            "Invalid setting celery.broker_pool_limit = 'many': expected an integer.",
        ),
    ],
)
def test_main_bad_setting_names_the_key(setting, expected, tmp_path, capsys):
    ini = write_ini(tmp_path, setting)

    err = load_error([str(ini), "--", "report"], capsys)

    assert f"bad configuration in {ini}: {expected}" in err


def test_main_without_a_broker_names_the_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    ini = write_ini(tmp_path, broker=None)

    err = load_error([str(ini), "--", "report"], capsys)

    assert err == (
        f"tasks-celery: error: bad configuration in {ini}: No broker: set "
        "celery.broker_url, for example redis://127.0.0.1:6379/0; Celery would "
        "otherwise use amqp://localhost.\n"
    )


def test_main_in_eager_mode_still_needs_a_broker(tmp_path, capsys, monkeypatch):
    """Eager mode spares the web process a broker, not a worker."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    ini = write_ini(tmp_path, "celery.task_always_eager = true", broker=None)

    err = load_error([str(ini), "--", "worker"], capsys)

    assert err.startswith(
        f"tasks-celery: error: bad configuration in {ini}: No broker: eager mode "
        "(celery.task_always_eager = true) runs tasks in the web process without "
        "one, but workers, beat and every tasks-celery command need one: set "
        "celery.broker_url"
    )


@pytest.mark.parametrize(
    ("celery_args", "broker"),
    [
        (["-b", "memory://b", "report"], "memory://b"),
        (["-bmemory://b", "report"], "memory://b"),
        (["--broker", "memory://b", "report"], "memory://b"),
        (["--broker=memory://b", "report"], "memory://b"),
        (["-q", "-C", "-qb", "memory://b", "report"], "memory://b"),
        (["-qbmemory://b", "report"], "memory://b"),
        (["-A", "-b", "--app=x", "--workdir", ".", "-b", "memory://b"], "memory://b"),
        (["-b", "memory://1", "-b", "memory://2", "report"], "memory://2"),
        (["--broker"], ""),
        (["-b", "", "report"], ""),
        (["-A", "-b", "report"], ""),  # -A takes -b as its value
        (["-Ab", "report", "-b", "memory://b"], ""),  # the app is "b"
        (["report", "-b", "memory://b"], ""),  # the subcommand's, not Celery's
        (["-", "-b", "memory://b"], ""),
        (["--", "-b", "memory://b"], ""),
        ([], ""),
    ],
)
def test_broker_option_reads_celery_global_option(celery_args, broker, monkeypatch):
    monkeypatch.delenv("BROKER_URL", raising=False)

    assert broker_option(celery_args) == broker


def test_broker_option_reads_broker_url_as_click_does(monkeypatch):
    monkeypatch.setenv("BROKER_URL", "memory://env")

    assert broker_option(["report"]) == "memory://env"
    assert broker_option(["-b", "memory://b", "report"]) == "memory://b"


def test_load_takes_celery_broker_option_for_the_ini_broker(tmp_path, monkeypatch):
    # Recorded (set), so that the teardown removes what load() puts there.
    monkeypatch.setenv("CELERY_BROKER_URL", "")
    monkeypatch.delenv("BROKER_URL", raising=False)
    ini = write_ini(tmp_path, "celery.task_always_eager = true", broker=None)

    with pytest.raises(LoadError, match="No broker: eager mode"):
        load(str(ini), {}, ["report", "--broker=memory://"])
    app = load(str(ini), {}, ["--broker=memory://", "report"])

    assert app.conf.broker_url == os.environ["CELERY_BROKER_URL"] == "memory://"


PING = ("tests.pkgs.cli_app.ping",)


def test_script_honours_celery_broker_option(redis_client, redis_url, tmp_path):
    """``-b`` before the subcommand is Celery's own option: no "No broker"."""
    queue = f"pyramid_tasks_test_cli_b_{uuid.uuid4().hex[:12]}"
    ini = write_ini(tmp_path, f"celery.task_default_queue = {queue}", broker=None)
    env = {k: v for k, v in os.environ.items() if "BROKER" not in k}
    try:
        result = subprocess.run(
            [tasks_celery(), str(ini), "--", "-b", redis_url, "call", *PING],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert result.returncode == 0, result.stderr
        task_id = result.stdout.strip()
        [raw] = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)
    assert json.loads(raw)["headers"]["id"] == task_id


def test_main_masks_the_password_of_a_bad_url_setting(tmp_path, capsys):
    ini = write_ini(tmp_path, "tasks.site_url = https://ann:s3cret@example.com/app")

    err = load_error([str(ini), "--", "report"], capsys)

    assert "tasks.site_url = 'https://ann:***@example.com/app'" in err
    assert "s3cret" not in err


def test_main_missing_variable_names_it_and_masks_the_raw_value(tmp_path, capsys):
    ini = write_ini(tmp_path, "celery.result_backend = redis://:s3cret@%(host)s/0")

    err = load_error([str(ini), "--", "report"], capsys)

    assert f"cannot load {ini}:" in err
    assert "'host'" in err
    assert "s3cret" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("this is not an ini file\n", "no section headers"),
        ("[app:main]\nuse = egg:demo_app\nuse = egg:demo_app\n", "already exists"),
    ],
)
def test_main_ini_syntax_error_is_one_paragraph(text, expected, tmp_path, capsys):
    ini = tmp_path / "broken.ini"
    ini.write_text(text)

    err = load_error([str(ini), "--", "report"], capsys)

    assert f"cannot load {ini}:" in err
    assert expected in err


def test_main_app_without_pyramid_tasks(capsys):
    err = load_error([f"{APPS_INI}#no_tasks", "--", "report"], capsys)

    assert "does not include pyramid_tasks" in err
    assert "config.include('pyramid_tasks')" in err


def test_main_missing_section(capsys):
    err = load_error([f"{APPS_INI}#nosuch", "--", "report"], capsys)

    assert f"cannot load {APPS_INI}#nosuch: LookupError: No section 'nosuch'" in err


def test_main_bad_database_url_is_one_paragraph_without_the_password(capsys):
    err = load_error([f"{APPS_INI}#bad_database_url", "--", "report"], capsys)

    assert "NoSuchModuleError" in err
    assert "nosuchdriver" in err
    assert "hunter2" not in err


def test_main_use_names_a_missing_module(capsys):
    err = load_error([f"{APPS_INI}#missing_module", "--", "report"], capsys)

    assert "No module named 'nonexistent_module_for_pyramid_tasks_tests'" in err


# main: success hands over to Celery's own command line


def test_main_runs_the_celery_command_on_the_ini_app(capsys, celery_app_option):
    argv = [str(APPS_INI), "--var", "queue=reported", "--", "report"]

    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "loader   -> pyramid_tasks.loader.PyramidLoader" in out
    assert "task_default_queue: 'reported'" in out
    assert f"beat_schedule_filename: '{INI_DIR}/beat-schedule'" in out
    assert celery_app_option.default.conf.task_default_queue == "reported"


def test_main_leaves_celery_usage_errors_to_click(capsys):
    with pytest.raises(SystemExit) as info:
        main([f"{APPS_INI}#fixed", "--", "--no-such-option"])

    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Usage: tasks-celery {APPS_INI}#fixed -- ")
    assert "Error: No such option '--no-such-option'" in err


# The console script


def run_tasks_celery(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [tasks_celery(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_bad_setting_is_one_paragraph_and_status_1(tmp_path):
    ini = write_ini(tmp_path, "tasks.retry.attempts = three")

    result = run_tasks_celery(str(ini), "--", "report", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"tasks-celery: error: bad configuration in {ini}: Invalid setting "
        "tasks.retry.attempts = 'three': expected an integer.\n"
    )
    assert result.stdout == ""


def test_script_without_double_dash_is_status_1(tmp_path):
    result = run_tasks_celery(str(TEST_INI), cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert EXAMPLE in result.stderr
    assert result.stderr.endswith(f"\nusage: {USAGE}\n")


def test_script_sends_through_the_ini_broker_with_var_values(
    redis_client, redis_url, tmp_path
):
    queue = f"pyramid_tasks_test_cli_{uuid.uuid4().hex[:12]}"
    try:
        result = run_tasks_celery(
            f"{APPS_INI}#redis",
            *("--var", f"redis_url={redis_url}", "--var", f"queue={queue}"),
            *("--", "call", "tests.pkgs.cli_app.ping"),
            cwd=tmp_path,
        )

        assert result.returncode == 0, result.stderr
        task_id = result.stdout.strip()
        [raw] = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)
    headers = json.loads(raw)["headers"]
    assert headers["task"] == "tests.pkgs.cli_app.ping"
    assert headers["id"] == task_id


def test_main_without_arguments_asks_for_the_config(capsys):
    err = usage_error([], capsys)
    assert "missing CONFIG_URI" in err


def test_main_database_down_is_one_paragraph(capsys, tmp_path):
    ini = tmp_path / "down.ini"
    ini.write_text(
        "[app:main]\n"
        "use = egg:demo_app\n"
        "demo.create_tables = true\n"  # so it connects at start-up
        f"sqlalchemy.url = postgresql+psycopg://postgres:pw@127.0.0.1:{free_port()}/x\n"
        "celery.broker_url = memory://\n"
    )
    err = load_error([str(ini), "--", "report"], capsys)
    assert "OperationalError" in err
    assert "Background on this error" not in err
    assert ":pw@" not in err


def test_main_refuses_multi(capsys):
    err = usage_error([str(TEST_INI), "--", "multi", "start", "w1"], capsys)
    assert "celery multi" in err and "process supervisor" in err
