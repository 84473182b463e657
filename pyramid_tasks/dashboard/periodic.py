"""The periodic tasks page: the beat schedule of the INI (``tasks.beat.*``)
beside what the job table knows of each entry's task.

The last run is the newest job of the entry's task (whoever sent it: beat,
"run now" or the app), read as the list reads, one index range per state;
the next run is the schedule's next due time after it, as beat computes it
(beat's own state file is not read).
"""

import transaction
from celery.schedules import crontab, maybe_schedule

from ..jobs.model import utcnow
from ..jobs.service import BROKER_TIMEOUT, JobError
from .render import parse_time

__all__ = ["describe", "periodic_entries", "run_now"]


def describe(schedule):
    """A schedule in words: ``every 10.00 seconds``, ``cron */5 9-17 * * *``."""
    if isinstance(schedule, crontab):
        fields = (
            schedule._orig_minute,
            schedule._orig_hour,
            schedule._orig_day_of_month,
            schedule._orig_month_of_year,
            schedule._orig_day_of_week,
        )
        return "cron " + " ".join(str(field) for field in fields)
    return f"every {schedule.human_seconds}"


def periodic_entries(service):
    """Per beat entry, by name: ``{"name", "task", "schedule", "last",
    "next"}``: ``last`` the newest job of its task (``id``, ``state``,
    ``created_at``, ``finished_at``) or None; ``next`` when it is due
    next (an aware datetime; for an interval never run, None: beat runs it
    one interval after it starts)."""
    app = service.app
    entries = []
    for name, entry in sorted(app.conf.beat_schedule.items()):
        schedule = maybe_schedule(entry["schedule"], app=app)
        found = service.list(
            name=entry["task"],
            limit=1,
            fields=("state", "created_at", "finished_at"),
        )
        last = found[0] if found else None
        following = None
        if last is not None:
            following = utcnow() + schedule.remaining_estimate(
                parse_time(last["created_at"])
            )
        elif isinstance(schedule, crontab):  # its next time, whenever beat began
            following = utcnow() + schedule.remaining_estimate(utcnow())
        entries.append(
            {
                "name": name,
                "task": entry["task"],
                "schedule": describe(schedule),
                "last": last,
                "next": following,
            }
        )
    return entries


class UnknownEntry(JobError):
    """No beat entry has the name ``name``."""

    def __init__(self, name):
        super().__init__(f"no periodic task is named {name!r}")
        self.name = name


def run_now(service, name):
    """Send the beat entry ``name`` now, as beat would (its task, args,
    kwargs and options), with a job row like any job: its id."""
    app = service.app
    entry = app.conf.beat_schedule.get(name)
    if entry is None:
        raise UnknownEntry(name)
    task = app.tasks[entry["task"]]
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        job_id = task.apply_async(
            tuple(entry.get("args", ())),
            dict(entry.get("kwargs", {})),
            tm=tm,
            **dict(entry.get("options", {})),
        ).id
    service.jobs.flush(BROKER_TIMEOUT)
    return job_id
