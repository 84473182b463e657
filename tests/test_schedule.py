"""Unit tests for :mod:`pyramid_tasks.schedule`: parsed, never evaluated."""

import re
from datetime import timedelta

import pytest
from celery.schedules import crontab
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyramid.exceptions import ConfigurationError

from pyramid_tasks.schedule import parse_beat_settings, parse_schedule

KEY = "tasks.beat.cleanup.schedule"


def rejected(text, key=KEY):
    """The message of the ConfigurationError ``parse_schedule`` raises."""
    with pytest.raises(ConfigurationError) as info:
        parse_schedule(text, key=key)
    message = str(info.value)
    assert message.startswith(f"Invalid setting {key} = ")
    assert "expected seconds (30, 2.5), a duration (90s, 15m, 2h, 1d)" in message
    return info.value


def same_crontab(got, want):
    """crontab equality plus the fields celery compares (belt and braces)."""
    assert isinstance(got, crontab)
    assert got == want
    for field in ("minute", "hour", "day_of_week", "day_of_month", "month_of_year"):
        assert getattr(got, field) == getattr(want, field), field


# -- accepted forms ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", timedelta(seconds=30)),
        ("2.5", timedelta(seconds=2.5)),
        (".5", timedelta(milliseconds=500)),
        ("  45  ", timedelta(seconds=45)),
        ("86400", timedelta(days=1)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1.5h", timedelta(minutes=90)),
        ("30 s", timedelta(seconds=30)),
        ("timedelta(minutes=30)", timedelta(minutes=30)),
        ("timedelta(hours=1, minutes=30)", timedelta(minutes=90)),
        ("timedelta(days=1.5)", timedelta(hours=36)),
        (
            "timedelta(weeks=1, days=1, hours=1, minutes=1, seconds=1, "
            "milliseconds=1, microseconds=1)",
            timedelta(
                weeks=1,
                days=1,
                hours=1,
                minutes=1,
                seconds=1,
                milliseconds=1,
                microseconds=1,
            ),
        ),
        ("timedelta( seconds = 10 )", timedelta(seconds=10)),
        ("timedelta(\n    minutes=5,\n)", timedelta(minutes=5)),
        ("timedelta(days=0, seconds=1)", timedelta(seconds=1)),
    ],
)
def test_interval_forms(text, expected):
    result = parse_schedule(text, key=KEY)
    assert type(result) is timedelta
    assert result == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*/15 * * * *", crontab(minute="*/15")),
        ("0 3 * * *", crontab(minute="0", hour="3")),
        ("  0   3 * *   * ", crontab(minute="0", hour="3")),
        ("0 0 1 * *", crontab(minute="0", hour="0", day_of_month="1")),
        ("0 0 * * mon", crontab(minute="0", hour="0", day_of_week="mon")),
        ("0 0 * * 1-5", crontab(minute="0", hour="0", day_of_week="1-5")),
        ("5,35 9-17 * 1,7 *", crontab(minute="5,35", hour="9-17", month_of_year="1,7")),
        (
            "1 2 3 4 5",
            crontab(minute=1, hour=2, day_of_month=3, month_of_year=4, day_of_week=5),
        ),
        ("0\t0\t*\t*\t*", crontab(minute="0", hour="0")),
        (
            'crontab(minute="*/15", hour="0-6")',
            crontab(minute="*/15", hour="0-6"),
        ),
        ("crontab(minute=0, hour=3)", crontab(minute=0, hour=3)),
        ("crontab(minute='30')", crontab(minute="30")),
        (
            'crontab(minute=0, hour=0, day_of_week="sun", day_of_month="1-7", '
            'month_of_year="*/3")',
            crontab(
                minute=0,
                hour=0,
                day_of_week="sun",
                day_of_month="1-7",
                month_of_year="*/3",
            ),
        ),
        ("crontab (minute = 5)", crontab(minute=5)),
    ],
)
def test_crontab_forms(text, expected):
    same_crontab(parse_schedule(text, key=KEY), expected)


def test_crontab_field_order_is_cron_order():
    result = parse_schedule("1 2 3 4 5")
    assert result.minute == {1}
    assert result.hour == {2}
    assert result.day_of_month == {3}
    assert result.month_of_year == {4}
    assert result.day_of_week == {5}


def test_text_forms_agree():
    assert (
        parse_schedule("1800")
        == parse_schedule("30m")
        == parse_schedule("0.5h")
        == parse_schedule("timedelta(minutes=30)")
        == timedelta(minutes=30)
    )
    assert parse_schedule("*/15 0-6 * * *") == parse_schedule(
        'crontab(minute="*/15", hour="0-6")'
    )


