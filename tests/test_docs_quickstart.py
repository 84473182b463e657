"""docs/quickstart.rst, run: its ``pshell`` session is a doctest against the
cookiecutter app the page shows (``tests/pkgs/cookiecutter_app``, imported
as ``myproject``, the page's project name), configured with the cookiecutter's
``testing.ini`` and the page's first INI block in place of the capture, and
set up by the app's own ``pshell.py``."""

import configparser
import doctest
import io
import sys

import pytest
from pyramid.paster import get_appsettings
from pyramid.scripting import prepare

import tests.pkgs.cookiecutter_app as myproject
from tests.pkgs.cookiecutter_app import main, models, pshell, tasks
from tests.pkgs.cookiecutter_app.models.meta import Base

from .docs_blocks import DOCS, code_blocks

PAGE = DOCS / "quickstart.rst"
TESTING_INI = DOCS.parent / "tests" / "pkgs" / "cookiecutter_app" / "testing.ini"


def _development_settings():
    """The settings of the page's first INI block (development.ini's)."""
    blocks = code_blocks("ini").items()
    [first, *_] = (block for where, block in blocks if "quickstart" in where)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(f"[app:main]\n{first}")
    return dict(parser["app:main"])


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """The names ``pshell development.ini`` gives, ``myproject`` importable."""
    settings = get_appsettings(str(TESTING_INI), options={"sqlite_dir": str(tmp_path)})
    del settings["pyramid.includes"]  # the capture: the page runs eager mode
    settings.update(_development_settings())
    app = main({}, **settings)
    engine = app.registry["dbsession_factory"].kw["bind"]
    Base.metadata.create_all(engine)
    for name, module in (("", myproject), (".models", models), (".tasks", tasks)):
        monkeypatch.setitem(sys.modules, f"myproject{name}", module)
    env = prepare(registry=app.registry)
    pshell.setup(env)
    yield env
    env["closer"]()
    app.registry.celery_app.close()
    engine.dispose()


def test_the_quickstart_sets_eager_mode_first():
    assert _development_settings() == {
        "celery.task_always_eager": "true",
        "tasks.site_url": "http://localhost:6543",
    }


def test_the_quickstart_pshell_session_runs_as_shown(shell):
    text = PAGE.read_text()
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, dict(shell), PAGE.name, str(PAGE), 0)
    assert len(test.examples) >= 10
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=out.write)
    assert result.failed == 0, out.getvalue()
