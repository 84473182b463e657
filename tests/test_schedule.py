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
        # Spaces around items, as Celery's own crontab() takes them.
        ('crontab(minute="0, 30")', crontab(minute="0,30")),
        ('crontab(minute=" 5")', crontab(minute="5")),
        (
            'crontab(minute="*/15, 7 ", hour=" 1-3 ")',
            crontab(minute="*/15,7", hour="1-3"),
        ),
        ('crontab(day_of_week=" mon , fri ")', crontab(day_of_week="mon,fri")),
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
        "0 0 * * mon;",
        "crontab",
        "crontab()",
        "timedelta()",
        "timedelta(days=1e10)",
        "timedelta(days=" + "9" * 400 + ")",
        "9" * 400,
        "9" * 400 + "d",
    ],
)
def test_bad_text_rejected(text):
    rejected(text)


# -- crontab fields: each in its range, the error naming field, value and range


def field_error(text, reason):
    """``parse_schedule(text)`` refused, with exactly ``reason`` after the value."""
    with pytest.raises(ConfigurationError) as info:
        parse_schedule(text, key=KEY)
    assert str(info.value) == f"Invalid setting {KEY} = {text!r}: {reason}."
    return info.value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("*/61 * * * *", "minute field '*/61': step 61 is outside 1-59"),
        ("*/60 * * * *", "minute field '*/60': step 60 is outside 1-59"),
        ("*/0 * * * *", "minute field '*/0': step 0 is outside 1-59"),
        ("99 * * * *", "minute field '99': 99 is outside 0-59"),
        ("0,15,60 * * * *", "minute field '0,15,60': 60 is outside 0-59"),
        ("0-60 * * * *", "minute field '0-60': 60 is outside 0-59"),
        ("* 24 * * *", "hour field '24': 24 is outside 0-23"),
        ("* */24 * * *", "hour field '*/24': step 24 is outside 1-23"),
        ("* * 0 * *", "day of month field '0': 0 is outside 1-31"),
        ("* * 32 * *", "day of month field '32': 32 is outside 1-31"),
        ("* * */31 * *", "day of month field '*/31': step 31 is outside 1-30"),
        ("* * * 13 *", "month field '13': 13 is outside 1-12"),
        ("* * * */12 *", "month field '*/12': step 12 is outside 1-11"),
        ("* * * mon *", "month field 'mon': 'mon' is not in 1-12 or jan-dec"),
        ("0 0 * * 7", "day of week field '7': 7 is outside 0-6"),
        ("0 0 * * */7", "day of week field '*/7': step 7 is outside 1-6"),
        (
            "* * * * funday",
            "day of week field 'funday': 'funday' is not in 0-6 or sun-sat",
        ),
        ("* * * * jan", "day of week field 'jan': 'jan' is not in 0-6 or sun-sat"),
        (
            "* * * * monster",
            "day of week field 'monster': 'monster' is not in 0-6 or sun-sat",
        ),
        ("mon * * * *", "minute field 'mon': 'mon' is not in 0-59"),
        ("a b c d e", "minute field 'a': 'a' is not in 0-59"),
        ("0-30/45 * * * *", "minute field '0-30/45': step 45 leaves only 0 of 0-30"),
        (
            "50-10/21 * * * *",
            "minute field '50-10/21': step 21 leaves only 50 of 50-10",
        ),
        ("5/15 * * * *", "minute field '5/15': a step needs * or a range before it"),
        ("*/x * * * *", "minute field '*/x': step 'x' is not a number"),
        ("*/ * * * *", "minute field '*/': step '' is not a number"),
        ("1,,2 * * * *", "minute field '1,,2': a value is missing"),
        ("5- * * * *", "minute field '5-': a value is missing"),
        ("-3 * * * *", "minute field '-3': '-3' is not in 0-59"),
        ("1-2-3 * * * *", "minute field '1-2-3': '2-3' is not in 0-59"),
        ("crontab(minute=99)", "minute=99: 99 is outside 0-59"),
        ('crontab(minute="*/61")', "minute='*/61': step 61 is outside 1-59"),
        ('crontab(hour="0-24")', "hour='0-24': 24 is outside 0-23"),
        ('crontab(minute="")', "minute='': a value is missing"),
        ('crontab(minute="*/0")', "minute='*/0': step 0 is outside 1-59"),
        (
            "crontab(minute=1.5)",
            "minute=1.5: expected a whole number or a crontab field",
        ),
        ('crontab(day_of_week="7")', "day_of_week='7': 7 is outside 0-6"),
        ("crontab(day_of_month=0)", "day_of_month=0: 0 is outside 1-31"),
        (
            'crontab(month_of_year="sun")',
            "month_of_year='sun': 'sun' is not in 1-12 or jan-dec",
        ),
        ('crontab(minute="1 - 2")', "minute='1 - 2': '1 ' is not in 0-59"),
        ('crontab(minute="1, ")', "minute='1, ': a value is missing"),
        ('crontab(minute="\u0663")', "minute='\u0663': '\u0663' is not in 0-59"),
        (
            'crontab(minute="*/\uff11")',
            "minute='*/\uff11': step '\uff11' is not a number",
        ),
    ],
)
def test_crontab_field_out_of_range_names_the_field(text, reason):
    assert field_error(text, reason).__cause__ is None


