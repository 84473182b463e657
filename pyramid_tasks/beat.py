"""Beat: a stop that cannot hang, and RedBeat's checks and defaults.

``tasks-celery ... beat`` runs :class:`Beat`, Celery's own but for its
SIGTERM and SIGINT handler (see there).


RedBeat (``celery-redbeat``, the ``redbeat`` extra) keeps the schedule in
Redis and lets one beat at a time run it, under a lock in Redis with a
timeout: the beat holding it extends it at each tick, the others wait to
acquire it.  A lock holder killed without a chance to release it blocks the
others until the timeout, which RedBeat makes 5 x ``beat_max_loop_interval``:
25 minutes with Celery's default of 300 s.  Here the default interval is 5 s
when RedBeat is the scheduler, so a waiting beat takes over within 30 s.
"""

import importlib.util
import json
import signal
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit

from celery import platforms
from celery.apps.beat import Beat as CeleryBeat
from celery.schedules import crontab, schedule
from pyramid.exceptions import ConfigurationError

from .settings import REDBEAT_OPTIONS

__all__ = [
    "REDBEAT_MAX_LOOP_INTERVAL",
    "Beat",
    "check_beat_scheduler",
    "check_redbeat_entries",
]

# Seconds between two ticks at most when RedBeat is the scheduler and
# celery.beat_max_loop_interval is not set: each tick extends the lock, and
# a waiting beat tries to acquire it this often.
REDBEAT_MAX_LOOP_INTERVAL = 5.0
# RedBeat's own rule for the lock's timeout when redbeat_lock_timeout is not
# set (redbeat/schedulers.py, RedBeatScheduler.__init__).
_LOCK_FACTOR = 5
# The lock must outlive a tick comfortably: the holder extends it at each tick,
# so a lock shorter than the gap between two ticks expires under a live beat
# and a waiting one starts too (both send).
_LOCK_MARGIN = 2


# The broker clients' modules: a signal that lands in their code may find a
# connection in the middle of a frame or of a reply.
_BROKER_CLIENTS = ("amqp.", "kombu.", "redis.")


class Beat(CeleryBeat):
    """Celery's ``beat``, whose SIGTERM and SIGINT cannot hang it.

    Celery's handler saves the schedule and closes the broker connection
    inside the signal handler, on the connection the interrupted code may be
    using: a publish waiting for its confirm from RabbitMQ is cut in the
    middle of reading a frame, and the close then waits for ever on a stream
    it reads out of step (measured: 2 of 30 beats sending an entry every
    5 ms never exited after SIGTERM); on Redis the close can wait for a lock
    of redis-py's that the interrupted code holds.  Here the handler does no
    I/O and takes no lock: if it interrupted a broker client, it drops the
    scheduler's connection, untouched (the process is ending: its socket
    goes with it); then it raises ``SystemExit``, and the beat loop's own
    ``finally`` saves the schedule and closes what is left, as Celery's does.

    A signal that lands in a finalizer (``__del__``: a sent task's result
    object collected, which talks to a Redis result backend) cannot stop
    anything there, as Python ignores what a finalizer raises: Celery's beat
    then runs on for ever (measured: 2 of 28 beats on Redis).  Here the
    handler asks the loop to end at its next turn, and raises
    ``SystemExit`` again 50 ms later, from a timer (``SIGALRM``), outside
    the finalizer.
    """

    def install_sync_handler(self, service):
        def stop(signum, frame):
            service._is_shutdown.set()  # the loop ends at its next turn
            if _in_broker_client(frame):
                scheduler = service.__dict__.get("scheduler")
                if scheduler is not None:
                    scheduler.__dict__.pop("producer", None)
                    scheduler.__dict__.pop("connection", None)
            if _in_finalizer(frame):
                signal.signal(signal.SIGALRM, stop)
                signal.setitimer(signal.ITIMER_REAL, _AGAIN)
                return
            raise SystemExit()

        platforms.signals.update(SIGTERM=stop, SIGINT=stop)


# Seconds before a stop that landed in a finalizer raises again.
_AGAIN = 0.05


def _in_finalizer(frame):
    """Whether ``frame`` or a frame that called it is a ``__del__``."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _in_broker_client(frame):
    """Whether ``frame`` or a frame that called it runs a broker client."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_BROKER_CLIENTS):
            return True
        frame = frame.f_back
    return False


def _is_redbeat(scheduler):
    """Whether the ``beat_scheduler`` setting names a class of RedBeat."""
    if isinstance(scheduler, str):
        module = scheduler.strip()
    else:
        module = getattr(scheduler, "__module__", "")
    return module.replace(":", ".").split(".")[0] == "redbeat"


