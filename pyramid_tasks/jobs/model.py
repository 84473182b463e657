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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

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


def utcnow():
    return datetime.now(UTC)


class _KombuJSON(TypeDecorator):
    """JSON holding what Celery's JSON serializer holds: datetimes, UUIDs and
    decimals are stored with kombu's type markers and come back as they were."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return json.loads(kombu_json.dumps(value))

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return kombu_json.loads(json.dumps(value))


class _Base(DeclarativeBase):
    metadata = metadata


# Rows without a key (most) take no entry of the unique index.
_unfinished = text(
    "unique_key IS NOT NULL AND "
    "state IN ('pending', 'queued', 'scheduled', 'started', 'retrying')"
)


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
    args: Mapped[list | None] = mapped_column(_KombuJSON)
    kwargs: Mapped[dict | None] = mapped_column(_KombuJSON)
    # The message options the relay publishes it with again (countdown, eta,
    # expires, link...), as apply_async was given them.
    options: Mapped[dict | None] = mapped_column(_KombuJSON)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)
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

    __table_args__ = (
        Index("ix_pyramid_tasks_job_state_created", "state", "created_at"),
        Index("ix_pyramid_tasks_job_queue_state", "queue", "state"),
        Index("ix_pyramid_tasks_job_name_state", "name", "state"),
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
