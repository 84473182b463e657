"""``tasks.jobs.*``: parsing, and the session factory durable mode writes with.

Parsing is pure (dicts in, :class:`JobsSettings` out); the session factory is
resolved by ``config.include('pyramid_tasks.jobs')`` at commit, on SQLite
engines (no row is written here).
"""

import re

import pytest
import sqlalchemy
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from sqlalchemy.orm import sessionmaker

from pyramid_tasks.settings import (
    JobsSettings,
    parse_duration,
    parse_jobs_settings,
    parse_tasks_settings,
)

KEY = "tasks.jobs.session_factory"


def jobs(**values):
    """``parse_jobs_settings`` on ``tasks.jobs.<name>`` keys."""
    return parse_jobs_settings({f"tasks.jobs.{k}": v for k, v in values.items()})


def error_of(func, *args, **kwargs):
    with pytest.raises(ConfigurationError) as info:
        func(*args, **kwargs)
    return str(info.value)


# -- durations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0.2", 0.2),
        ("200ms", 0.2),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("10", 10.0),
        (" 1.5 S ", 1.5),
        ("3 m", 180.0),
        ("0", 0.0),
        (2, 2.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration("tasks.jobs.lease", text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["ten", "-1", "1w", "", "1.5.2", "inf", "nan", "1e3", "s", "5 minutes"]
)
def test_a_bad_duration_names_the_key_and_the_value(text):
    message = error_of(parse_duration, "tasks.jobs.relay_grace", text)
    assert message == (
        f"Invalid setting tasks.jobs.relay_grace = {text!r}: expected a duration "
        "such as 0.2, 200ms, 10s, 5m, 2h or 7d."
    )


@pytest.mark.parametrize("name", ["relay_interval", "publish_timeout", "lease"])
@pytest.mark.parametrize("zero", ["0", "0ms", "0.0s"])
def test_positive_only_durations_refuse_zero(name, zero):
    message = error_of(jobs, **{name: zero})
    assert message.startswith(f"Invalid setting tasks.jobs.{name} = {zero!r}")
    assert message.endswith("7d, above zero.")


@pytest.mark.parametrize("name", ["relay_grace", "retention"])
def test_grace_and_retention_may_be_zero(name):
    assert getattr(jobs(**{name: "0"}), name) == 0.0


# -- the other keys -----------------------------------------------------------


def test_defaults():
    assert parse_jobs_settings({}) == JobsSettings()
    assert JobsSettings() == JobsSettings(
        session_factory="dbsession_factory",
        request_session="dbsession",
        relay=True,
        relay_interval=1.0,
        relay_grace=10.0,
        publish_attempts=10,
        publish_timeout=0.2,
        lease=60.0,
        retention=7 * 86400.0,
    )


def test_every_key_parsed():
    parsed = jobs(
        session_factory=" myapp.models.session_factory ",
        request_session="db",
        relay="off",
        relay_interval="250ms",
        relay_grace="30s",
        publish_attempts="3",
        publish_timeout="0.5",
        lease="2m",
        retention="30d",
    )
    assert parsed == JobsSettings(
        session_factory="myapp.models.session_factory",
        request_session="db",
        relay=False,
        relay_interval=0.25,
        relay_grace=30.0,
        publish_attempts=3,
        publish_timeout=0.5,
        lease=120.0,
        retention=30 * 86400.0,
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("publish_attempts", "0", "an integer >= 1"),
        ("publish_attempts", "ten", "an integer"),
        ("relay", "maybe", "one of true/false, yes/no, on/off, 1/0"),
        ("request_session", "db-session", "a request attribute name"),
        ("request_session", "", "a request attribute name"),
        ("session_factory", "my factory", "a registry key or a dotted name"),
        ("session_factory", "1factory", "a registry key or a dotted name"),
        ("session_factory", "", "a registry key or a dotted name"),
    ],
)
def test_a_bad_value_names_the_key(name, value, expected):
    assert error_of(jobs, **{name: value}) == (
        f"Invalid setting tasks.jobs.{name} = {value!r}: expected {expected}."
    )


def test_an_unknown_key_is_an_error_with_a_suggestion():
    assert error_of(jobs, relay_intervl="1s") == (
        "Unknown setting tasks.jobs.relay_intervl: did you mean "
        "tasks.jobs.relay_interval?"
    )
    assert error_of(jobs, sessionfactory="x") == (
        "Unknown setting tasks.jobs.sessionfactory: did you mean "
        "tasks.jobs.session_factory?"
    )
    assert error_of(jobs, colour="blue") == "Unknown setting tasks.jobs.colour"


def test_tasks_settings_leave_the_jobs_keys_to_durable_mode():
    settings = {"tasks.jobs.relay": "false", "tasks.jobs.colour": "blue"}
    assert parse_tasks_settings(settings) == parse_tasks_settings({})
    assert "tasks.jobs.colour" in error_of(parse_jobs_settings, settings)


# -- the session factory ------------------------------------------------------

