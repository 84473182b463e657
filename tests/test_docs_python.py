"""Every Python example of the documentation (``.. code-block:: python``)
runs, against a real app: ``myapp`` (``tests/docs_app/myapp``, a SQLite
database, Celery's ``memory://`` broker, the job table) and the names the
examples take as given (:func:`world`).

An example is executed as it is written: the configuration it makes is
committed, the tasks it schedules are recorded and sent, the job service
calls it makes act on the world's jobs.  A renamed function, setting or
argument cannot stay in the docs.  Pages whose examples need more are run
elsewhere: the shell session of docs/quickstart.rst by
``tests/test_docs_quickstart.py``, the tests of docs/testing.rst by
``tests/cookiecutter/test_docs_example.py``.
"""

import linecache
import logging
import re
from types import SimpleNamespace

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.paster import get_app
from pyramid.scripting import prepare
from pyramid.view import view_config
from sqlalchemy import update

import pyramid_tasks.jobs
from pyramid_tasks import TransactionalTask, retryable, task
from pyramid_tasks.jobs import Job
from pyramid_tasks.jobs.service import JobService
from pyramid_tasks.jobs.web import _marker

from .docs_blocks import DOCS, code_blocks

# Shown beside ours, another project's code (its first line says which).
_OTHERS = ("# settings.py (django-db-queue)",)
BLOCKS = {
    where: source
    for where, source in code_blocks("python").items()
    if not source.lstrip().startswith(_OTHERS)
}

# The examples that open the transaction themselves: a script's, a shell's.
_SCRIPT = re.compile(r"with request\.tm:|request\.tm\.begin\(|bootstrap\(")

_INI = """\
[app:main]
use = call:myapp:main
sqlalchemy.url = sqlite:///{folder}/myapp.sqlite
celery.broker_url = memory://
tasks.site_url = https://example.com
"""


@pytest.fixture
def world(tmp_path, monkeypatch):
    """The names an example may use without importing them.

    ``myapp`` and its modules are importable by that name; the app runs from
    ``conf/production.ini`` in the current directory; ``order_id`` is a
    committed order, ``job_id`` a job scheduled for later, and one other job
    failed; ``config`` is a configuration that has included ``myapp.models``
    (so ``pyramid_tm`` and ``pyramid_tasks``), as a cookiecutter ``main``
    does before the example's lines.
    """
    monkeypatch.syspath_prepend(str(DOCS.parent / "tests" / "docs_app"))
    from myapp import helpers, models, tasks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "production.ini").write_text(_INI.format(folder=tmp_path))
    app = get_app("conf/production.ini")
    settings = dict(app.registry.settings)
    engine = app.registry["dbsession_factory"].kw["bind"]
    models.Base.metadata.create_all(engine)
    pyramid_tasks.jobs.metadata.create_all(engine)
    env = prepare(registry=app.registry)
    request = env["request"]
    with request.tm:
        order = models.Order(email="ann@example.com")
        request.dbsession.add(order)
        request.dbsession.flush()
        order_id = order.id
        later = tasks.report.apply_async((1,), tm=request.tm, countdown=600)
        failed = tasks.report.apply_async((2,), tm=request.tm, queue="reports")
    _marker.flush(10)  # both marked as sent: ``scheduled`` and ``queued``
    with engine.begin() as connection:
        failing = update(Job).where(Job.id == failed.id)
        connection.execute(failing.values(state="failed"))
    config = Configurator(settings=dict(settings))
    config.include("myapp.models")
    names = {
        "Configurator": Configurator,
        "TransactionalTask": TransactionalTask,
        "JobService": JobService,
        "view_config": view_config,
        "task": task,
        "retryable": retryable,
        "config": config,
        "settings": settings,
        "request": request,
        "order_id": order_id,
        "job_id": later.id,
        "site_id": 1,
        "site": SimpleNamespace(name="Lyon"),
        "stale_ids": [order_id],
        "log": logging.getLogger("myapp"),
        **{name: getattr(models, name) for name in models.__all__},
        **{name: getattr(tasks, name) for name in ("send_receipt", "import_rows")},
        **{name: getattr(tasks, name) for name in ("report", "cleanup", "heartbeat")},
        **{name: getattr(tasks, name) for name in ("fetch", "parse", "store")},
        "upload_id": 1,
        **{name: getattr(helpers, name) for name in dir(helpers) if name[0] != "_"},
    }
    yield names
    _marker.flush(10)  # the marks of what the example sent, while the app lives
    env["closer"]()
    transaction.manager.abort()
    app.registry.celery_app.close()
    engine.dispose()


def test_the_docs_have_python_examples_to_run():
    assert len(BLOCKS) >= 35


# An example may set loggers' levels (docs/jobs.rst does): undone after each.
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("where", BLOCKS)
def test_a_python_example_runs_against_the_app(where, world):
    source = BLOCKS[where]
    # Its lines, for tracebacks and for what reads them (@view_config).
    linecache.cache[where] = (len(source), None, source.splitlines(True), where)
    namespace = dict(world)
    tm = namespace["request"].tm
    view = not _SCRIPT.search(source)
    if view:  # it runs as in a view: pyramid_tm has begun, and commits after
        tm.begin()
    exec(compile(source, where, "exec"), namespace)  # as a reader pastes it
    if view:
        tm.commit()
    config = namespace["config"]
    config.commit()  # what it configured holds together
    config.make_wsgi_app()