def test_crontab_field_error_masks_passwords():
    with pytest.raises(ConfigurationError) as info:
        parse_schedule('crontab(minute="redis://:pw@host")', key=KEY)
    assert str(info.value) == (
        f"Invalid setting {KEY} = 'crontab(minute=\"redis://:***@host\")': "
        "minute='redis://:***@host': 'redis:' is not in 0-59."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*/59 * * * *", crontab(minute="0,59")),
        ("* */23 * * *", crontab(minute="*", hour="0,23")),
        (
            "0 0 * jan,Dec sun",
            crontab(minute=0, hour=0, month_of_year="1,12", day_of_week=0),
        ),
        ("0 0 * * monday-FRIDAY", crontab(minute=0, hour=0, day_of_week="1-5")),
        ("0 0 1 january *", crontab(minute=0, hour=0, day_of_month=1, month_of_year=1)),
        ("50-10/5 * * * *", crontab(minute="50,55,0,5,10")),
        ("0-30/30 * * * *", crontab(minute="0,30")),
        ("0 0 * * sat-sun", crontab(minute=0, hour=0, day_of_week="0,6")),
        ("0 0 31 * *", crontab(minute=0, hour=0, day_of_month=31)),
        ('crontab(day_of_week="mon-fri/2")', crontab(day_of_week="1,3,5")),
    ],
)
def test_crontab_names_steps_and_wrapping_ranges(text, expected):
    same_crontab(parse_schedule(text, key=KEY), expected)


def test_beat_crontab_error_names_the_entry_and_field():
    with pytest.raises(ConfigurationError) as info:
        parse_beat_settings(
            {
                "tasks.beat.cleanup.task": "app.cleanup",
                "tasks.beat.cleanup.schedule": "*/61 * * * *",
            }
        )
    assert str(info.value) == (
        "Invalid setting tasks.beat.cleanup.schedule = '*/61 * * * *': "
        "minute field '*/61': step 61 is outside 1-59."
    )


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
    error = rejected("timedelta(days=1e10)")
    assert str(error).startswith(
        "Invalid setting tasks.beat.cleanup.schedule = 'timedelta(days=1e10)'"
    )
    assert isinstance(error.__cause__, OverflowError)


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


_FIELDS = [  # keyword, label in the five-field form, range
    ("minute", "minute", 0, 59),
    ("hour", "hour", 0, 23),
    ("day_of_month", "day of month", 1, 31),
    ("month_of_year", "month", 1, 12),
    ("day_of_week", "day of week", 0, 6),
]


def five_field(position, spec):
    """``spec`` in one field, ``*`` in the others (so every date occurs)."""
    fields = ["*"] * 5
    fields[position] = spec
    return " ".join(fields)


def reason_after(text, spec):
    """What ``parse_schedule`` says of ``spec`` in ``text``, or its crontab."""
    try:
        return parse_schedule(text, key=KEY)
    except ConfigurationError as exc:
        head, _, reason = str(exc).partition(f"{spec!r}: ")
        assert head.startswith(f"Invalid setting {KEY} = ")
        return reason


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), st.integers(0, 100))
def test_a_value_is_accepted_exactly_in_its_range(position, value):
    name, label, low, high = _FIELDS[position]
    text = five_field(position, str(value))
    if low <= value <= high:
        assert getattr(parse_schedule(text), name) == {value}
        assert getattr(parse_schedule(f"crontab({name}={value})"), name) == {value}
    else:
        outside = f"{value} is outside {low}-{high}"
        field_error(text, f"{label} field '{value}': {outside}")
        field_error(f"crontab({name}={value})", f"{name}={value}: {outside}")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 4), st.booleans(), st.integers(0, 70), st.data())
def test_a_step_is_accepted_only_when_it_leaves_two_values(position, star, step, data):
    """``*/61`` is not hourly: a step leaving one value is refused, and an
    accepted one gives Celery the values a wrapping range and step mean."""
    name, label, low, high = _FIELDS[position]
    if star:
        spec, values = f"*/{step}", list(range(low, high + 1))
    else:
        first = data.draw(st.integers(low, high), label="first")
        last = data.draw(st.integers(low, high), label="last")
        spec = f"{first}-{last}/{step}"
        if first <= last:
            values = list(range(first, last + 1))
        else:  # wraps around the end of the field
            values = list(range(first, high + 1)) + list(range(low, last + 1))
    text = five_field(position, spec)
    if step >= 1 and len(values[::step]) >= 2:
        assert getattr(parse_schedule(text), name) == set(values[::step])
        keyword = parse_schedule(f"crontab({name}={spec!r})")
        assert getattr(keyword, name) == set(values[::step])
    else:
        with pytest.raises(ConfigurationError) as info:
            parse_schedule(text)
        assert f": {label} field '{spec}': step {step} " in str(info.value)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 4),
    _CRON_TOKENS.filter(lambda token: re.fullmatch(r"[0-9A-Za-z*/,-]+", token)),
)
def test_five_field_and_keyword_forms_agree(position, token):
    name = _FIELDS[position][0]
    five = reason_after(five_field(position, token), token)
    keyword = reason_after(f"crontab({name}={token!r})", token)
    if isinstance(five, crontab):
        same_crontab(five, keyword)
    else:
        assert five == keyword != ""


@pytest.mark.parametrize(
    "text", ["0 0 30 2 *", 'crontab(day_of_month=31, month_of_year="4,6")']
)
def test_impossible_date_rejected(text):
    with pytest.raises(ConfigurationError) as info:
        parse_schedule(text, key=KEY)
    assert "never occurs in month_of_year" in str(info.value)
    assert str(info.value).startswith(f"Invalid setting {KEY} = {text!r}: ")
    assert isinstance(info.value.__cause__, ValueError)


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
