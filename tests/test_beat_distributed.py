"""Beat on several hosts: RedBeat fed from the INI's ``tasks.beat.*`` entries.

Settings and checks in-process; then two real ``tasks-celery INI -- beat``
processes on one schedule, on a password-protected Redis of the test's own:
one sends, the other waits; the one holding the lock is SIGKILLed and the
other takes over within ``redbeat_lock_timeout + beat_max_loop_interval``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery, signals
from celery.bin.celery import celery as celery_command
from celery.schedules import BaseSchedule, crontab, maybe_schedule
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError, ConfigurationExecutionError
from pyramid.paster import get_app

from pyramid_tasks.beat import REDBEAT_MAX_LOOP_INTERVAL, check_beat_scheduler
from pyramid_tasks.cli import main
from pyramid_tasks.schedule import parse_schedule
from pyramid_tasks.settings import parse_celery_settings
from tests.pkgs import cli_app

from .conftest import ROOT, tasks_celery, wait_for

SCHEDULER = "redbeat.RedBeatScheduler"
URL = "redis://redis.example:6379/1"


@pytest.fixture
def celery_option():
    """``main`` hands its app to Celery's CLI as the default of ``-A``: undo it."""
    option = celery_command.params[0]
    default = option.default
    yield
    option.default = default


@pytest.fixture(scope="module")
def redbeat():
    """RedBeat's ``schedulers`` module, imported by this module only.

    Importing it connects a ``beat_init`` receiver for every beat of the
    process; other test modules start Celery's own beat in-process, so it
    is disconnected again after these tests.
    """
    from redbeat import schedulers

    yield schedulers
    signals.beat_init.disconnect(schedulers.acquire_distributed_beat_lock)


# -- celery.redbeat_* settings --------------------------------------------------


def test_redbeat_settings_are_known_and_coerced():
    conf = parse_celery_settings(
        {
            "celery.beat_scheduler": f" {SCHEDULER} ",
            "celery.redbeat_redis_url": " redis://:hunter2@redis.example:6379/1 ",
            "celery.redbeat_key_prefix": "mysite:redbeat:",
            "celery.redbeat_lock_key": "mysite:redbeat::lock",
            "celery.redbeat_lock_timeout": "30",
            "celery.redbeat_redis_options": '{"retry_period": 10}',
            "celery.redbeat_redis_options.socket_timeout": "5",
            "celery.redbeat_redis_use_ssl": '{"ssl_cert_reqs": "required"}',
        }
    )

    assert conf == {
        "beat_scheduler": SCHEDULER,
        "redbeat_redis_url": "redis://:hunter2@redis.example:6379/1",
        "redbeat_key_prefix": "mysite:redbeat:",
        "redbeat_lock_key": "mysite:redbeat::lock",
        "redbeat_lock_timeout": 30,
        "redbeat_redis_options": {"retry_period": 10, "socket_timeout": 5},
        "redbeat_redis_use_ssl": {"ssl_cert_reqs": "required"},
    }


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/2",
        "rediss://:pw@host:6380/0",
        "unix:///run/redis.sock",
        "redis-sentinel://host:26379/0",
        "redis-cluster://host:30001",
    ],
)
def test_redbeat_redis_url_takes_the_schemes_redbeat_connects_with(url):
    conf = parse_celery_settings({"celery.redbeat_redis_url": url})
    assert conf == {"redbeat_redis_url": url}