ENGINE = sqlalchemy.create_engine("sqlite://")
SESSION_FACTORY = sessionmaker(bind=ENGINE)
UNBOUND_FACTORY = sessionmaker()


def not_a_factory():
    """Neither a sessionmaker nor an engine."""


def durable_registry(settings=None, **registry_values):
    """The registry of a committed durable app; ``registry_values`` are set
    in the registry first (as the cookiecutter's models do)."""
    config = Configurator(
        settings={"celery.broker_url": "memory://", **(settings or {})}
    )
    for key, value in registry_values.items():
        config.registry[key] = value
    config.include("pyramid_tasks.jobs")
    config.commit()
    return config.registry


def jobs_engine(registry):
    return registry.pyramid_tasks_jobs.store.engine


def test_the_default_is_the_cookiecutters_registry_key():
    registry = durable_registry(dbsession_factory=SESSION_FACTORY)
    assert jobs_engine(registry) is ENGINE
    assert registry.pyramid_tasks_jobs.settings == JobsSettings()


def test_a_registry_key_of_the_apps_choice():
    registry = durable_registry({KEY: "jobs_sessions"}, jobs_sessions=SESSION_FACTORY)
    assert jobs_engine(registry) is ENGINE


def test_a_dotted_name_of_a_sessionmaker_or_of_an_engine():
    factory = durable_registry({KEY: f"{__name__}.SESSION_FACTORY"})
    engine = durable_registry({KEY: f"{__name__}:ENGINE"})
    assert jobs_engine(factory) is jobs_engine(engine) is ENGINE


def test_a_sessionmaker_bound_to_a_connection_gives_its_engine():
    with ENGINE.connect() as connection:
        registry = durable_registry(dbsession_factory=sessionmaker(bind=connection))
    assert jobs_engine(registry) is ENGINE


def test_the_dialect_is_read_from_the_engine():
    registry = durable_registry(dbsession_factory=SESSION_FACTORY)
    assert registry.pyramid_tasks_jobs.store.dialect == "sqlite"


def configuration_error(settings=None, **registry_values):
    with pytest.raises(ConfigurationError) as info:
        durable_registry(settings, **registry_values)
    return str(info.value)


def test_a_missing_registry_key_is_an_error_naming_the_setting():
    message = configuration_error()
    assert (
        f"Setting {KEY} = 'dbsession_factory': no registry key of that name" in message
    )
    assert "not a dotted name" in message
    assert f"Setting {KEY} = 'sessions': no registry key" in configuration_error(
        {KEY: "sessions"}
    )


@pytest.mark.parametrize(
    "name", ["tests.no_such_module.factory", f"{__name__}.NO_SUCH_FACTORY"]
)
def test_a_dotted_name_that_imports_nothing_is_an_error_naming_the_setting(name):
    message = configuration_error({KEY: name})
    assert re.search(
        rf"Setting {re.escape(KEY)} = '{re.escape(name)}' names nothing importable: ",
        message,
    ), message


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (f"{__name__}.UNBOUND_FACTORY", "sessionmaker"),
        (f"{__name__}.not_a_factory", "not_a_factory"),
    ],
)
def test_a_factory_with_no_engine_is_an_error_naming_the_setting(name, shown):
    message = configuration_error({KEY: name})
    assert f"Setting {KEY} = '{name}': " in message
    assert "is not a SQLAlchemy sessionmaker bound to an engine." in message
    assert shown in message


def test_a_registry_value_with_no_engine_is_an_error_too():
    message = configuration_error(dbsession_factory=UNBOUND_FACTORY)
    assert f"Setting {KEY} = 'dbsession_factory': " in message
    assert "is not a SQLAlchemy sessionmaker bound to an engine." in message


# -- the publish bound --------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "bound"),
    [
        ({}, 0.2),  # tasks.publish_timeout's 2 s is lowered
        ({"tasks.publish_timeout": "none"}, 0.2),
        ({"tasks.publish_timeout": "0.05"}, 0.05),  # a lower one is kept
        ({"tasks.jobs.publish_timeout": "1s"}, 1.0),
        ({"tasks.publish_timeout": "none", "tasks.jobs.publish_timeout": "5s"}, 5.0),
    ],
)
def test_durable_mode_bounds_the_publish_after_the_commit(settings, bound):
    registry = durable_registry(settings, dbsession_factory=SESSION_FACTORY)
    assert registry.pyramid_tasks_settings.publish_timeout == bound


def test_bad_jobs_settings_fail_the_configuration():
    message = configuration_error(
        {"tasks.jobs.lease": "forever"}, dbsession_factory=SESSION_FACTORY
    )
    assert "Invalid setting tasks.jobs.lease = 'forever'" in message


def test_a_tasks_key_missing_the_s_of_jobs_is_pointed_at_it():
    from pyramid_tasks.settings import parse_tasks_settings

    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({"tasks.job.lease": "1"})
    assert str(info.value) == (
        "Unknown setting tasks.job.lease: did you mean tasks.jobs.lease?"
    )
