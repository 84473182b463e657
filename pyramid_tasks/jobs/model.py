"""The job table, ``pyramid_tasks_job``, on a ``MetaData`` of its own.

List :data:`metadata` in an Alembic ``env.py``'s ``target_metadata`` next to
the app's own, or create the table with ``tasks-celery CONFIG jobs init-db``.
"""

import json
from datetime import UTC, datetime

from kombu.utils import json as kombu_json
from sqlalchemy import (
    JSON,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "FINISHED",
    "RUNNABLE",
    "STATES",
    "UNFINISHED",
    "Job",
    "metadata",
]

PENDING = "pending"  # committed, not yet confirmed at the broker
QUEUED = "queued"  # at the broker
SCHEDULED = "scheduled"  # at the broker, its eta in the future
STARTED = "started"
RETRYING = "retrying"  # Celery retry(): sent again, waiting
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
DEAD = "dead"  # the relay gave up publishing it

STATES = (
    PENDING,
    QUEUED,
    SCHEDULED,
    STARTED,
    RETRYING,
    SUCCEEDED,
    FAILED,
    CANCELLED,
    DEAD,
)
UNFINISHED = (PENDING, QUEUED, SCHEDULED, STARTED, RETRYING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED, DEAD)
# A delivered message runs unless its job already took effect or was cancelled.
RUNNABLE = (*UNFINISHED, FAILED, DEAD)

metadata = MetaData()

# The header of a job's options recording its last retry, ``{"at": ISO
# time, "by": "operator" or "task"}``: an operator's retry (the service's)
# or Celery's ``retry()`` in its run.  No column keeps it; the dashboard's
# timeline shows it.  Sent with the job's later messages, where nothing
# reads it.
RETRY_HEADER = "pyramid_tasks_last_retry"


def retry_mark(options, by, now=None):
    """``options`` (a row's, or None) with :data:`RETRY_HEADER` saying a
    retry by ``by`` happened ``now``."""
    options = dict(options or {})
    at = (now or utcnow()).isoformat(timespec="microseconds")
    options["headers"] = {
        **(options.get("headers") or {}),
        RETRY_HEADER: {"at": at, "by": by},
    }
    return options


def utcnow():
    return datetime.now(UTC)


# The columns are plain JSON and timestamps, so an Alembic revision of the
# table needs nothing of this package.  The store converts on the way:

_JSON_COLUMNS = ("args", "kwargs", "options", "workspace")
_TIME_COLUMNS = (
    "created_at",
    "eta",
    "publish_after",
    "published_at",
    "started_at",
    "heartbeat_at",
    "finished_at",
)


def stored(row):
    """``row`` (a dict) as the table keeps it: JSON holding what Celery's
    JSON serializer holds (datetimes, UUIDs, decimals with kombu's type
    markers).  Raises ``TypeError`` for what JSON cannot hold."""
    return {
        key: _as_json(value) if key in _JSON_COLUMNS and value is not None else value
        for key, value in row.items()
    }


def _as_json(value):
    """``value`` after kombu's JSON and back: a copy where that is all it
    would do (plain text, numbers, lists and dicts of them: most task
    arguments), else the round trip itself."""
    copy = _plain_copy(value)
    if copy is _NOT_PLAIN:
        return json.loads(kombu_json.dumps(value))
    return copy


_NOT_PLAIN = object()
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain_copy(value, depth=0):
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth > 20:  # JSON's own recursion limit is far; deep is rare
        return _NOT_PLAIN
    if kind is list or kind is tuple:
        if all(type(item) in _SCALARS for item in value):  # flat: most arguments
            return list(value)
        copy = [_plain_copy(item, depth + 1) for item in value]
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in copy) else copy
    if kind is dict:
        if all(
            type(key) is str and type(item) in _SCALARS for key, item in value.items()
        ):
            return dict(value)
        copy = {}
        for key, item in value.items():
            if type(key) is not str:
                return _NOT_PLAIN
            item = copy[key] = _plain_copy(item, depth + 1)
            if item is _NOT_PLAIN:
                return _NOT_PLAIN
        return copy
    return _NOT_PLAIN


def loaded(row):
    """A row of the table as a dict: the JSON columns decoded as Celery
    would, the times aware, in UTC (SQLite gives them back naive)."""
    row = dict(row)
    for key in _JSON_COLUMNS:
        if row.get(key) is not None:
            row[key] = kombu_json.loads(json.dumps(row[key]))
    for key in _TIME_COLUMNS:
        value = row.get(key)
        if value is not None and value.tzinfo is None:
            row[key] = value.replace(tzinfo=UTC)
    return row


