"""Every INI example of the documentation (``.. code-block:: ini``) is read as
an INI file would be and its settings are parsed by the package's own
parsers: a renamed or mistyped setting, or a value the parser refuses (an
inline comment, which INI keeps as part of the value), cannot stay in the
docs."""

import configparser
import re
import textwrap
from pathlib import Path

import pytest

from pyramid_tasks.dashboard import parse_dashboard_settings
from pyramid_tasks.schedule import parse_beat_settings
from pyramid_tasks.settings import (
    parse_celery_settings,
    parse_jobs_settings,
    parse_tasks_settings,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^( *)\.\. code-block:: ini\n((?:\1 +.*\n|[ \t]*\n)+)", re.M)
_PARSERS = (
    parse_celery_settings,
    parse_tasks_settings,
    parse_jobs_settings,
    parse_beat_settings,
    parse_dashboard_settings,
)


def ini_blocks():
    """``(page:line, text)`` of each INI block of the docs."""
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield f"{page.name}:{line}", textwrap.dedent(match.group(2))


BLOCKS = dict(ini_blocks())


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
