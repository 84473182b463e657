"""The conftest.py pyramid-cookiecutter-starter generates for its sqlalchemy
backend (``tests/conftest.py``), kept as generated but for three marked
adaptations: it is not the suite's root conftest, the app is this fixture
package, and the database is created without Alembic (the generated file's
own commented alternative).
"""

import os

import pytest
import transaction
import webtest
from pyramid.paster import get_appsettings
from pyramid.scripting import prepare
from pyramid.testing import DummyRequest, testConfig

from tests.pkgs.cookiecutter_app import main, models
from tests.pkgs.cookiecutter_app.models.meta import Base

HERE = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="session")
def ini_file(request):
    # Adapted: the generated file reads ``--ini`` (pytest_addoption, only
    # honoured in a root conftest) and defaults to the project's testing.ini.
    return os.path.join(HERE, "pkgs", "cookiecutter_app", "testing.ini")


@pytest.fixture(scope="session")
def app_settings(ini_file, tmp_path_factory):
    # Adapted: the sqlite file in a directory of this session's own.
    sqlite_dir = str(tmp_path_factory.mktemp("cookiecutter_app"))
    return get_appsettings(ini_file, options={"sqlite_dir": sqlite_dir})


@pytest.fixture(scope="session")
def dbengine(app_settings, ini_file):
    engine = models.get_engine(app_settings)

    # Adapted: the generated file runs ``alembic upgrade head`` here; its
    # comment gives this alternative for initializing the database.
    Base.metadata.drop_all(bind=engine)
    Base.metadata.create_all(bind=engine)

    yield engine

    Base.metadata.drop_all(bind=engine)


@pytest.fixture(scope="session")
def app(app_settings, dbengine):
    return main({}, dbengine=dbengine, **app_settings)


@pytest.fixture
def tm():
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    tm.doom()

    yield tm

    tm.abort()


@pytest.fixture
def dbsession(app, tm):
    session_factory = app.registry["dbsession_factory"]
    return models.get_tm_session(session_factory, tm)


@pytest.fixture
def testapp(app, tm, dbsession):
    # override request.dbsession and request.tm with our own
    # externally-controlled values that are shared across requests but aborted
    # at the end
    testapp = webtest.TestApp(
        app,
        extra_environ={
            "HTTP_HOST": "example.com",
            "tm.active": True,
            "tm.manager": tm,
            "app.dbsession": dbsession,
        },
    )

    return testapp


@pytest.fixture
def app_request(app, tm, dbsession):
    """
    A real request.

    This request is almost identical to a real request but it has some
    drawbacks in tests as it's harder to mock data and is heavier.

    """
    with prepare(registry=app.registry) as env:
        request = env["request"]
        request.host = "example.com"

        # without this, request.dbsession will be joined to the same transaction
        # manager but it will be using a different sqlalchemy.orm.Session using
        # a separate database transaction
        request.dbsession = dbsession
        request.tm = tm

        yield request


@pytest.fixture
def dummy_request(tm, dbsession):
    """
    A lightweight dummy request.

    This request is ultra-lightweight and should be used only when the request
    itself is not a large focus in the call-stack.  It is much easier to mock
    and control side-effects using this object, however:

    - It does not have request extensions applied.
    - Threadlocals are not properly pushed.

    """
    request = DummyRequest()
    request.host = "example.com"
    request.dbsession = dbsession
    request.tm = tm

    return request


@pytest.fixture
def dummy_config(dummy_request):
    """
    A dummy :class:`pyramid.config.Configurator` object.  This allows for
    mock configuration, including configuration for ``dummy_request``, as well
    as pushing the appropriate threadlocals.

    """
    with testConfig(request=dummy_request) as config:
        yield config