def test_non_text_value_is_read_as_text():
    assert parse_schedule(30) == timedelta(seconds=30)
    assert parse_schedule(2.5) == timedelta(seconds=2.5)


# -- rejected forms ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "0.0",
        "0s",
        "0m",
        "0.0h",
        "-5",
        "-5s",
        "timedelta(minutes=0)",
        "timedelta(minutes=-5)",
        "timedelta(seconds=-1, minutes=1)",  # unary minus is not a literal
        "timedelta(microseconds=0.1)",  # rounds to zero
    ],
)
def test_zero_and_negative_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "soon",
        "1e5",
        "5 minutes",
        "15M",
        "2w",
        "1h30m",
        "30ss",
        "1.2.3",
        "* * * *",
        "* * * * * *",
        "@daily",
        "*/15 * * * * ?",
        "0 0 * * 7",
        "99 * * * *",
        "* 24 * * *",
        "* * 32 * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * funday",
        "a b c d e",
        "*/0 * * * *",
        "0 0 * * mon;",
        "crontab",
        "crontab()",
        "timedelta()",
        "crontab(minute=99)",
        'crontab(minute="99")',
        'crontab(hour="0-24")',
        'crontab(minute="")',
        'crontab(minute="*/0")',
        "crontab(minute=1.5)",
        "timedelta(days=1e10)",
        "timedelta(days=" + "9" * 400 + ")",
        "9" * 400,
        "9" * 400 + "d",
    ],
)
def test_bad_text_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "crontab(5)",
        'crontab("*/15")',
        "timedelta(30)",
        "timedelta(1, minutes=2)",
        "crontab(*['5'])",
        "timedelta(**{'minutes': 5})",
    ],
)
def test_positional_and_star_arguments_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "crontab(minutes=5)",
        "crontab(second=5)",
        "crontab(nowfun=1)",
        "crontab(app=1)",
        "timedelta(minute=5)",
        "timedelta(years=1)",
        "timedelta(months=1)",
        'timedelta(hour="1")',
    ],
)
def test_unknown_keywords_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "crontab(minute=5, minute=6)",
        "timedelta(minutes=5, hours=1, minutes=5)",
    ],
)
def test_duplicate_keywords_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "crontab(minute=x)",
        "crontab(minute=None)",
        "crontab(minute=True)",
        "timedelta(minutes=True)",
        "timedelta(minutes=False, seconds=1)",
        'timedelta(minutes="5")',
        "timedelta(minutes=1j)",
        "crontab(minute=b'5')",
        "crontab(minute=[1, 2])",
        "crontab(minute={1, 2})",
        "crontab(minute=(1, 2))",
        "crontab(minute=...)",
        'crontab(minute=f"{5}")',
        'crontab(minute="*/" + "15")',
        "timedelta(minutes=2*15)",
        "timedelta(minutes=+5)",
        "crontab(minute=int('5'))",
        'crontab(minute=__import__("os").system("x"))',
        "crontab(minute=os.sep)",
        "timedelta(minutes=(lambda: 5)())",
        "timedelta(minutes=(m := 5))",
        'crontab(minute="5"[0])',
        "timedelta(minutes=1 if True else 2)",
    ],
)
def test_non_literal_values_rejected(text):
    rejected(text)


@pytest.mark.parametrize(
    "text",
    [
        "crontab(minute=1)(hour=2)",
        "crontab(minute=1) + timedelta(minutes=1)",
        "crontab(minute=1) or crontab(hour=1)",
        "crontab(minute=1), crontab(hour=1)",
        "timedelta(minutes=1) * 2 and timedelta(seconds=1)",
        "crontab(minute=1)\ncrontab(hour=1)",
        "crontab(minute=1",
        "crontab(minute=1))",
        "crontab(minute='\x00')",
        "crontab(minute='\ud800')",
        "timedelta(minutes=" + "(" * 300 + "1" + ")" * 300 + ")",
        "cron(minute=1)",
        "crontabs(minute=1)",
        "Crontab(minute=1)",
        "datetime.timedelta(minutes=1)",
        "celery.schedules.crontab(minute=1)",
        "schedule(run_every=1)",
        "solar(event='sunset', lat=0, lon=0)",
        "eval('crontab(minute=1)')",
    ],
)
def test_other_expressions_rejected(text):
    rejected(text)


