"""``pyramid_tasks.loader``: the Celery app from an INI, logging, fork safety.

Everything runs in-process on the apps of ``tests/ini/*.ini``
(``tests/pkgs/cli_app``).
"""

import logging
from pathlib import Path

import pytest
from celery import signals
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from pyramid_tasks import WorkerProcessInit
from pyramid_tasks.loader import PyramidLoader, _keep_ini_logging, load_celery_app

INI_DIR = Path(__file__).resolve().parent / "ini"
APPS_INI = INI_DIR / "apps.ini"
LOGGING_INI = INI_DIR / "logging.ini"
INI_LOGGER = "pyramid_tasks_tests.from_ini"


def _connected(receiver):
    return any(r is receiver for _, r in signals.setup_logging.receivers)


def test_returns_the_celery_app_built_from_the_ini_settings():
    app = load_celery_app(f"{APPS_INI}#fixed")

    assert isinstance(app.loader, PyramidLoader)
    assert app.conf.task_default_queue == "fixed"
    assert app.conf.broker_url == "memory://"
    assert "tests.pkgs.cli_app.ping" in app.tasks
    assert app.pyramid_registry.celery_app is app


def test_options_fill_variables_and_here_is_the_ini_folder():
    app = load_celery_app(str(APPS_INI), {"queue": "from_option"})

    assert app.conf.task_default_queue == "from_option"
    assert app.conf.beat_schedule_filename == f"{INI_DIR}/beat-schedule"


def test_finds_the_registry_behind_a_pipeline_filter():
    app = load_celery_app(f"{APPS_INI}#wrapped")

    assert app.conf.task_default_queue == "fixed"
    assert "tests.pkgs.cli_app.ping" in app.tasks


def test_an_app_without_pyramid_tasks_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="does not include pyramid_tasks"):
        load_celery_app(f"{APPS_INI}#no_tasks")


def test_a_non_pyramid_app_never_borrows_an_earlier_apps_celery_app():
    # An app loaded before in this process (tests, a composite) must not be
    # taken for the app of this INI, whose WSGI app has no registry at all.
    earlier = load_celery_app(f"{APPS_INI}#fixed")

    with pytest.raises(ConfigurationError, match="does not include pyramid_tasks"):
        load_celery_app(f"{APPS_INI}#plain")
    assert earlier.conf.task_default_queue == "fixed"


def test_applies_the_ini_loggers_and_keeps_celery_off_the_root_logger(
    restore_logging,
):
    app = load_celery_app(str(LOGGING_INI))

    root = logging.getLogger()
    assert logging.getLogger(INI_LOGGER).level == logging.ERROR
    assert root.level == logging.WARNING
    handlers = list(root.handlers)
    assert [type(h) for h in handlers] == [logging.NullHandler]
    assert _connected(_keep_ini_logging)

    # What a worker does at start-up: with a setup_logging receiver connected,
    # Celery neither adds its handler nor sets the root level.
    app.log.setup_logging_subsystem(loglevel="DEBUG")

    assert root.level == logging.WARNING
    assert root.handlers == handlers
    assert logging.getLogger(INI_LOGGER).level == logging.ERROR


def test_without_loggers_section_connects_no_setup_logging_receiver(
    restore_logging,
):
    before = logging.getLogger().handlers[:]

    load_celery_app(f"{APPS_INI}#fixed")

    assert not _connected(_keep_ini_logging)
    assert logging.getLogger().handlers == before


def test_worker_process_init_disposes_inherited_pools_then_notifies(database_url):
    app = load_celery_app(f"{APPS_INI}#engine", {"database_url": database_url})
    registry = app.pyramid_registry
    engine = registry["cli_app.engine"]
    select_pid = text("SELECT pg_backend_pid()")
    with engine.connect() as connection:
        inherited_pid = connection.scalar(select_pid)
        inherited = connection.connection.dbapi_connection
    assert engine.pool.checkedin() == 1
    try:
        # What Celery's prefork pool calls in each child after the fork.
        app.loader.init_worker_process()

        assert engine.pool.checkedin() == 0
        # dispose(close=False): the parent still owns that socket.
        assert not inherited.closed
        with engine.connect() as connection:
            assert connection.scalar(select_pid) != inherited_pid
        [(event, checked_in_at_event)] = registry["cli_app.events"]
        assert isinstance(event, WorkerProcessInit)
        assert event.registry is registry
        assert event.celery_app is app
        assert checked_in_at_event == 0, "subscribers run after the disposal"
    finally:
        inherited.close()
        engine.dispose()


def test_a_worker_gets_the_consumer_that_sets_malformed_messages_aside():
    app = load_celery_app(f"{APPS_INI}#fixed")

    # What a worker (or beat) calls before it reads its settings.
    app.loader.init_worker()

    assert app.conf.worker_consumer == "pyramid_tasks.malformed:Consumer"


def test_a_worker_consumer_of_the_apps_own_is_kept():
    app = load_celery_app(f"{APPS_INI}#fixed")
    app.conf.worker_consumer = "myapp.worker:Consumer"

    app.loader.init_worker()

    assert app.conf.worker_consumer == "myapp.worker:Consumer"