def test_redbeat_use_ssl_is_a_bool_too():
    conf = parse_celery_settings({"celery.redbeat_redis_use_ssl": "yes"})
    assert conf == {"redbeat_redis_use_ssl": True}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("redbeat_lock_timeout", "soon", "an integer"),
        ("redbeat_lock_timeout", "0", "an integer >= 1"),
        ("redbeat_lock_timeout", "2.5", "an integer"),
        ("redbeat_redis_url", "http://:hunter2@redis.example/0", "a Redis URL"),
        ("redbeat_redis_url", "redis://:hunter2@[::1", "a Redis URL"),
        ("redbeat_redis_url", "127.0.0.1:6379", "a Redis URL"),
        ("redbeat_lock_key", " ", "a Redis key name (not empty, no spaces)"),
        ("redbeat_key_prefix", "my site:", "a Redis key name (not empty, no spaces)"),
        ("redbeat_redis_options", "[1]", "a JSON object"),
        ("redbeat_redis_use_ssl", "maybe", "one of true/false"),
    ],
)
def test_a_bad_redbeat_value_names_the_setting_with_secrets_masked(
    key, value, expected
):
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({f"celery.{key}": value})

    message = str(info.value)
    print(message)
    assert message.startswith(f"Invalid setting celery.{key} = ")
    assert f"expected {expected}" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("redbeat_lock_timout", "redbeat_lock_timeout"),
        ("redbeat_redis_uri", "redbeat_redis_url"),
        ("redbeat_keyprefix", "redbeat_key_prefix"),
        ("beat_max_interval", "beat_max_loop_interval"),
    ],
)
def test_a_misspelt_redbeat_setting_is_an_error_with_a_suggestion(typo, meant):
    with pytest.raises(ConfigurationError) as info:
        parse_celery_settings({f"celery.{typo}": "1"})
    assert str(info.value) == (
        f"Unknown setting celery.{typo}: did you mean celery.{meant}?"
    )


# -- check_beat_scheduler: RedBeat's defaults and checks ---------------------------


@pytest.mark.parametrize(
    "scheduler",
    [SCHEDULER, "redbeat.schedulers:RedBeatScheduler", "redbeat.schedulers.Sub"],
)
def test_redbeat_gets_a_short_loop_interval_and_options_of_its_own(scheduler):
    conf = {"beat_scheduler": scheduler, "redbeat_redis_url": URL}

    check_beat_scheduler(conf)

    assert conf == {
        "beat_scheduler": scheduler,
        "redbeat_redis_url": URL,
        "beat_max_loop_interval": REDBEAT_MAX_LOOP_INTERVAL,
        "redbeat_redis_options": {},
    }
    assert REDBEAT_MAX_LOOP_INTERVAL == 5


def test_settings_given_are_kept(redbeat):
    conf = {
        "beat_scheduler": redbeat.RedBeatScheduler,  # Python settings: a class
        "redbeat_redis_url": URL,
        "beat_max_loop_interval": 1.0,
        "redbeat_lock_timeout": 2,
        "redbeat_redis_options": {"retry_period": 10},
    }
    expected = dict(conf)

    check_beat_scheduler(conf)

    assert conf == expected


@pytest.mark.parametrize(
    ("url", "credentials"),
    [
        ("redis://:hunter2@redis.example:6379/1", {"password": "hunter2"}),
        (
            "rediss://beat:p%40ss:w@rd@redis.example:6380/1",
            {"username": "beat", "password": "p@ss:w@rd"},
        ),
        ("redis://beat@redis.example:6379/1", {"username": "beat"}),
    ],
)
def test_credentials_in_the_url_move_to_the_options(url, credentials):
    conf = {
        "beat_scheduler": SCHEDULER,
        "redbeat_redis_url": url,
        "redbeat_redis_options": {"password": "ignored", "socket_timeout": 5},
    }

    check_beat_scheduler(conf)

    scheme = url.partition(":")[0]
    host = "redis.example:6380" if scheme == "rediss" else "redis.example:6379"
    assert conf["redbeat_redis_url"] == f"{scheme}://{host}/1"
    assert conf["redbeat_redis_options"] == {
        "password": "ignored",
        "socket_timeout": 5,
        **credentials,
    }


def test_celery_report_masks_the_redbeat_password(tmp_path, capsys, celery_option):
    ini = tmp_path / "app.ini"
    ini.write_text(
        "[app:main]\n"
        "use = call:tests.pkgs.cli_app:main\n"
        "celery.broker_url = memory://\n"
        f"celery.beat_scheduler = {SCHEDULER}\n"
        "celery.redbeat_redis_url = redis://:hunter2@redis.example:6379/1\n"
    )

    with pytest.raises(SystemExit) as info:
        main([str(ini), "--", "report"])

    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "redbeat_redis_url: 'redis://redis.example:6379/1'" in out
    assert "'password': '********'" in out
    assert "hunter2" not in out


def test_the_queue_prefix_gives_each_site_its_own_redbeat_keys():
    conf = {"beat_scheduler": SCHEDULER, "redbeat_redis_url": URL}
    check_beat_scheduler(conf, queue_prefix="mysite")
    assert conf["redbeat_key_prefix"] == "mysite:redbeat:"

    conf = {
        "beat_scheduler": SCHEDULER,
        "redbeat_redis_url": URL,
        "redbeat_key_prefix": "own:",
    }
    check_beat_scheduler(conf, queue_prefix="mysite")
    assert conf["redbeat_key_prefix"] == "own:"