def test_overlong_call_rejected():
    padded = "crontab(minute=5" + " " * 490 + ")"
    assert len(padded) > 500
    rejected(padded)
    assert parse_schedule("crontab(minute=5" + " " * 480 + ")") == crontab(minute=5)


def test_error_names_key_and_value_and_chains_cause():
    error = rejected("99 * * * *")
    assert str(error).startswith(
        "Invalid setting tasks.beat.cleanup.schedule = '99 * * * *'"
    )
    assert isinstance(error.__cause__, ValueError)


def test_error_without_cause():
    error = rejected("soon")
    assert error.__cause__ is None


def test_error_default_key():
    with pytest.raises(ConfigurationError, match=r"^Invalid setting schedule = 'x'"):
        parse_schedule("x")


def test_error_masks_passwords():
    error = rejected("redis://:secret@host/0")
    assert "secret" not in str(error)
    assert "redis://:***@host/0" in str(error)


# -- parse_beat_settings -----------------------------------------------------------


def test_beat_full_entry():
    beat = parse_beat_settings(
        {
            "tasks.beat.cleanup.task": " myapp.tasks.cleanup ",
            "tasks.beat.cleanup.schedule": "*/15 * * * *",
            "tasks.beat.cleanup.args": '[7, "x", [1]]',
            "tasks.beat.cleanup.kwargs": '{"dry_run": false}',
            "tasks.beat.cleanup.options": '{"queue": "maintenance", "priority": 5}',
            "celery.broker_url": "redis://",
            "tasks.site_url": "http://x",
        }
    )
    assert list(beat) == ["cleanup"]
    entry = beat["cleanup"]
    assert set(entry) == {"task", "schedule", "args", "kwargs", "options"}
    assert entry["task"] == "myapp.tasks.cleanup"
    same_crontab(entry["schedule"], crontab(minute="*/15"))
    assert entry["args"] == (7, "x", [1])
    assert type(entry["args"]) is tuple
    assert entry["kwargs"] == {"dry_run": False}
    assert entry["options"] == {"queue": "maintenance", "priority": 5}


def test_beat_minimal_entry_has_only_task_and_schedule():
    beat = parse_beat_settings(
        {"tasks.beat.ping.task": "app.ping", "tasks.beat.ping.schedule": "30"}
    )
    assert beat == {"ping": {"task": "app.ping", "schedule": timedelta(seconds=30)}}


def test_beat_empty():
    assert parse_beat_settings({}) == {}
    assert parse_beat_settings({"tasks.site_url": "http://x", "tasks.beat": "x"}) == {}


def test_beat_entries_sorted_by_name():
    settings = {}
    for name in ("zeta", "alpha", "mid.dle", "Beta"):
        settings[f"tasks.beat.{name}.schedule"] = "1m"
        settings[f"tasks.beat.{name}.task"] = f"app.{name.replace('.', '_')}"
    beat = parse_beat_settings(settings)
    assert list(beat) == ["Beta", "alpha", "mid.dle", "zeta"]
    assert beat["mid.dle"]["task"] == "app.mid_dle"


def test_beat_task_names():
    for task in ("app.tasks.cleanup", "cleanup", "app:task", "app-x.t_1"):
        beat = parse_beat_settings(
            {"tasks.beat.a.task": task, "tasks.beat.a.schedule": "1h"}
        )
        assert beat["a"]["task"] == task


@pytest.mark.parametrize("missing", ["task", "schedule"])
def test_beat_missing_required_field(missing):
    settings = {
        "tasks.beat.cleanup.task": "app.cleanup",
        "tasks.beat.cleanup.schedule": "1h",
        "tasks.beat.cleanup.args": "[]",
    }
    del settings[f"tasks.beat.cleanup.{missing}"]
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings(settings)
    assert str(info.value) == (
        f"Beat entry 'cleanup' has no tasks.beat.cleanup.{missing} setting."
    )