class _Base(DeclarativeBase):
    metadata = metadata


# Rows without a key (most) take no entry of the unique index.
_unfinished = text(
    "unique_key IS NOT NULL AND "
    "state IN ('pending', 'queued', 'scheduled', 'started', 'retrying')"
)

_finished = text("finished_at IS NOT NULL")
_has_parent = text("parent_id IS NOT NULL")


_has_error = text("error IS NOT NULL")


class Job(_Base):
    """One task sent by the app: its arguments, state and outcome.

    ``id`` is the Celery task id.  Every state change is one UPDATE naming the
    state it expects to find.
    """

    __tablename__ = "pyramid_tasks_job"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    title: Mapped[str | None] = mapped_column(String(255))
    queue: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int | None] = mapped_column(Integer)
    args: Mapped[list | None] = mapped_column(JSON)
    kwargs: Mapped[dict | None] = mapped_column(JSON)
    # The message options the relay publishes it with again (countdown, eta,
    # expires, link...), as apply_async was given them.
    options: Mapped[dict | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times a worker died running it (its lease expired): failed at the limit.
    lost: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    eta: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    publish_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[int | None] = mapped_column(Integer)
    progress_message: Mapped[str | None] = mapped_column(Text)
    unique_key: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[str | None] = mapped_column(String(255))
    # apply_async(workspace={...}): a JSON object the job's runs read and
    # update (self.workspace), and the list filters on.  SQL NULL without
    # one; JSONB on PostgreSQL, for its containment index.
    workspace: Mapped[dict | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )

    __table_args__ = (
        # Each index serves the operators' questions (docs/dashboard.rst
        # shows the plans): the list newest first, per state ...
        Index("ix_pyramid_tasks_job_state_created", "state", "created_at"),
        # ... of one queue or one task name (and, by their prefix, the
        # capped counts per queue and state, and the relay's and depth's
        # reads of one queue).
        Index(
            "ix_pyramid_tasks_job_queue_state_created", "queue", "state", "created_at"
        ),
        Index("ix_pyramid_tasks_job_name_state_created", "name", "state", "created_at"),
        # The list's error filter: per state, newest first, the jobs that
        # have an error (a few percent of them), so the text is searched
        # among those only.
        Index(
            "ix_pyramid_tasks_job_error_state_created",
            "state",
            "created_at",
            postgresql_where=_has_error,
            sqlite_where=_has_error,
        ),
        # The overview's throughput, failure rate and durations
        # (dashboard/stats.py): the jobs finished in a range of time, per
        # bucket, name and state, read from the index alone; and the newest
        # jobs of the window (read backwards).  Partial: an unfinished job
        # takes no entry, so it costs a write only when a job finishes.
        Index(
            "ix_pyramid_tasks_job_finished",
            "finished_at",
            "state",
            "name",
            postgresql_where=_finished,
            sqlite_where=_finished,
        ),
        # The children of a job (chain steps, jobs sent from its run), newest
        # first: the job page's list and its capped count, and the list's
        # ``parent`` filter, a branch per state as the others.  Only rows
        # with a parent take an entry (most jobs have none).
        Index(
            "ix_pyramid_tasks_job_parent_state_created",
            "parent_id",
            "state",
            "created_at",
            postgresql_where=_has_parent,
            sqlite_where=_has_parent,
        ),
        # The list's workspace filter (``workspace @> '{"user_id": 42}'``):
        # PostgreSQL's GIN index of the JSONB paths, of the jobs that have a
        # workspace.  SQLite has no such index: there the filter reads the
        # rows (docs/jobs.rst).
        Index(
            "ix_pyramid_tasks_job_workspace",  # in _POSTGRESQL_ONLY
            "workspace",
            postgresql_using="gin",
            postgresql_ops={"workspace": "jsonb_path_ops"},
            postgresql_where=text("workspace IS NOT NULL"),
        ).ddl_if(dialect="postgresql"),
        Index(
            "ix_pyramid_tasks_job_unique_key",
            "unique_key",
            unique=True,
            postgresql_where=_unfinished,
            sqlite_where=_unfinished,
        ),
    )

    def __repr__(self):
        return f"<Job {self.name}[{self.id}] {self.state}>"


# The indexes made on PostgreSQL only (their ddl_if).
_POSTGRESQL_ONLY = ("ix_pyramid_tasks_job_workspace",)


def table_indexes(dialect):
    """The job table's indexes made on a database of ``dialect`` (a name)."""
    return [
        index
        for index in Job.__table__.indexes
        if dialect == "postgresql" or index.name not in _POSTGRESQL_ONLY
    ]