def test_a_lock_timeout_under_two_loop_intervals_is_refused():
    conf = {
        "beat_scheduler": SCHEDULER,
        "redbeat_redis_url": URL,
        "redbeat_lock_timeout": 9,
    }
    with pytest.raises(ConfigurationError) as info:
        check_beat_scheduler(conf)
    assert str(info.value) == (
        "Setting celery.redbeat_lock_timeout = 9 is shorter than twice "
        "celery.beat_max_loop_interval (5 s): the lock would expire between two "
        "ticks of the beat holding it, and a waiting beat would send the same "
        "entries too. Raise it, or leave it unset (5 x "
        "celery.beat_max_loop_interval)."
    )


def test_redbeat_needs_its_redis_url():
    with pytest.raises(ConfigurationError) as info:
        check_beat_scheduler({"beat_scheduler": SCHEDULER})
    assert str(info.value) == (
        f"Setting celery.beat_scheduler = {SCHEDULER} keeps the schedule and its "
        "lock in Redis: set celery.redbeat_redis_url too, for example "
        "redis://127.0.0.1:6379/0 (every beat of the site uses the same)."
    )


@pytest.mark.parametrize("scheduler", [None, "celery.beat:PersistentScheduler"])
def test_redbeat_settings_without_redbeat_are_an_error(scheduler):
    conf = {"redbeat_lock_timeout": 30, "redbeat_key_prefix": "x:"}
    if scheduler:
        conf["beat_scheduler"] = scheduler
    with pytest.raises(ConfigurationError) as info:
        check_beat_scheduler(conf)
    assert str(info.value) == (
        "Setting celery.redbeat_key_prefix is set, but celery.beat_scheduler is "
        "not RedBeat's: set celery.beat_scheduler = redbeat.RedBeatScheduler "
        "(or remove the celery.redbeat_* settings)."
    )


def test_other_schedulers_are_left_alone():
    conf = {"beat_scheduler": "celery.beat:PersistentScheduler"}
    check_beat_scheduler(conf)
    assert conf == {"beat_scheduler": "celery.beat:PersistentScheduler"}


def test_redbeat_not_installed_is_one_paragraph_at_start(tmp_path, monkeypatch, capsys):
    # None in sys.modules: Python's own mark of a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "redbeat", None)
    ini = tmp_path / "app.ini"
    ini.write_text(
        "[app:main]\n"
        "use = call:tests.pkgs.cli_app:main\n"
        "celery.broker_url = memory://\n"
        f"celery.beat_scheduler = {SCHEDULER}\n"
        f"celery.redbeat_redis_url = {URL}\n"
    )

    assert main([str(ini), "--", "beat"]) == 1

    out, err = capsys.readouterr()
    print(err)
    assert out == ""
    assert err == (
        f"tasks-celery: error: bad configuration in {ini}: Setting "
        f"celery.beat_scheduler = {SCHEDULER} names RedBeat, which is not "
        "installed: install the redbeat extra, pip install "
        "'pyramid_tasks[redbeat]' (it brings the celery-redbeat package), "
        "wherever this INI is loaded.\n"
    )


def doc_section():
    text = (ROOT / "docs" / "worker.rst").read_text()
    return text.split("Beat on several hosts\n")[1].split("\nThe loader and")[0]


def test_the_documented_ini_gives_the_documented_defaults(redbeat):
    """docs/worker.rst's INI block states the defaults: RedBeat without them
    (its URL and scheduler only) is the same."""
    block = doc_section().split(".. code-block:: ini\n")[1].split("\nor in")[0]
    lines = [line.strip() for line in block.splitlines()]
    settings = dict(
        (part.strip() for part in line.split("=", 1))
        for line in lines
        if line.startswith("celery.")
    )
    given = parse_celery_settings(settings)
    check_beat_scheduler(given)
    conf = parse_celery_settings({k: settings[k] for k in list(settings)[:2]})
    check_beat_scheduler(conf)
    app = Celery(set_as_current=False)
    app.conf.update(conf)

    scheduler = redbeat.RedBeatScheduler(app, lazy=True)

    assert conf["beat_max_loop_interval"] == given["beat_max_loop_interval"] == 5
    assert scheduler.lock_timeout == given["redbeat_lock_timeout"] == 25
    assert app.redbeat_conf.key_prefix == given["redbeat_key_prefix"]


