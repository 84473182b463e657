"""Every INI example of the documentation (``.. code-block:: ini``) is read as
an INI file would be and its settings are parsed by the package's own
parsers: a renamed or mistyped setting, or a value the parser refuses (an
inline comment, which INI keeps as part of the value), cannot stay in the
docs."""

import configparser
import re

import pytest

from pyramid_tasks.dashboard import parse_dashboard_settings
from pyramid_tasks.schedule import parse_beat_settings
from pyramid_tasks.settings import (
    parse_celery_settings,
    parse_jobs_settings,
    parse_tasks_settings,
)

from .docs_blocks import code_blocks

_PARSERS = (
    parse_celery_settings,
    parse_tasks_settings,
    parse_jobs_settings,
    parse_beat_settings,
    parse_dashboard_settings,
)

BLOCKS = code_blocks("ini")


def test_the_docs_have_ini_examples_to_check():
    assert len(BLOCKS) >= 25
    settings = [b for b in BLOCKS.values() if re.search(r"^(tasks|celery)\.", b, re.M)]
    assert len(settings) >= 20


@pytest.mark.parametrize("where", BLOCKS)
def test_an_ini_example_is_what_the_settings_parsers_accept(where):
    body = BLOCKS[where]
    if not body.lstrip().startswith("["):  # a fragment of [app:main]
        body = f"[app:main]\n{body}"
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # PasteDeploy keeps the keys' case
    parser.read_string(body, source=where)
    for section in parser.sections():
        settings = dict(parser[section])
        for parse in _PARSERS:
            parse(settings)