@pytest.mark.parametrize(
    "key",
    [
        "tasks.beat.cleanup.tsak",
        "tasks.beat.cleanup.Task",
        "tasks.beat.cleanup.queue",
        "tasks.beat.cleanup",
        "tasks.beat.task",
        "tasks.beat..task",
    ],
)
def test_beat_unknown_field(key):
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings({key: "x", "tasks.beat.cleanup.task": "app.cleanup"})
    assert str(info.value) == (
        f"Unknown setting {key}: beat entries are "
        "tasks.beat.<name>.{task,schedule,args,kwargs,options}"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("args", "[7", "a JSON list"),
        ("args", "7", "a JSON list"),
        ("args", '{"a": 1}', "a JSON list"),
        ("kwargs", "[1]", "a JSON object"),
        ("kwargs", "{dry_run: false}", "a JSON object"),
        ("options", '"maintenance"', "a JSON object"),
        ("options", "", "a JSON object"),
    ],
)
def test_beat_bad_json(field, value, expected):
    settings = {
        "tasks.beat.cleanup.task": "app.cleanup",
        "tasks.beat.cleanup.schedule": "1h",
        f"tasks.beat.cleanup.{field}": value,
    }
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings(settings)
    assert str(info.value) == (
        f"Invalid setting tasks.beat.cleanup.{field} = {value!r}: expected {expected}."
    )


@pytest.mark.parametrize(
    "task", ["", "   ", "app tasks", "app.tasks;rm", "app/tasks", "app.tasks()"]
)
def test_beat_bad_task_name(task):
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings(
            {"tasks.beat.cleanup.task": task, "tasks.beat.cleanup.schedule": "1h"}
        )
    assert str(info.value) == (
        f"Invalid setting tasks.beat.cleanup.task = {task.strip()!r}: "
        "expected a task name such as myapp.tasks.cleanup."
    )


def test_beat_bad_schedule_names_its_key():
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings(
            {
                "tasks.beat.nightly.task": "app.nightly",
                "tasks.beat.nightly.schedule": "every night",
            }
        )
    assert str(info.value).startswith(
        "Invalid setting tasks.beat.nightly.schedule = 'every night': expected"
    )


def test_beat_custom_prefix():
    beat = parse_beat_settings(
        {"beat.x.task": "app.x", "beat.x.schedule": "2h", "tasks.beat.y.task": "z"},
        prefix="beat.",
    )
    assert beat == {"x": {"task": "app.x", "schedule": timedelta(hours=2)}}


# -- properties ----------------------------------------------------------------


def outcome(text):
    """Run ``parse_schedule``; anything but a schedule or ConfigurationError fails."""
    try:
        result = parse_schedule(text, key=KEY)
    except ConfigurationError as exc:
        assert str(exc).startswith(f"Invalid setting {KEY} = ")
        return None
    assert isinstance(result, timedelta | crontab)
    assert not isinstance(result, timedelta) or result > timedelta(0)
    return result


_CALL_KEYWORDS = [
    "minute",
    "hour",
    "day_of_week",
    "day_of_month",
    "month_of_year",
    "weeks",
    "days",
    "hours",
    "minutes",
    "seconds",
    "milliseconds",
    "microseconds",
    "nowfun",
    "app",
    "x",
    "",
    "**",
    "*",
]
_CALL_VALUES = st.one_of(
    st.integers(-100, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            '"*/15"',
            '"0-6"',
            '"mon-fri"',
            '"99"',
            '""',
            "'*'",
            "True",
            "None",
            "x",
            "os.sep",
            "[1, 2]",
            "{}",
            "-1",
            "1j",
            "b'1'",
            "...",
            "(",
            ")",
            ",",
            "=",
            "lambda: 1",
            "f'{1}'",
            '"\\x00"',
        ]
    ),
    st.text(max_size=10).map(repr),
    st.text(max_size=10),
)
_call_soup = st.builds(
    lambda func, space, parts, sep, tail: f"{func}{space}({sep.join(parts)}{tail})",
    st.sampled_from(["crontab", "timedelta", "crontab ", "timedelta\n", "cron"]),
    st.sampled_from(["", " ", "\t"]),
    st.lists(
        st.one_of(
            st.builds(
                lambda k, v: f"{k}={v}", st.sampled_from(_CALL_KEYWORDS), _CALL_VALUES
            ),
            _CALL_VALUES,
        ),
        max_size=6,
    ),
    st.sampled_from([", ", ",", " ", ";", ",\n"]),
    st.sampled_from(["", ",", ")", " ", "#"]),
)
_CRON_TOKENS = st.one_of(
    st.sampled_from(
        [
            "*",
            "*/15",
            "*/0",
            "0-6",
            "6-0",
            "99",
            "0",
            "59",
            "60",
            "mon",
            "jan",
            "sun-sat",
        ]
    ),
    st.sampled_from(["1,2", "1-", "-1", "/", ",", "a", "**", "1/2/3", "7", "L", "?"]),
    st.from_regex(r"[0-9A-Za-z*/,-]{1,6}", fullmatch=True),
)
_cron_combo = st.lists(_CRON_TOKENS, min_size=4, max_size=6).map(" ".join)
_duration = st.builds(
    lambda n, space, unit: f"{n}{space}{unit}",
    st.one_of(st.integers(-5, 10**9).map(str), st.floats(0, 1e9).map(repr)),
    st.sampled_from(["", " ", "  "]),
    st.sampled_from(["s", "m", "h", "d", "w", "", "S", "ms"]),
)