def test_the_documented_error_is_the_one_given(monkeypatch):
    monkeypatch.setitem(sys.modules, "redbeat", None)
    with pytest.raises(ConfigurationError) as info:
        check_beat_scheduler({"beat_scheduler": SCHEDULER})
    assert f": {info.value}\n" in doc_section()


class Fortnightly(BaseSchedule):
    """A schedule class of an app's own: RedBeat's JSON has no place for it."""


def redbeat_app(schedule, **options):
    """The Celery app of an app with RedBeat and one ``add_periodic_task``."""
    settings = {
        "celery.broker_url": "memory://",
        "celery.beat_scheduler": SCHEDULER,
        "celery.redbeat_redis_url": URL,
    }
    with Configurator(settings=settings) as config:
        config.include("pyramid_tasks")
        config.scan("tests.pkgs.cli_app")
        config.add_periodic_task(schedule, cli_app.ping, name="entry", **options)
    return config.registry.celery_app


def test_entries_redbeat_can_store_are_taken():
    app = redbeat_app(
        crontab(minute=0, hour=3),
        args=(1, [2]),
        eta=datetime(2030, 1, 1, tzinfo=UTC),  # RedBeat's JSON has datetimes
    )
    assert app.conf.beat_schedule["entry"]["args"] == (1, [2])


@pytest.mark.parametrize(
    ("schedule", "options", "message"),
    [
        (
            60,
            {"expires": timedelta(hours=1)},
            "Beat entry 'entry' cannot be stored by RedBeat "
            "(celery.beat_scheduler): its options are not JSON (Object of type "
            "timedelta is not JSON serializable).",
        ),
        (
            60,
            {"args": ({1, 2},)},
            "Beat entry 'entry' cannot be stored by RedBeat "
            "(celery.beat_scheduler): its args are not JSON (Object of type set "
            "is not JSON serializable).",
        ),
        (
            Fortnightly(),
            {},
            "Beat entry 'entry' has a Fortnightly schedule, which RedBeat "
            "(celery.beat_scheduler) cannot store: use seconds, a timedelta or a "
            "crontab.",
        ),
    ],
)
def test_an_entry_redbeat_cannot_store_is_refused(schedule, options, message):
    # Beat itself would exit at start with RedBeat's TypeError.
    with pytest.raises(ConfigurationExecutionError) as info:
        redbeat_app(schedule, **options)
    assert str(info.value.evalue) == message


# -- our schedules through RedBeat's JSON ----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1",
        "2.5",
        "90s",
        "15m",
        "2h",
        "1d",
        "*/15 * * * *",
        "0 4 * * mon-fri",
        "30 2 1,15 jan,jul sun",
        'crontab(minute="*/15", hour="0-6", day_of_week="mon-fri")',
        "crontab(minute=5, hour=3)",
        "timedelta(minutes=30)",
        "timedelta(milliseconds=1500)",
    ],
)
def test_every_schedule_of_the_grammar_survives_redbeats_json(redbeat, text):
    schedule = maybe_schedule(parse_schedule(text))

    stored = json.dumps(schedule, cls=redbeat.RedBeatJSONEncoder)
    loaded = json.loads(stored, cls=redbeat.RedBeatJSONDecoder)

    # crontab compares its five expanded fields, an interval its run_every.
    assert type(loaded) is type(schedule)
    assert loaded == schedule


# -- two real beats ------------------------------------------------------------------

PASSWORD = "s3cret-beat"
MAX_LOOP_INTERVAL = 1
LOCK_TIMEOUT = 5
# Documented in docs/worker.rst: a waiting beat takes over within the lock
# timeout and one loop interval (it tries once per interval), plus a Redis
# command and its wake-up: SLACK, for a loaded machine (measured: 4.92-5.96 s).
TAKEOVER_BOUND = LOCK_TIMEOUT + MAX_LOOP_INTERVAL
SLACK = 0.5
WINDOW = 6.0
PREFIX = "site:redbeat:"