def check_beat_scheduler(conf, queue_prefix="", prefix="celery."):
    """Check and complete ``conf`` (the parsed ``celery.*`` settings) for RedBeat.

    With ``celery.beat_scheduler = redbeat.RedBeatScheduler``: RedBeat must be
    installed and ``celery.redbeat_redis_url`` set;
    ``celery.beat_max_loop_interval`` defaults to 5 s, and
    ``celery.redbeat_lock_timeout``, if set, must be at least twice that.
    ``celery.redbeat_redis_options`` defaults to ``{}`` (else RedBeat reads
    the broker's transport options), ``celery.redbeat_key_prefix`` to
    ``<queue_prefix>:redbeat:`` when ``tasks.queue_prefix`` is set (sites
    sharing a Redis must not share a lock and a schedule).  A user and
    password in the URL move to ``redbeat_redis_options``, where Celery's
    ``report`` and ``inspect conf`` mask them: they show the URL as it is.
    ``celery.redbeat_*`` settings without RedBeat as the scheduler are an
    error.
    """
    scheduler = conf.get("beat_scheduler")
    if not _is_redbeat(scheduler):
        keys = sorted(name for name in conf if name in REDBEAT_OPTIONS)
        if keys:
            raise ConfigurationError(
                f"Setting {prefix}{keys[0]} is set, but {prefix}beat_scheduler "
                f"is not RedBeat's: set {prefix}beat_scheduler = "
                f"redbeat.RedBeatScheduler (or remove the {prefix}redbeat_* "
                "settings)."
            )
        return
    setting = f"{prefix}beat_scheduler = {scheduler}"
    if importlib.util.find_spec("redbeat") is None:
        raise ConfigurationError(
            f"Setting {setting} names RedBeat, which is not installed: install "
            "the redbeat extra, pip install 'pyramid_tasks[redbeat]' (it brings "
            "the celery-redbeat package), wherever this INI is loaded."
        )
    if not conf.get("redbeat_redis_url"):
        raise ConfigurationError(
            f"Setting {setting} keeps the schedule and its lock in Redis: set "
            f"{prefix}redbeat_redis_url too, for example "
            "redis://127.0.0.1:6379/0 (every beat of the site uses the same)."
        )
    conf.setdefault("redbeat_redis_options", {})
    if queue_prefix:
        conf.setdefault("redbeat_key_prefix", f"{queue_prefix}:redbeat:")
    _credentials_to_options(conf)
    interval = conf.get("beat_max_loop_interval") or REDBEAT_MAX_LOOP_INTERVAL
    conf["beat_max_loop_interval"] = interval
    timeout = conf.get("redbeat_lock_timeout")
    if timeout is not None and timeout < _LOCK_MARGIN * interval:
        raise ConfigurationError(
            f"Setting {prefix}redbeat_lock_timeout = {timeout} is shorter than "
            f"twice {prefix}beat_max_loop_interval ({interval:g} s): the lock "
            "would expire between two ticks of the beat holding it, and a "
            "waiting beat would send the same entries too. Raise it, or leave "
            f"it unset ({_LOCK_FACTOR} x {prefix}beat_max_loop_interval)."
        )


def _credentials_to_options(conf):
    """``redis://user:pw@host/0`` -> ``redis://host/0`` and the options
    ``username`` and ``password``, which redis-py and RedBeat's Sentinel
    client take as the URL's (the URL's win over options given as well)."""
    parts = urlsplit(conf["redbeat_redis_url"])
    if parts.username is None and parts.password is None:
        return
    credentials = {"username": parts.username, "password": parts.password}
    conf["redbeat_redis_options"] = {
        **conf["redbeat_redis_options"],
        **{name: unquote(value) for name, value in credentials.items() if value},
    }
    host = parts.netloc.rpartition("@")[2]
    conf["redbeat_redis_url"] = parts._replace(netloc=host).geturl()


# What RedBeat's JSON encoder stores (redbeat/decoder.py): numbers and
# timedeltas become Celery's ``schedule`` first; its own rrule is one too.
_STORED_SCHEDULES = (int, float, timedelta, schedule, crontab)


def check_redbeat_entries(conf):
    """Every beat entry of the Celery app's ``conf`` as RedBeat can store it.

    RedBeat keeps each entry as JSON: a beat started with an entry it cannot
    encode (``add_periodic_task(..., expires=timedelta(hours=1))``, a
    ``solar`` schedule) exits with a ``TypeError``.  Here that is a
    :class:`ConfigurationError` naming the entry, when the app is built.
    """
    if not _is_redbeat(conf.beat_scheduler):
        return
    for name, entry in conf.beat_schedule.items():
        kind = type(entry["schedule"]).__name__
        if not isinstance(entry["schedule"], _STORED_SCHEDULES):
            raise ConfigurationError(
                f"Beat entry {name!r} has a {kind} schedule, which RedBeat "
                "(celery.beat_scheduler) cannot store: use seconds, a "
                "timedelta or a crontab."
            )
        for field in ("args", "kwargs", "options"):
            try:
                json.dumps(entry.get(field), default=_datetime)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    f"Beat entry {name!r} cannot be stored by RedBeat "
                    f"(celery.beat_scheduler): its {field} are not JSON ({exc})."
                ) from exc


def _datetime(value):
    """The one type RedBeat's encoder adds to JSON's."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