@settings(max_examples=400, deadline=None)
@given(st.text())
@example("crontab(minute='\ud800')")
@example("timedelta(minutes=" + "(" * 300 + "1" + ")" * 300 + ")")
def test_arbitrary_text_parses_or_raises_configuration_error(text):
    outcome(text)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_call_soup, _cron_combo, _duration))
def test_near_misses_parse_or_raise_configuration_error(text):
    outcome(text)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["weeks", "days", "hours", "minutes", "seconds", "milliseconds"]
        ),
        st.integers(0, 1000),
        min_size=1,
    )
)
def test_timedelta_literals_match_timedelta(kwargs):
    text = "timedelta(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    expected = timedelta(**kwargs)
    if expected > timedelta(0):
        assert parse_schedule(text) == expected
    else:
        rejected(text)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 59),
    st.integers(0, 23),
    st.integers(1, 28),  # every month has these days; impossible dates below
    st.integers(1, 12),
    st.integers(0, 6),
)
def test_five_field_crontab_matches_crontab(minute, hour, dom, month, dow):
    """Same schedule as celery's crontab."""
    text = f"{minute} {hour} {dom} {month} {dow}"
    expected = crontab(
        minute=minute,
        hour=hour,
        day_of_month=dom,
        month_of_year=month,
        day_of_week=dow,
    )
    same_crontab(parse_schedule(text), expected)


def test_impossible_date_rejected():
    error = rejected("0 0 30 2 *")
    assert "never occurs" in str(error.__cause__)


# -- never evaluated ------------------------------------------------------------


def _payloads(path):
    quoted = repr(str(path))
    return [
        f"open({quoted}, 'w')",
        f"open({quoted}, 'w').write('x')",
        f"__import__('os').system('touch ' + {quoted})",
        f"__import__('pathlib').Path({quoted}).touch()",
        f"(lambda: open({quoted}, 'w'))()",
        f"[open({quoted}, 'w') for _ in '1'][0]",
        f"exec('open({quoted}, \"w\")')",
        f"eval('open({quoted}, \"w\")')",
        f"(open({quoted}, 'w') and 5)",
        f"{{'a': open({quoted}, 'w')}}['a']",
    ]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_code_in_schedules_is_never_executed(tmp_path, data):
    sentinel = tmp_path / "executed"
    payload = data.draw(st.sampled_from(_payloads(sentinel)), label="payload")
    func, keyword = data.draw(
        st.sampled_from(
            [
                ("crontab", "minute"),
                ("crontab", "hour"),
                ("crontab", "day_of_week"),
                ("timedelta", "minutes"),
                ("timedelta", "seconds"),
            ]
        ),
        label="call",
    )
    before = data.draw(
        st.sampled_from(["", "hour='1', ", "days=1, ", "minute=5, "]), label="before"
    )
    shape = data.draw(
        st.sampled_from(
            [
                "{func}({before}{kw}={p})",
                "{func}({p})",
                "{func}({before}{kw}=1, **{{'x': {p}}})",
                "{func}({kw}=1)({p})",
                "{func}({kw}=1) + {p}",
                "{func}({kw}=1) if {p} else {func}({kw}=2)",
                "{func}(*{p})",
                "{p} * * * *",
                "{p}",
            ]
        ),
        label="shape",
    )
    text = shape.format(func=func, before=before, kw=keyword, p=payload)
    with pytest.raises(ConfigurationError, match=re.escape(f"Invalid setting {KEY}")):
        parse_schedule(text, key=KEY)
    assert not sentinel.exists()


def test_import_payload_is_not_executed(tmp_path):
    sentinel = tmp_path / "imported"
    text = f'crontab(minute=__import__("os").system("touch {sentinel}"))'
    rejected(text)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "text", ["\u0663\u0660", "\u0663\u0660s", "\uff11\uff15m"]
)  # Arabic-Indic 30, fullwidth 15
def test_only_ascii_digits_are_numbers(text):
    with pytest.raises(ConfigurationError):
        parse_schedule(text)
