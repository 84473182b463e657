"""A bad setting through ``pserve`` and ``get_app``: our message and where.

Pyramid wraps an error of a deferred action in ConfigurationExecutionError,
whose text ends with the action's location: the app's include of pyramid_tasks,
never "Line 0 of file None".
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationExecutionError
from pyramid.paster import get_app

from tests.pkgs import cli_app

from .conftest import ROOT

MESSAGE = "Invalid setting tasks.retry.attempts = 'three': expected an integer."


def include_line(function, text='config.include("pyramid_tasks")'):
    """``(file, line number)`` of ``text`` in ``function``'s source."""
    lines, first = inspect.getsourcelines(function)
    [offset] = [i for i, line in enumerate(lines) if text in line]
    return inspect.getsourcefile(function), first + offset


def location(path, line, source):
    return f"Line {line} of file {path}:\n    {source}"


@pytest.fixture
def bad_ini(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text(
        "[app:main]\n"
        "use = call:tests.pkgs.cli_app:main\n"
        "celery.broker_url = memory://\n"
        "tasks.retry.attempts = three\n"
        "\n"
        "[server:main]\n"
        "use = egg:waitress#main\n"
        "listen = 127.0.0.1:0\n"
    )
    return ini


def test_get_app_names_the_setting_and_the_include(bad_ini):
    with pytest.raises(ConfigurationExecutionError) as info:
        get_app(str(bad_ini))

    path, line = include_line(cli_app.main)
    assert str(info.value.evalue) == MESSAGE
    assert str(info.value).endswith(
        f"{MESSAGE}\n  in:\n  "
        + location(path, line, 'config.include("pyramid_tasks")')
    )
    assert "Line 0 of file None" not in str(info.value)


def run_pserve(ini, cwd):
    """``pserve ini`` in a subprocess, its output captured."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "pserve"), str(ini)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pserve_ends_with_the_message_and_the_include(bad_ini, tmp_path):
    result = run_pserve(bad_ini, tmp_path)

    path, line = include_line(cli_app.main)
    assert result.returncode == 1
    assert "Line 0 of file None" not in result.stderr
    assert result.stderr.endswith(
        f"{MESSAGE}\n  in:\n  "
        + location(path, line, 'config.include("pyramid_tasks")')
        + "\n"
    ), result.stderr


DURING = "\n\nDuring handling of the above exception, another exception occurred:\n\n"


def test_pserve_shows_our_error_without_its_inner_frames_or_cause(bad_ini, tmp_path):
    """Pyramid re-raises while handling ours, so Python prints both; ours is cut
    to the action's frame and its message (no ValueError it came from)."""
    result = run_pserve(bad_ini, tmp_path)

    ours, pyramids = result.stderr.split(DURING)
    assert "The above exception was the direct cause" not in result.stderr
    assert "ValueError" not in result.stderr
    assert ours.startswith("Traceback (most recent call last):\n")
    assert ours.endswith(f"\npyramid.exceptions.ConfigurationError: {MESSAGE}")
    assert pyramids.startswith("Traceback (most recent call last):\n")
    # Our package shows one frame in each traceback: the deferred action.
    frames = [
        line.split(", in ")[1]
        for line in result.stderr.splitlines()
        if line.startswith('  File "') and "/pyramid_tasks/" in line
    ]
    assert frames == ["action", "action"]
    assert result.stderr.count(MESSAGE) == 2


def app_from_pyramid_includes():
    settings = {"pyramid.includes": "pyramid_tasks", "tasks.retry.attempts": "x"}
    return Configurator(settings=settings)


def test_pyramid_includes_points_at_the_configurator():
    """Included by a setting: the app's own line is where it made its config."""
    config = app_from_pyramid_includes()

    with pytest.raises(ConfigurationExecutionError) as info:
        config.commit()

    source = "return Configurator(settings=settings)"
    path, line = include_line(app_from_pyramid_includes, source)
    assert str(info.value).endswith("\n  in:\n  " + location(path, line, source))
