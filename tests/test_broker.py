"""No broker is a configuration error, never Celery's ``amqp://localhost``."""

import logging

import pytest
from pyramid import testing
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError, ConfigurationExecutionError

from pyramid_tasks.broker import broker_required, check_broker
from pyramid_tasks.testing import get_task_capture

ENVIRONMENT = (
    "CELERY_BROKER_URL",
    "CELERY_BROKER_READ_URL",
    "CELERY_BROKER_WRITE_URL",
    "CELERY_RESULT_BACKEND",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Celery reads these variables: none may leak in from the shell."""
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


def build(**settings):
    config = Configurator(settings=settings)
    config.include("pyramid_tasks")
    return config.get_celery_app()


def refused(**settings):
    with pytest.raises(ConfigurationExecutionError) as info:
        build(**settings)
    assert isinstance(info.value.evalue, ConfigurationError)
    return str(info.value.evalue)


def test_no_broker_url_is_an_error_naming_the_setting():
    message = refused(**{"celery.task_default_queue": "q"})

    assert message == (
        "No broker: set celery.broker_url, for example redis://127.0.0.1:6379/0, "
        "or celery.task_always_eager = true to run tasks in-process without a "
        "broker (development); Celery would otherwise use amqp://localhost."
    )


def test_an_empty_broker_url_is_no_broker():
    assert refused(**{"celery.broker_url": " "}).startswith("No broker: ")


@pytest.mark.parametrize(
    ("settings", "url"),
    [
        ({"celery.broker_url": "redis://127.0.0.1:6379/3"}, "redis://127.0.0.1:6379/3"),
        ({"celery.broker_host": "memory://"}, "memory://"),  # Celery's legacy name
        (
            {
                "celery.broker_read_url": "memory://read",
                "celery.broker_write_url": "memory://write",
            },
            "memory://write",
        ),
    ],
)
def test_a_broker_setting_is_used(settings, url):
    app = build(**settings)

    assert app.conf.broker_write_url == url
    assert app.connection_for_write().transport_cls == url.partition(":")[0]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("celery.broker_write_url", "No broker to consume from: neither "),
        ("celery.broker_read_url", "No broker to publish to: neither "),
    ],
)
def test_one_side_alone_names_the_other(setting, message):
    side = "read" if setting.endswith("write_url") else "write"

    text = refused(**{setting: "memory://"})

    assert text.startswith(
        f"{message}celery.broker_{side}_url nor celery.broker_url is set; set "
        "celery.broker_url, for example redis://127.0.0.1:6379/0"
    )


def test_celery_broker_url_in_the_environment_counts(monkeypatch):
    """Celery honours the variable, so a broker is set."""
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://from-env")

    app = build()

    assert app.conf.broker_write_url == "memory://from-env"
    assert app.connection_for_write().transport_cls == "memory"


def warnings(caplog, **settings):
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks.broker"):
        app = build(**settings)
    return app, [r.getMessage() for r in caplog.records]


def test_the_environment_overriding_a_setting_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:hunter2@env-host/0")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://other/1")

    app, messages = warnings(
        caplog,
        **{
            "celery.broker_url": "redis://:s3cret@ini-host/0",
            "celery.result_backend": "redis://:s3cret@ini-host/1",
        },
    )

    assert app.conf.broker_read_url == app.conf.broker_write_url
    assert app.conf.broker_write_url == "redis://:hunter2@env-host/0"
    assert app.conf.result_backend == "redis://other/1"
    assert messages == [
        "The environment variable CELERY_BROKER_URL = redis://:***@env-host/0 "
        "overrides celery.broker_url = redis://:***@ini-host/0 (Celery gives the "
        "environment precedence).",
        "The environment variable CELERY_RESULT_BACKEND = redis://other/1 "
        "overrides celery.result_backend = redis://:***@ini-host/1 (Celery gives "
        "the environment precedence).",
    ]


@pytest.mark.parametrize(
    ("environment", "settings", "read", "write", "expected"),
    [
        # A side's variable overrides celery.broker_url for that side alone.
        (
            {"CELERY_BROKER_READ_URL": "memory://env-read"},
            {"celery.broker_url": "memory://ini"},
            "memory://env-read",
            "memory://ini",
            [
                "The environment variable CELERY_BROKER_READ_URL = "
                "memory://env-read overrides celery.broker_url = memory://ini as "
                "the broker to consume from (Celery gives the environment "
                "precedence)."
            ],
        ),
        (
            {"CELERY_BROKER_WRITE_URL": "memory://env-write"},
            {"celery.broker_host": "memory://ini"},
            "memory://ini",
            "memory://env-write",
            [
                "The environment variable CELERY_BROKER_WRITE_URL = "
                "memory://env-write overrides celery.broker_host = memory://ini "
                "as the broker to publish to (Celery gives the environment "
                "precedence)."
            ],
        ),
        # celery.broker_read_url beats CELERY_BROKER_URL: only writes move.
        (
            {"CELERY_BROKER_URL": "memory://env"},
            {
                "celery.broker_url": "memory://ini",
                "celery.broker_read_url": "memory://ini-read",
            },
            "memory://ini-read",
            "memory://env",
            [
                "The environment variable CELERY_BROKER_URL = memory://env "
                "overrides celery.broker_url = memory://ini as the broker to "
                "publish to (Celery gives the environment precedence)."
            ],
        ),
        # Each side its own variable and setting: two warnings.
        (
            {
                "CELERY_BROKER_READ_URL": "memory://env-read",
                "CELERY_BROKER_WRITE_URL": "memory://env-write",
            },
            {
                "celery.broker_read_url": "memory://ini-read",
                "celery.broker_write_url": "memory://ini-write",
            },
            "memory://env-read",
            "memory://env-write",
            [
                "The environment variable CELERY_BROKER_READ_URL = "
                "memory://env-read overrides celery.broker_read_url = "
                "memory://ini-read as the broker to consume from (Celery gives "
                "the environment precedence).",
                "The environment variable CELERY_BROKER_WRITE_URL = "
                "memory://env-write overrides celery.broker_write_url = "
                "memory://ini-write as the broker to publish to (Celery gives "
                "the environment precedence).",
            ],
        ),
        # The same URL, or no INI value to override: no warning.
        (
            {"CELERY_BROKER_URL": "memory://same", "CELERY_RESULT_BACKEND": "x://"},
            {"celery.broker_url": "memory://same"},
            "memory://same",
            "memory://same",
            [],
        ),
        (
            {"CELERY_BROKER_WRITE_URL": "memory://w", "CELERY_BROKER_URL": "memory://"},
            {},
            "memory://",
            "memory://w",
            [],
        ),
    ],
)
def test_each_side_warns_when_the_environment_changes_its_broker(
    environment, settings, read, write, expected, monkeypatch, caplog
):
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)

    app, messages = warnings(caplog, **settings)

    assert (app.conf.broker_read_url, app.conf.broker_write_url) == (read, write)
    assert messages == expected


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_a_transport_without_url_is_a_broker(transport):
    """kombu uses celery.broker_transport when the URL is None."""
    app = build(**{"celery.broker_transport": transport})

    check_broker(app.conf, eager_ok=False)
    assert app.conf.broker_url is None
    assert app.connection_for_read().transport_cls == transport
    assert app.connection_for_write().transport_cls == transport


@pytest.mark.parametrize("transport", ["amqp", "pyamqp", "librabbitmq", " "])
def test_amqp_without_url_is_still_no_broker(transport):
    """Named or not, AMQP without a URL is kombu's amqp://localhost."""
    assert refused(**{"celery.broker_transport": transport}).startswith(
        "No broker: set celery.broker_url"
    )


def test_eager_mode_needs_no_broker():
    app = build(**{"celery.task_always_eager": "true"})

    assert app.conf.broker_url is None


def test_the_testing_include_needs_no_broker():
    """Captured tasks never reach a broker."""
    config = Configurator(settings={})
    config.include("pyramid_tasks.testing")

    assert config.get_celery_app().conf.broker_url is None


def test_the_testing_include_under_testing_setup_needs_no_broker():
    """``pyramid.testing.setUp()`` autocommits: the app is built at the include."""
    config = testing.setUp(settings={})
    try:
        config.include("pyramid_tasks.testing")

        assert config.registry.celery_app.conf.broker_url is None
        assert get_task_capture(config.registry).sent == []
    finally:
        testing.tearDown()


def test_eager_mode_without_broker_is_refused_where_a_broker_is_needed():
    app = build(**{"celery.task_always_eager": "true"})

    with pytest.raises(ConfigurationError) as info:
        check_broker(app.conf, eager_ok=False)

    assert str(info.value) == (
        "No broker: eager mode (celery.task_always_eager = true) runs tasks in "
        "the web process without one, but workers, beat and every tasks-celery "
        "command need one: set celery.broker_url, for example "
        "redis://127.0.0.1:6379/0."
    )


def test_eager_mode_with_a_broker_passes_where_a_broker_is_needed():
    app = build(
        **{"celery.task_always_eager": "true", "celery.broker_url": "memory://"}
    )

    check_broker(app.conf, eager_ok=False)


def test_where_a_broker_is_needed_eager_mode_is_no_advice():
    """Eager mode cannot spare tasks-celery a broker: the error never offers it."""
    token = broker_required.set(True)  # as tasks-celery loads its INI
    try:
        text = refused(
            **{
                "celery.broker_write_url": "memory://",
                "celery.broker_transport": "amqp",
            }
        )
    finally:
        broker_required.reset(token)

    assert text == (
        "No broker to consume from: neither celery.broker_read_url nor "
        "celery.broker_url is set; set celery.broker_url, for example "
        "redis://127.0.0.1:6379/0; Celery would otherwise use amqp://localhost."
    )


def test_tasks_celery_refuses_a_testing_app_without_broker():
    """A worker of an app that includes pyramid_tasks.testing still consumes."""
    token = broker_required.set(True)
    try:
        config = Configurator(settings={})
        config.include("pyramid_tasks.testing")
        with pytest.raises(ConfigurationExecutionError) as info:
            config.commit()
    finally:
        broker_required.reset(token)

    assert str(info.value.evalue).startswith("No broker: set celery.broker_url")