ENTRIES = {
    "tasks.beat.ping.task": "tests.pkgs.cli_app.ping",
    "tasks.beat.ping.schedule": "1",
    "tasks.beat.nightly.task": "tests.pkgs.cli_app.ping",
    "tasks.beat.nightly.schedule": (
        'crontab(minute="*/15", hour="0-6", day_of_week="mon-fri")'
    ),
    "tasks.beat.nightly.args": '[7, "x", [1, 2]]',
    "tasks.beat.nightly.kwargs": '{"dry_run": false, "when": null}',
    "tasks.beat.nightly.options": '{"queue": "maintenance", "priority": 5}',
    "tasks.beat.digest.task": "tests.pkgs.cli_app.ping",
    "tasks.beat.digest.schedule": "timedelta(minutes=30)",
}
LOGGING = """
[loggers]
keys = root, beat

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = INFO
handlers = console

[logger_beat]
level = DEBUG
handlers =
qualname = celery.beat

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s.%(msecs)03d %(levelname)s [%(name)s] %(message)s
datefmt = %Y-%m-%d %H:%M:%S
"""
LOG_TIME = "%Y-%m-%d %H:%M:%S.%f"


def beat_ini(path, url, queue, entries):
    settings = {
        "use": "call:tests.pkgs.cli_app:main",
        "celery.broker_url": url,
        "celery.task_default_queue": queue,
        "celery.broker_connection_retry_on_startup": "false",
        "celery.beat_scheduler": SCHEDULER,
        "celery.redbeat_redis_url": url,
        "celery.redbeat_key_prefix": PREFIX,
        "celery.beat_max_loop_interval": str(MAX_LOOP_INTERVAL),
        "celery.redbeat_lock_timeout": str(LOCK_TIMEOUT),
        **entries,
    }
    lines = ["[app:main]", *(f"{key} = {value}" for key, value in settings.items())]
    path.write_text("\n".join(lines) + "\n" + LOGGING)
    return path


