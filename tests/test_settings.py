"""Unit tests for :mod:`pyramid_tasks.settings` (pure parsing, no Celery app)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyramid.exceptions import ConfigurationError

from pyramid_tasks.settings import (
    TasksSettings,
    as_bool,
    as_float,
    as_int,
    as_json,
    bad_setting,
    check_serializers,
    mask_secrets,
    parse_celery_settings,
    parse_tasks_settings,
)


def celery(**values):
    """``parse_celery_settings`` on ``celery.<name>`` keys."""
    return parse_celery_settings({f"celery.{k}": v for k, v in values.items()})


def error_of(func, *args):
    with pytest.raises(ConfigurationError) as info:
        func(*args)
    return str(info.value)


# -- mask_secrets / bad_setting ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:secret@host//", "amqp://user:***@host//"),
        (
            "rediss://u:secret@h/1?ssl_cert_reqs=none",
            "rediss://u:***@h/1?ssl_cert_reqs=none",
        ),
        ("sqla+postgresql://me:secret@db/x", "sqla+postgresql://me:***@db/x"),
        # urllib and kombu take the password up to the *last* "@".
        ("redis://:p@ss@host/0", "redis://:***@host/0"),
        ("amqp://user:se/cret@host", "amqp://user:***@host"),
        # failover lists: each password masked, every host kept
        (
            "redis://:one@h1:6379;redis://:two@h2:6379",
            "redis://:***@h1:6379;redis://:***@h2:6379",
        ),
        ("amqp://a:one@h1 amqp://b:two@h2", "amqp://a:***@h1 amqp://b:***@h2"),
        # nothing to mask
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("not a url: x@y", "not a url: x@y"),
    ],
)
def test_mask_secrets(text, masked):
    assert mask_secrets(text) == masked


def test_mask_secrets_takes_any_object():
    assert mask_secrets(ValueError("bad redis://:secret@h")) == "bad redis://:***@h"
    assert mask_secrets(42) == "42"


# Printable ASCII without space: "@", ":", "/", "?", "#", ";" included.
_password = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1
).filter(lambda p: "://" not in p)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["redis", "rediss", "amqp", "sqla+postgresql"]),
    user=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=8),
    password=_password,
)
def test_mask_secrets_never_shows_the_password(scheme, user, password):
    url = f"{scheme}://{user}:{password}@broker.internal:1234/0"
    assert mask_secrets(url) == f"{scheme}://{user}:***@broker.internal:1234/0"


def test_bad_setting_names_key_and_masked_value():
    error = bad_setting("celery.broker_url", "redis://:secret@host", "something")
    assert isinstance(error, ConfigurationError)
    assert str(error) == (
        "Invalid setting celery.broker_url = 'redis://:***@host': expected something."
    )


# -- scalar coercions ------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" Yes ", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("OFF", False),
        ("0", False),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
    ],
)
def test_as_bool_accepts(word, expected):
    assert as_bool("celery.task_always_eager", word) is expected


@pytest.mark.parametrize("word", ["ture", "", "y", "n", "2", "-1", "enabled", "t"])
def test_as_bool_is_strict(word):
    message = error_of(as_bool, "celery.task_always_eager", word)
    assert message.startswith(f"Invalid setting celery.task_always_eager = {word!r}")
    assert "true/false, yes/no, on/off, 1/0" in message


def test_as_int():
    assert as_int("k", " 42 ") == 42
    assert as_int("k", "-3") == -3
    assert as_int("k", 7) == 7
    assert as_int("k", "1", minimum=1) == 1


@pytest.mark.parametrize("value", ["4.5", "four", "", "1e3", "0x10"])
def test_as_int_rejects_non_integers(value):
    with pytest.raises(ConfigurationError, match="expected an integer") as info:
        as_int("celery.worker_prefetch_multiplier", value)
    assert f"celery.worker_prefetch_multiplier = {value!r}" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_as_int_minimum():
    with pytest.raises(ConfigurationError, match=r"= '0': expected an integer >= 1"):
        as_int("tasks.retry.attempts", "0", minimum=1)


def test_as_float():
    assert as_float("k", "2.5") == 2.5
    assert as_float("k", " 3 ") == 3.0
    assert as_float("k", "0", minimum=0) == 0.0


def test_as_float_rejects_text():
    with pytest.raises(ConfigurationError, match="= 'soon': expected a number") as info:
        as_float("celery.task_time_limit", "soon")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity"])
def test_as_float_rejects_non_finite(value):
    with pytest.raises(ConfigurationError, match="expected a finite number"):
        as_float("celery.task_time_limit", value)


def test_as_float_minimum():
    with pytest.raises(ConfigurationError, match=r"= '-0.5': expected a number >= 0"):
        as_float("tasks.retry.backoff", "-0.5", minimum=0)
    with pytest.raises(ConfigurationError, match=r"= 'inf': expected a number >= 0"):
        as_float("tasks.retry.backoff", "inf", minimum=0)


def test_as_json():
    assert as_json("k", '{"a": [1, 2]}', dict) == {"a": [1, 2]}
    assert as_json("k", "[1, 2]", list) == [1, 2]
    passed = {"a": 1}
    assert as_json("k", passed, dict) is passed


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("{bad", dict, "a JSON object"),
        ("[1, 2]", dict, "a JSON object"),
        ("{}", list, "a JSON list"),
        ("7", list, "a JSON list"),
        (["not", "a", "dict"], dict, "a JSON object"),
        ("[" * 100_000, list, "a JSON list"),
    ],
)
def test_as_json_rejects(value, kind, expected):
    with pytest.raises(ConfigurationError, match=f"expected {expected}") as info:
        as_json("celery.broker_transport_options", value, kind)
    assert "celery.broker_transport_options = " in str(info.value)


def test_as_json_chains_decoding_error():
    with pytest.raises(ConfigurationError) as info:
        as_json("k", "{bad", dict)
    assert isinstance(info.value.__cause__, ValueError)


# -- parse_celery_settings ----------------------------------------------------


def test_parse_celery_ignores_other_keys():
    assert parse_celery_settings({"sqlalchemy.url": "x", "tasks.site_url": "y"}) == {}


def test_parse_celery_strings_are_stripped():
    conf = celery(broker_url="  redis://localhost:6379/0 ", timezone="UTC")
    assert conf == {"broker_url": "redis://localhost:6379/0", "timezone": "UTC"}


def test_parse_celery_non_text_string_value_kept():
    key = b"secret"
    assert celery(security_key_password=key)["security_key_password"] is key


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("task_always_eager", "true", True),
        ("task_acks_late", "off", False),
        ("task_always_eager", True, True),
        ("worker_prefetch_multiplier", "4", 4),
        ("broker_pool_limit", 10, 10),
        ("beat_cron_starting_deadline", "120", 120),  # type is the int class
        ("task_time_limit", "300", 300.0),
        ("result_expires", "2.5", 2.5),
        ("worker_concurrency", "4", 4),  # "any": JSON when it is JSON
        ("worker_concurrency", 4, 4),  # ... and Python values pass through
        ("task_routes", '{"a.*": {"queue": "a"}}', {"a.*": {"queue": "a"}}),
        ("task_routes", " myapp.routes.Router ", "myapp.routes.Router"),
    ],
)
def test_parse_celery_coerces_with_celerys_table(name, value, expected):
    result = celery(**{name: value})[name]
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("task_always_eager", "ture", "one of true/false"),
        ("worker_prefetch_multiplier", "4.5", "an integer"),
        ("beat_cron_starting_deadline", "soon", "an integer"),
        ("task_time_limit", "five", "a number"),
        ("result_expires", "nan", "a finite number"),
        ("broker_transport_options", "visibility_timeout=3600", "a JSON object"),
        ("broker_transport_options", "[1]", "a JSON object"),
    ],
)
def test_parse_celery_errors_name_full_key_and_value(name, value, expected):
    with pytest.raises(ConfigurationError) as info:
        celery(**{name: value})
    message = str(info.value)
    assert f"celery.{name} = {value!r}" in message
    assert f"expected {expected}" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("json msgpack", ["json", "msgpack"]),
        ("json\nmsgpack\n", ["json", "msgpack"]),
        ("json, msgpack,yaml", ["json", "msgpack", "yaml"]),
        ("\n  json  \n\n  application/x-msgpack\n", ["json", "application/x-msgpack"]),
        ("json", ["json"]),
        ("", []),
        (["json"], ["json"]),
        (("json", "yaml"), ["json", "yaml"]),
    ],
)
def test_parse_celery_list_settings(value, expected):
    assert celery(accept_content=value) == {"accept_content": expected}


def test_parse_celery_tuple_settings():
    conf = celery(imports="myapp.tasks\n  other.tasks", include="a.tasks, b.tasks")
    assert conf == {
        "imports": ("myapp.tasks", "other.tasks"),
        "include": ("a.tasks", "b.tasks"),
    }


def test_parse_celery_dict_from_json():
    conf = celery(broker_transport_options='{"visibility_timeout": 3600}')
    assert conf == {"broker_transport_options": {"visibility_timeout": 3600}}


def test_parse_celery_dict_from_python_dict():
    options = {"visibility_timeout": 10}
    assert celery(broker_transport_options=options) == {
        "broker_transport_options": options
    }


def test_parse_celery_dict_from_dotted_sub_keys():
    conf = parse_celery_settings(
        {
            "celery.broker_transport_options.visibility_timeout": "3600",
            "celery.broker_transport_options.fanout_prefix": "true",
            "celery.broker_transport_options.global_keyprefix": " myapp ",
            "celery.broker_transport_options.queue_order_strategy": "priority",
            "celery.broker_transport_options.priority_steps": "[0, 3, 6, 9]",
            "celery.broker_transport_options.socket_timeout": "2.5",
        }
    )
    options = conf["broker_transport_options"]
    assert options == {
        "visibility_timeout": 3600,
        "fanout_prefix": True,
        "global_keyprefix": "myapp",
        "queue_order_strategy": "priority",
        "priority_steps": [0, 3, 6, 9],
        "socket_timeout": 2.5,
    }
    assert type(options["visibility_timeout"]) is int


def test_parse_celery_sub_keys_given_as_python_values():
    conf = parse_celery_settings(
        {"celery.broker_transport_options.visibility_timeout": 3600}
    )
    assert conf == {"broker_transport_options": {"visibility_timeout": 3600}}


def test_parse_celery_sub_key_too_deep_for_json_kept_as_text():
    deep = "[" * 100_000
    conf = parse_celery_settings({"celery.broker_transport_options.x": deep})
    assert conf == {"broker_transport_options": {"x": deep}}


@pytest.mark.parametrize("json_first", [True, False])
def test_parse_celery_sub_keys_merge_over_json(json_first):
    items = [
        ("celery.broker_transport_options", '{"a": 1, "b": 2}'),
        ("celery.broker_transport_options.b", "20"),
        ("celery.broker_transport_options.c", "30"),
    ]
    if not json_first:
        items.reverse()
    conf = parse_celery_settings(dict(items))
    assert conf == {"broker_transport_options": {"a": 1, "b": 20, "c": 30}}


def test_parse_celery_sub_keys_on_several_dicts():
    conf = parse_celery_settings(
        {
            "celery.broker_transport_options.visibility_timeout": "60",
            "celery.result_backend_transport_options.retry_policy": '{"timeout": 5}',
            "celery.task_publish_retry_policy.max_retries": "3",
        }
    )
    assert conf == {
        "broker_transport_options": {"visibility_timeout": 60},
        "result_backend_transport_options": {"retry_policy": {"timeout": 5}},
        "task_publish_retry_policy": {"max_retries": 3},
    }


@pytest.mark.parametrize(
    "key",
    [
        "celery.broker_url.password",
        "celery.task_always_eager.x",
        "celery.accept_content.0",
        "celery.worker_concurrency.max",
    ],
)
def test_parse_celery_sub_keys_on_non_dict_setting_rejected(key):
    head = key.rpartition(".")[0]
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({key: "redis://:secret@host"})
    message = str(info.value)
    assert f"Invalid setting {key}:" in message
    assert f"{head} is not a dict setting" in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("celery.broker_ulr", "celery.broker_url"),
        ("celery.task_always_eagre", "celery.task_always_eager"),
        ("celery.BROKER_URL", "celery.broker_url"),
        ("celery.result_backed", "celery.result_backend"),
        (
            "celery.broker_transport_optoins.visibility_timeout",
            "celery.broker_transport_options",
        ),
    ],
)
def test_parse_celery_unknown_key_suggests_close_one(key, suggestion):
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({key: "redis://:secret@host"})
    message = str(info.value)
    assert message == f"Unknown setting {key}: did you mean {suggestion}?"


@pytest.mark.parametrize("key", ["celery.zzzqqq", "celery.", "celery..x"])
def test_parse_celery_unknown_key_without_suggestion(key):
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({key: "1"})
    assert str(info.value) == f"Unknown setting {key}"


@pytest.mark.parametrize(
    "key", ["celery.beat_schedule", "celery.beat_schedule.cleanup"]
)
def test_parse_celery_beat_schedule_refused(key):
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({key: "{}"})
    message = str(info.value)
    assert message.startswith(f"Setting {key} is not supported")
    assert "tasks.beat.<name>.task" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("broker_pool_limit", "redis://:secret@host:6379/0"),
        ("task_time_limit", "amqp://user:secret@host//"),
        ("broker_transport_options", "redis://:secret@host"),
        ("task_always_eager", "amqp://user:secret@host"),
    ],
)
def test_parse_celery_masks_passwords_in_errors(name, value):
    with pytest.raises(ConfigurationError) as info:
        celery(**{name: value})
    message = str(info.value)
    assert "secret" not in message
    assert f"celery.{name} = " in message
    assert ":***@host" in message


def test_parse_celery_custom_prefix():
    conf = parse_celery_settings(
        {"worker.task_acks_late": "yes", "celery.task_acks_late": "no"},
        prefix="worker.",
    )
    assert conf == {"task_acks_late": True}


# -- check_serializers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("task_serializer", "pickle"),
        ("result_serializer", "PICKLE"),
        ("event_serializer", "pickle"),
        ("accept_content", ["json", "pickle"]),
        ("accept_content", "json pickle"),
        ("accept_content", ["application/x-python-serialize"]),
        ("result_accept_content", ("json", "Application/X-Python-Serialize")),
    ],
)
def test_check_serializers_refuses_pickle(name, value):
    with pytest.raises(ConfigurationError) as info:
        check_serializers({name: value}, allow_pickle=False)
    message = str(info.value)
    assert message.startswith(f"Setting celery.{name} = {value!r} enables pickle")
    assert "tasks.allow_pickle = true" in message


def test_check_serializers_on_parsed_settings():
    conf = celery(accept_content="json\npickle", task_serializer="json")
    with pytest.raises(ConfigurationError, match=r"^Setting celery\.accept_content = "):
        check_serializers(conf, allow_pickle=False)


def test_check_serializers_allows_pickle_when_opted_in():
    conf = {"task_serializer": "pickle", "accept_content": ["pickle", "json"]}
    assert check_serializers(conf, allow_pickle=True) is None


def test_check_serializers_accepts_safe_ones():
    conf = {
        "task_serializer": "json",
        "result_serializer": "msgpack",
        "event_serializer": "json",
        "accept_content": ["json", "application/x-msgpack", "yaml"],
        "result_accept_content": None,
        "broker_url": "redis://pickle-host/0",  # not a serializer setting
    }
    assert check_serializers(conf, allow_pickle=False) is None
    assert check_serializers({}, allow_pickle=False) is None


def test_check_serializers_custom_prefix():
    with pytest.raises(ConfigurationError, match=r"Setting worker\.task_serializer"):
        check_serializers({"task_serializer": "pickle"}, False, prefix="worker.")


# -- tasks.* -------------------------------------------------------------


def test_tasks_settings_defaults():
    parsed = parse_tasks_settings({"celery.broker_url": "redis://", "other": "x"})
    assert parsed == TasksSettings()
    assert parsed == TasksSettings(
        site_url="http://localhost",
        queue_prefix="",
        retry_attempts=20,
        retry_backoff=0.1,
        retry_backoff_max=2.0,
        allow_pickle=False,
        publish_timeout=2.0,
    )


def test_tasks_settings_all_keys():
    parsed = parse_tasks_settings(
        {
            "tasks.site_url": " https://example.com:8443/app/ ",
            "tasks.queue_prefix": " mysite ",
            "tasks.retry.attempts": "5",
            "tasks.retry.backoff": "0.5",
            "tasks.retry.backoff_max": "10",
            "tasks.allow_pickle": "yes",
            "tasks.publish_timeout": "5s",
        }
    )
    assert parsed == TasksSettings(
        site_url="https://example.com:8443/app",
        queue_prefix="mysite",
        retry_attempts=5,
        retry_backoff=0.5,
        retry_backoff_max=10.0,
        allow_pickle=True,
        publish_timeout=5.0,
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 2.5 ", 2.5),
        ("0.5s", 0.5),
        ("10 S", 10.0),
        (4, 4.0),
        ("none", None),
        (" None ", None),
        (None, None),
    ],
)
def test_publish_timeout_accepted(value, seconds):
    parsed = parse_tasks_settings({"tasks.publish_timeout": value})
    assert parsed.publish_timeout == seconds


def test_tasks_settings_is_frozen():
    with pytest.raises(AttributeError):
        TasksSettings().queue_prefix = "x"  # type: ignore[misc]


def test_tasks_beat_keys_are_skipped():
    parsed = parse_tasks_settings(
        {
            "tasks.beat.cleanup.task": "myapp.tasks.cleanup",
            "tasks.beat.cleanup.schedule": "not parsed here",
            "tasks.beat.whatever": "x",
        }
    )
    assert parsed == TasksSettings()


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost",
        "https://example.com",
        "HTTPS://Example.com/App",
        "http://127.0.0.1:6543",
        "http://[::1]:8080/a/b",
    ],
)
def test_site_url_accepted(url):
    assert parse_tasks_settings({"tasks.site_url": url + "/"}).site_url == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("example.com/app", "an http(s) URL"),
        ("ftp://example.com", "an http(s) URL"),
        ("https://", "an http(s) URL"),
        ("https:///app", "an http(s) URL"),
        ("", "an http(s) URL"),
        ("http://example.com:99999", "an http(s) URL"),
        ("http://example.com:port", "an http(s) URL"),
        ("http://[::1", "an http(s) URL"),
        ("https://example.com/app?x=1", "a URL without query, fragment or credentials"),
        ("https://example.com/app#top", "a URL without query, fragment or credentials"),
        ("https://user@example.com", "a URL without query, fragment or credentials"),
        ("https://:secret@example.com", "a URL without query, fragment or credentials"),
        (
            "https://user:secret@example.com",
            "a URL without query, fragment or credentials",
        ),
    ],
)
def test_site_url_rejected(url, expected):
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({"tasks.site_url": url})
    message = str(info.value)
    assert message.startswith(f"Invalid setting tasks.site_url = {mask_secrets(url)!r}")
    assert f"expected {expected}" in message
    assert "secret" not in message


def test_site_url_bad_port_chained():
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({"tasks.site_url": "http://example.com:99999"})
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("prefix", ["", "mysite", "my-site_2", "a.b:c"])
def test_queue_prefix_accepted(prefix):
    assert parse_tasks_settings({"tasks.queue_prefix": prefix}).queue_prefix == prefix


@pytest.mark.parametrize("prefix", ["my site", "a/b", "é", "x*"])
def test_queue_prefix_rejected(prefix):
    with pytest.raises(
        ConfigurationError,
        match=re.escape(f"tasks.queue_prefix = {prefix!r}: expected a queue-name"),
    ):
        parse_tasks_settings({"tasks.queue_prefix": prefix})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("tasks.retry.attempts", "0", "an integer >= 1"),
        ("tasks.retry.attempts", "-2", "an integer >= 1"),
        ("tasks.retry.attempts", "2.5", "an integer"),
        ("tasks.retry.backoff", "-0.1", "a number >= 0"),
        ("tasks.retry.backoff", "fast", "a number"),
        ("tasks.retry.backoff_max", "-1", "a number >= 0"),
        ("tasks.retry.backoff_max", "nan", "a number >= 0"),
        ("tasks.allow_pickle", "sure", "one of true/false"),
        ("tasks.publish_timeout", "0", "a number of seconds > 0"),
        ("tasks.publish_timeout", "-1s", "a number of seconds > 0"),
        ("tasks.publish_timeout", "inf", "a number of seconds > 0"),
        ("tasks.publish_timeout", "2m", "a number of seconds > 0"),
        (
            "tasks.publish_timeout",
            "off",
            "a number of seconds > 0 (2, 2.5, 2s), or none",
        ),
        ("tasks.publish_timeout", "", "a number of seconds > 0"),
    ],
)
def test_tasks_settings_rejected(key, value, expected):
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({key: value})
    message = str(info.value)
    assert message.startswith(f"Invalid setting {key} = {value!r}: expected {expected}")


def test_retry_minimums_accepted():
    parsed = parse_tasks_settings(
        {
            "tasks.retry.attempts": "1",
            "tasks.retry.backoff": "0",
            "tasks.retry.backoff_max": "0",
        }
    )
    assert (parsed.retry_attempts, parsed.retry_backoff, parsed.retry_backoff_max) == (
        1,
        0.0,
        0.0,
    )


def test_backoff_max_equal_to_backoff_accepted():
    parsed = parse_tasks_settings(
        {"tasks.retry.backoff": "3", "tasks.retry.backoff_max": "3"}
    )
    assert parsed.retry_backoff == parsed.retry_backoff_max == 3.0


def test_backoff_max_below_backoff_rejected():
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings(
            {"tasks.retry.backoff": "5", "tasks.retry.backoff_max": "1"}
        )
    assert str(info.value) == (
        "Invalid setting tasks.retry.backoff_max = '1.0': expected a number >= "
        "tasks.retry.backoff (5.0)."
    )


def test_backoff_above_default_max_rejected():
    """The default backoff_max (2.0) applies when only backoff is raised."""
    with pytest.raises(ConfigurationError, match=r"backoff_max = '2\.0'"):
        parse_tasks_settings({"tasks.retry.backoff": "3"})


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("tasks.site_ulr", "tasks.site_url"),
        ("tasks.retry.attempt", "tasks.retry.attempts"),
        ("tasks.retry.backof", "tasks.retry.backoff"),
        ("tasks.retry.backoff_mx", "tasks.retry.backoff_max"),
        ("tasks.allow_pickles", "tasks.allow_pickle"),
        ("tasks.Queue_Prefix", "tasks.queue_prefix"),
        ("tasks.beet.cleanup.task", "tasks.beat.<name>.task"),
    ],
)
def test_unknown_tasks_key_suggests_close_one(key, suggestion):
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({key: "x"})
    assert str(info.value) == f"Unknown setting {key}: did you mean {suggestion}?"


@pytest.mark.parametrize("key", ["tasks.zzz", "tasks.beat", "tasks."])
def test_unknown_tasks_key_without_suggestion(key):
    with pytest.raises(ConfigurationError) as info:
        parse_tasks_settings({key: "x"})
    assert str(info.value) == f"Unknown setting {key}"


def test_tasks_custom_prefix():
    parsed = parse_tasks_settings(
        {"jobs.queue_prefix": "a", "tasks.queue_prefix": "b"}, prefix="jobs."
    )
    assert parsed.queue_prefix == "a"


# -- TasksSettings.queue_name ---------------------------------------------------


def test_queue_name_without_prefix():
    assert TasksSettings().queue_name("celery") == "celery"
    assert TasksSettings().queue_name("mysite.celery") == "mysite.celery"


def test_queue_name_with_prefix():
    options = TasksSettings(queue_prefix="mysite")
    assert options.queue_name("celery") == "mysite.celery"
    assert options.queue_name("maintenance") == "mysite.maintenance"
    assert options.queue_name("mysite.celery") == "mysite.celery"
    # only a whole "prefix." counts as already prefixed
    assert options.queue_name("mysitex") == "mysite.mysitex"
    assert options.queue_name("mysite") == "mysite.mysite"


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.from_regex(r"[A-Za-z0-9_.:-]{0,12}", fullmatch=True),
    name=st.text(min_size=1, max_size=20),
)
def test_queue_name_is_idempotent(prefix, name):
    options = TasksSettings(queue_prefix=prefix)
    once = options.queue_name(name)
    assert options.queue_name(once) == once
    if prefix:
        assert once.startswith(f"{prefix}.")
        assert once.endswith(name)
    else:
        assert once == name


def test_list_settings_also_take_a_json_list():
    conf = parse_celery_settings({"celery.accept_content": '["json", "msgpack"]'})
    assert conf["accept_content"] == ["json", "msgpack"]
    # Not JSON after all: the words of the text.
    conf = parse_celery_settings({"celery.accept_content": "[json"})
    assert conf["accept_content"] == ["[json"]


@pytest.mark.parametrize("value, expected", [("4", 4), ("auto", "auto"), (" 2 ", 2)])
def test_worker_concurrency_is_a_number_or_auto(value, expected):
    conf = parse_celery_settings({"celery.worker_concurrency": value})
    assert conf["worker_concurrency"] == expected


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_worker_concurrency_refuses_what_celery_would_ignore(value):
    with pytest.raises(ConfigurationError, match="integer >= 1 or auto"):
        parse_celery_settings({"celery.worker_concurrency": value})


def test_broken_json_in_a_loosely_typed_setting_is_an_error():
    with pytest.raises(ConfigurationError, match=r"celery\.task_routes.*valid JSON"):
        parse_celery_settings({"celery.task_routes": '{"myapp.*": {"queue": "x"}'})
    conf = parse_celery_settings({"celery.task_routes": "myapp.routers.route"})
    assert conf["task_routes"] == "myapp.routers.route"


def test_tls_settings_take_a_bool_or_a_dict():
    assert parse_celery_settings({"celery.broker_use_ssl": "true"}) == {
        "broker_use_ssl": True
    }
    conf = parse_celery_settings(
        {"celery.broker_use_ssl": '{"ssl_cert_reqs": "required"}'}
    )
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": "required"}
    conf = parse_celery_settings(
        {
            "celery.broker_use_ssl": "true",
            "celery.broker_use_ssl.ssl_ca_certs": "/etc/ssl/ca.pem",
        }
    )
    assert conf["broker_use_ssl"] == {"ssl_ca_certs": "/etc/ssl/ca.pem"}
    with pytest.raises(ConfigurationError, match=r"celery\.broker_use_ssl"):
        parse_celery_settings({"celery.broker_use_ssl": "maybe"})


def test_secrets_inside_json_values_are_masked():
    text = '{"sentinel_kwargs": {"password": "hunter2"}, "api_token": "t0k"}'
    masked = mask_secrets(text)
    assert "hunter2" not in masked and "t0k" not in masked
    assert '"password": "***"' in masked
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({"celery.broker_transport_options": text[:-1]})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@db/app?password=s3cret&sslmode=require",
        "host=db user=app password=s3cret dbname=app",
    ],
)
def test_passwords_in_queries_and_dsns_are_masked(text):
    masked = mask_secrets(text)
    assert "s3cret" not in masked
    assert "password=***" in masked