class Beat:
    """A ``tasks-celery INI -- beat`` subprocess and its log."""

    def __init__(self, ini, log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [tasks_celery(), str(ini), "--", "beat"],
                cwd=ini.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def says(self, text):
        return text in self.log

    def sends(self, entry):
        return self.log.count(f"Sending due task {entry} ")

    def times(self, text):
        """The wall-clock times of the log lines saying ``text``."""
        lines = [line for line in self.log.splitlines() if text in line]
        stamps = [datetime.strptime(line[:23], LOG_TIME) for line in lines]
        return [stamp.timestamp() for stamp in stamps]


@pytest.fixture
def beat_redis(private_redis):
    """The URL, with a password, of a Redis of this test's own."""
    client = redis.Redis.from_url(private_redis)
    client.config_set("requirepass", PASSWORD)
    client.close()
    return private_redis.replace("redis://", f"redis://:{PASSWORD}@")


@pytest.fixture
def start_beat(tmp_path):
    beats = []

    def start(name, ini):
        beat = Beat(ini, tmp_path / f"{name}.log")
        beats.append(beat)
        return beat

    yield start
    for beat in beats:
        beat.process.kill()  # nothing, for one that has ended
        beat.process.wait()


def ping_count(client, queue):
    """Messages of the ``ping`` entry waiting on ``queue``: beat's sends."""
    bodies = [json.loads(item) for item in client.lrange(queue, 0, -1)]
    return sum(body["headers"]["task"] == "tests.pkgs.cli_app.ping" for body in bodies)


@pytest.mark.counts
def test_two_beats_send_once_and_the_survivor_takes_over(
    beat_redis, start_beat, tmp_path, redbeat
):
    queue = "beat_distributed"
    client = redis.Redis.from_url(beat_redis)
    # The first beat's INI has a "digest" entry the second's (a redeploy) lacks.
    first_ini = beat_ini(tmp_path / "first.ini", beat_redis, queue, ENTRIES)
    second = {k: v for k, v in ENTRIES.items() if not k.startswith("tasks.beat.digest")}
    second_ini = beat_ini(tmp_path / "second.ini", beat_redis, queue, second)

    first = start_beat("first", first_ini)
    wait_for(
        lambda: first.says("beat: Acquired lock"),
        message=f"the first beat's lock (its log: {first.log_path})",
    )
    lock_key = f"{PREFIX}:lock"
    lock_ttl = client.pttl(lock_key)
    print(f"lock {lock_key}: ttl {lock_ttl} ms")
    assert 0 < lock_ttl <= LOCK_TIMEOUT * 1000
    assert client.smembers(f"{PREFIX}:statics") == {b"ping", b"nightly", b"digest"}

    second_beat = start_beat("second", second_ini)
    # While it starts: each entry as RedBeat stores it and reads it back, our
    # schedule, args, kwargs and options unchanged.
    app = get_app(str(second_ini)).registry.celery_app
    for name, entry in app.conf.beat_schedule.items():
        stored = redbeat.RedBeatSchedulerEntry.from_key(f"{PREFIX}{name}", app=app)
        assert stored.schedule == maybe_schedule(entry["schedule"])
        assert tuple(stored.args or ()) == entry.get("args", ())
        assert stored.kwargs == entry.get("kwargs", {})
        assert stored.options == entry.get("options", {})
    app.redbeat_redis.close()
    wait_for(
        lambda: second_beat.says("beat: Acquiring lock..."),
        message=f"the second beat to wait (its log: {second_beat.log_path})",
    )
    # The second beat's start removed the entry its INI no longer has.
    assert client.smembers(f"{PREFIX}:statics") == {b"ping", b"nightly"}
    assert not client.exists(f"{PREFIX}digest")
    assert client.zscore(f"{PREFIX}:schedule", f"{PREFIX}digest") is None

    # The window: both beats run, one sends.
    start, began = ping_count(client, queue), time.monotonic()
    logged = first.sends("ping")
    wait_for(
        lambda: time.monotonic() - began >= WINDOW,
        timeout=WINDOW + 5,
        message="the end of the window",
    )
    elapsed = time.monotonic() - began
    sent = ping_count(client, queue) - start
    logged = first.sends("ping") - logged
    one_beat = round(elapsed)  # sends of one beat in the window, the entry is 1 s
    print(
        f"window {elapsed:.2f} s: {sent} sends of the 1 s entry (one beat: "
        f"{one_beat} +/- 1, two: {2 * one_beat}); the first beat logged "
        f"{logged}, the second {second_beat.sends('ping')}"
    )
    assert abs(sent - one_beat) <= 1
    assert second_beat.sends("ping") == 0
    assert not second_beat.says("Acquired lock")

    # SIGKILL the lock holder: its lock stays in Redis until it expires.
    killed_at = time.time()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    at_kill = ping_count(client, queue)
    # All sent by the first beat (which may die between logging a send and
    # making it).
    assert first.sends("ping") - at_kill in (0, 1)
    wait_for(
        lambda: second_beat.says("beat: Acquired lock"),
        timeout=TAKEOVER_BOUND + 10,
        message="the second beat to take the lock over",
    )
    [acquired] = second_beat.times("beat: Acquired lock")
    wait_for(
        lambda: second_beat.sends("ping") >= 2,
        timeout=5,
        message="the second beat's sends",
    )
    # Every message since is the second beat's (polled: it logs each send
    # just before making it).
    wait_for(
        lambda: ping_count(client, queue) == at_kill + second_beat.sends("ping"),
        timeout=5,
        message="the queue to hold the second beat's sends",
    )
    takeover = acquired - killed_at
    first_send = second_beat.times("Sending due task ping ")[0] - killed_at
    print(
        f"SIGKILL of the lock holder: {at_kill} sends by it; taken over after "
        f"{takeover:.2f} s (bound {TAKEOVER_BOUND} s = lock timeout "
        f"{LOCK_TIMEOUT} s + loop interval {MAX_LOOP_INTERVAL} s); the "
        f"survivor's first send after {first_send:.2f} s"
    )
    assert takeover < TAKEOVER_BOUND + SLACK
    assert takeover <= first_send < takeover + MAX_LOOP_INTERVAL

    # A warm stop releases the lock.
    second_beat.process.terminate()
    assert second_beat.process.wait(timeout=10) == 0
    assert not client.exists(lock_key)
    assert first.sends("digest") == second_beat.sends("digest") == 0
    logs = first.log + second_beat.log
    assert PASSWORD not in logs
    # RedBeat's banner: the password moved to redbeat_redis_options.
    assert f"redis -> redis://127.0.0.1:{beat_redis.rsplit(':', 1)[1]}" in logs
    client.close()
