"""The job service: what operators do to the job table, for every skin.

The ``jobs`` command line, the JSON API and the dashboard call this one
service and only format what it returns::

    from pyramid_tasks.jobs.service import JobService

    service = JobService.from_registry(request.registry)
    service.list(state="failed", limit=20)

Every method validates all its input before it changes anything: a bad
state name, limit, duration or queue is :class:`BadParameter`, an id that
names no job :class:`UnknownJob` (both :class:`JobError`, a ``ValueError``
whose message is one line naming the bad thing).

The queries keep to the table's indexes, ``(state, created_at)``,
``(queue, state, created_at)``, ``(name, state, created_at)`` and
``(state, created_at)`` of the jobs with an error: lists are keyset-paged
(never OFFSET), counts are only ever of waiting jobs of one queue, text
searches stop after :attr:`JobService.search_depth` jobs, and nothing counts
or scans the whole table, which stays cheap at millions of rows.
"""

import json
import logging
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import transaction
from celery.worker import state as worker_state
from celery.worker.control import control_command
from pyramid.exceptions import ConfigurationError
from sqlalchemy import (
    and_,
    delete,
    func,
    literal,
    select,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from ..publish import publish
from ..settings import parse_duration
from . import log as joblog
from .model import (
    CANCELLED,
    DEAD,
    FAILED,
    FINISHED,
    PENDING,
    QUEUED,
    RETRYING,
    SCHEDULED,
    STATES,
    UNFINISHED,
    Job,
    loaded,
    retry_mark,
    stored,
    utcnow,
)
from .relay import Relay
from .revoked import RETRIED_HEADER
from .store import explain_missing_table, one_line
from .workflow import WORKFLOW_TASK

__all__ = [
    "JOB_KEYS",
    "TEST_TASK",
    "BadParameter",
    "JobError",
    "JobService",
    "UnknownJob",
    "job_json",
]

log = logging.getLogger(__name__)

_table = Job.__table__
_c = _table.c

#: The keys of :func:`job_json`, in its order: every column of the table.
JOB_KEYS = tuple(column.name for column in _table.columns)

#: The name of the package's own test task (:meth:`JobService.test`).
TEST_TASK = "pyramid_tasks.jobs.test"

#: Waiting to run: the states ``clear`` cancels and ``depth`` counts.
WAITING = (PENDING, QUEUED)
#: Waiting for a time (an eta, a retry's countdown): ``depth``'s ``scheduled``.
DELAYED = (SCHEDULED, RETRYING)
#: The states ``retry`` takes.
RETRYABLE = (FAILED, CANCELLED, DEAD)

# Seconds the broker has to answer ``depth``, ``clear`` and revokes.
BROKER_TIMEOUT = 2.0


class JobError(ValueError):
    """A request the service refused; nothing was changed.  Its message is
    one line naming the bad thing."""


class UnknownJob(JobError):
    """No job has the id ``job_id``."""

    def __init__(self, job_id):
        super().__init__(f"no job has the id {job_id!r}")
        self.job_id = job_id


class BadParameter(JobError):
    """The parameter ``name`` (``"state"``, ``"queue"``, ``"limit"``,
    ``"before"``, ``"older_than"``, ``"id"``...) has a bad ``value``."""

    def __init__(self, name, value, message):
        super().__init__(message)
        self.name = name
        self.value = value


def _iso(value):
    if value.tzinfo is None:  # SQLite gives times back naive, in UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def job_json(row):
    """The stable JSON form of a job row (a mapping of its columns, as the
    table or :meth:`JobStore.get` gives it): every column of
    ``pyramid_tasks_job`` in :data:`JOB_KEYS` order, times as ISO 8601 UTC
    strings with microseconds or None, ``args``, ``kwargs`` and ``options``
    as the JSON the table keeps (datetimes and the like in kombu's type
    markers)."""
    row = dict(row)
    result = {}
    for key in JOB_KEYS:
        value = row.get(key)
        if isinstance(value, datetime):
            value = _iso(value)
        result[key] = value
    return stored({k: result[k] for k in JOB_KEYS})


def test_job(self):
    """The package's own test task (``jobs test``): logs one INFO line."""
    log.info(
        "Test job %s ran on %s (queue %s).",
        self.request.id,
        self.request.hostname,
        (self.request.delivery_info or {}).get("routing_key"),
    )
    return self.request.id


@control_command(
    args=[("task_ids", list)],
    signature="<task_id> [<task_id> ...]",
)
def pyramid_tasks_unrevoke(state, task_ids, **kwargs):
    """Worker remote control: forget earlier revokes of ``task_ids`` (a
    cancelled job retried under its id would be dropped as revoked)."""
    for task_id in task_ids:
        worker_state.revoked.discard(task_id)
    return {"ok": f"{len(task_ids)} forgotten"}


class JobService:
    """The operators' operations on one app's job table."""

    #: Rows one DELETE (``prune``) or UPDATE (``clear``) takes at most.
    batch_size = 1000
    #: Largest ``limit`` of :meth:`list`.
    max_limit = 1000
    #: The jobs :meth:`list_page` searches at most for its text and
    #: finished-time filters (the newest that its other filters select).
    search_depth = 10000

    def __init__(self, jobs, app):
        self.jobs = jobs
        self.store = jobs.store
        self.app = app

    @classmethod
    def from_registry(cls, registry):
        """The service of the app whose registry includes ``pyramid_tasks.jobs``."""
        return cls(registry.pyramid_tasks_jobs, registry.celery_app)

    def _connect(self):
        return explain_missing_table(self.store.engine)

    # -- validation ----------------------------------------------------------

    @staticmethod
    def _strings(name, value):
        if value is None:
            return None
        values = [value] if isinstance(value, str) else list(value)
        for item in values:
            if not isinstance(item, str) or not item:
                raise BadParameter(name, item, f"bad {name} {item!r}: not a name")
        return values

    def _states(self, value, allowed=STATES, what="state"):
        if value is not None:  # "failed,dead" is two
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            value = [
                part
                for item in items
                for part in (
                    [p.strip() for p in item.split(",")]
                    if isinstance(item, str)
                    else [item]
                )
            ]
        states = self._strings("state", value)
        for state in states or ():
            if state not in allowed:
                raise BadParameter(
                    "state",
                    state,
                    f"unknown {what} {state!r}: expected one of {', '.join(allowed)}",
                )
        return states

    def configured_queues(self):
        """The queues the app's configuration names: its default queue,
        ``celery.task_queues``, the queues of tasks declared with ``queue=``
        and those of its routes given as mappings (a router function's
        cannot be known before it runs)."""
        conf = self.app.conf
        queues = [conf.task_default_queue]
        queues += [queue.name for queue in conf.task_queues or ()]
        queues += [
            route["queue"] for route in self.app.pyramid_task_queues.queues.values()
        ]
        naming = self.app.pyramid_registry.pyramid_tasks_settings.queue_name
        for router in conf.task_routes or ():
            queues += _route_queues(router, naming)
        return list(dict.fromkeys(q for q in queues if isinstance(q, str) and q))

    def table_queues(self, connection):
        """The queues present in the table, ascending: one index probe a
        queue (a loose scan of ``(queue, state, created_at)``, in one
        recursive statement), never ``DISTINCT``."""
        found = select(func.min(_c.queue).label("queue")).cte("queues", recursive=True)
        previous = found.alias("previous")
        following = (
            select(func.min(_c.queue)).where(_c.queue > previous.c.queue)
        ).scalar_subquery()
        found = found.union_all(select(following).where(previous.c.queue.is_not(None)))
        query = select(found.c.queue).where(found.c.queue.is_not(None))
        return sorted(connection.execute(query).scalars())

    def _queues(self, connection, value):
        """``value`` (a name or names) checked: a queue is known when the
        app's configuration names it (:meth:`configured_queues`) or a job of
        the table has it.  ``tasks.queue_prefix`` is added when missing."""
        queues = self._strings("queue", value)
        if queues is None:
            return None
        configured = set(self.configured_queues())
        naming = self.app.pyramid_registry.pyramid_tasks_settings.queue_name
        checked = []
        for queue in queues:
            for name in dict.fromkeys((queue, naming(queue))):
                if (
                    name in configured
                    or connection.execute(
                        select(_c.id).where(_c.queue == name).limit(1)
                    ).first()
                ):
                    checked.append(name)
                    break
            else:
                raise BadParameter(
                    "queue",
                    queue,
                    f"unknown queue {queue!r}: not configured and no job has it",
                )
        return list(dict.fromkeys(checked))

    def check_queues(self, queues):
        """``queues`` (a name or names, or None) checked as :meth:`list`
        checks its ``queue``: the names, prefixed where needed, or None."""
        with self._connect(), self.store.engine.connect() as connection:
            return self._queues(connection, queues)

    def _rows(self, connection, ids):
        """``{id: row}`` of ``ids``, every one there, else UnknownJob."""
        ids = self._strings("id", ids)
        if not ids:
            raise BadParameter("id", ids, "no job id given")
        rows = {}
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            for row in connection.execute(select(_table).where(_c.id.in_(chunk))):
                rows[row.id] = loaded(row._asdict())
        for job_id in ids:
            if job_id not in rows:
                raise UnknownJob(job_id)
        return {job_id: rows[job_id] for job_id in ids}

    @staticmethod
    def _check_key_free(connection, job_id, key):
        """BadParameter when another unfinished job holds ``key``, the
        ``unique_key`` of ``job_id`` (the partial unique index would refuse
        ``job_id`` back among the unfinished).  A holder that commits after
        this read makes the UPDATE fail on the index instead: the whole
        retry rolls back, nothing changed either way."""
        if key is None:
            return
        holder = connection.execute(
            select(_c.id).where(
                _c.unique_key == key, _c.state.in_(UNFINISHED), _c.id != job_id
            )
        ).scalar()
        if holder is not None:
            raise BadParameter(
                "id",
                job_id,
                f"job {job_id} has the unique_key {key!r}, which the unfinished "
                f"job {holder} holds: retry it once that one is finished",
            )

    @staticmethod
    def duration(name, value, default):
        """Seconds from ``value`` (seconds, a ``timedelta``, or text such as
        ``90``, ``30s``, ``15m``, ``12h``, ``7d``), ``default`` for None;
        BadParameter ``name``."""
        if value is None:
            return default
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value >= 0:
                return float(value)
        else:
            try:
                return parse_duration(name, value)
            except ConfigurationError:
                pass
        raise BadParameter(
            name,
            value,
            f"bad {name} {value!r}: expected a duration such as 90, 30s, 15m, 12h, 7d",
        )

    # -- reading -------------------------------------------------------------

    def list(
        self,
        state=None,
        queue=None,
        name=None,
        title=None,
        before=None,
        limit=50,
        fields=None,
        **filters,
    ):
        """Jobs newest first (``created_at``, then ``id``, descending), as
        :func:`job_json` dicts: the ``"jobs"`` of :meth:`list_page`, which
        takes the same arguments (``filters``: its ``error``,
        ``created_after``... )."""
        return self.list_page(
            state, queue, name, title, before, limit, fields, **filters
        )["jobs"]

    def list_page(
        self,
        state=None,
        queue=None,
        name=None,
        title=None,
        before=None,
        limit=50,
        fields=None,
        *,
        error=None,
        created_after=None,
        created_before=None,
        finished_after=None,
        finished_before=None,
        parent=None,
        workspace=None,
    ):
        """A page of jobs newest first (``created_at``, then ``id``,
        descending): ``{"jobs": [...], "searched": id or None,
        "searched_at": ISO time or None}``, the jobs as :func:`job_json`
        dicts.

        ``state``, ``queue``, ``name``: a string or a list of strings (states
        also as one string, comma-separated: ``"failed,dead"``);
        ``title``, ``error``: a case-insensitive substring of the job's
        title, of its error; ``created_after``, ``created_before``,
        ``finished_after``, ``finished_before``: an aware ``datetime`` or
        an ISO 8601 string (UTC when it names no offset), the jobs created
        (finished) at or after it, strictly before it; ``before``: a job
        id, the last of the previous page, or its ``(created_at, id)``
        (the rows strictly older than it; the pair holds even when that job
        was deleted since); ``limit``: 1 to :attr:`max_limit`; ``fields``:
        the columns to read and give (``id`` and ``created_at`` always), every one when
        None (the dashboard's list reads neither arguments nor tracebacks);
        ``parent``: a job id or ids, their children only (chain steps, jobs
        sent from their runs); ``workspace``: the jobs whose workspace holds
        these keys with these values, a dict (``{"user_id": 42}``) or texts
        ``"key=value"`` (the value read as JSON if it is, ``user_id=42``;
        else as text), served by a GIN index on PostgreSQL.

        ``title``, ``error``, ``finished_*``, and a ``queue`` or ``name``
        given with a narrower one (``parent``, then ``name``) are
        *searched*: checked on the newest :attr:`search_depth` jobs that the
        other filters select, no further.  When those hold fewer than
        ``limit`` matches, ``searched`` is the id of the oldest of them and
        ``searched_at`` its ``created_at``: give either (the pair, when that
        job may be deleted meanwhile) as ``before`` to search the older
        ones; the jobs and that end are read in one statement.  Otherwise
        it is None (the last of ``jobs`` is the next page's ``before``).

        Each read is an ordered range of an index, ``limit`` (or
        :attr:`search_depth`) entries deep at most: one branch per state,
        and per parent, task name or queue (``(parent_id, state,
        created_at)``, ``(name, state, created_at)``, ``(queue, state,
        created_at)``), merged.  Cheap whatever the size of
        the table.
        """
        limit = self._limit(limit)
        states = self._states(state) or list(STATES)
        names = self._strings("name", name)
        texts = {
            key: self._text(key, value)
            for key, value in (("title", title), ("error", error))
        }
        times = {
            key: self._time(key, value)
            for key, value in (
                ("created_after", created_after),
                ("created_before", created_before),
                ("finished_after", finished_after),
                ("finished_before", finished_before),
            )
        }
        keys = JOB_KEYS
        if fields is not None:
            keys = tuple(dict.fromkeys(("id", "created_at", *fields)))
        if times["finished_after"] or times["finished_before"]:
            # Only a finished job has a finished_at (started and retried
            # jobs have it cleared).
            states = [one for one in states if one in FINISHED]
        held = self._workspace(workspace)
        with self._connect(), self.store.engine.connect() as connection:
            queues = self._queues(connection, queue)
            where = []  # along every branch's index
            if held is not None:
                where.append(self._holds(held))
            searched = []  # checked on the window
            if times["created_after"]:
                where.append(_c.created_at >= times["created_after"])
            if times["created_before"]:
                where.append(_c.created_at < times["created_before"])
            if times["finished_before"]:
                # A job is created before it finishes: the window starts
                # at the bound instead of at the newest job.
                where.append(_c.created_at < times["finished_before"])
                searched.append(lambda c: c.finished_at < times["finished_before"])
            if times["finished_after"]:
                searched.append(lambda c: c.finished_at >= times["finished_after"])
            if texts["error"]:
                # The partial (state, created_at) index of the jobs that
                # have an error: the window holds only those.
                where.append(_c.error.is_not(None))
                searched.append(lambda c: _contains(c.error, texts["error"]))
            if texts["title"]:
                searched.append(lambda c: _contains(c.title, texts["title"]))
            if before is not None:
                where.append(self._before(connection, before))
            parents = self._strings("parent", parent)
            if parents is not None:
                pairs = [(s, _c.parent_id == p) for s in states for p in parents]
                if names is not None:
                    searched.append(lambda c: c.name.in_(names))
                if queues is not None:
                    searched.append(lambda c: c.queue.in_(queues))
            elif names is not None:
                pairs = [(s, _c.name == n) for s in states for n in names]
                if queues is not None:
                    searched.append(lambda c: c.queue.in_(queues))
            elif queues is not None:
                pairs = [(s, _c.queue == q) for s in states for q in queues]
            else:
                pairs = [(s, None) for s in states]
            if not pairs:
                return {"jobs": [], "searched": None, "searched_at": None}
            depth = self.search_depth if searched else limit
            columns = [_c[key] for key in keys]
            if searched:
                columns += [
                    _c[key]
                    for key in ("title", "error", "finished_at", "queue", "name")
                    if key not in keys
                ]
            order = (_c.created_at.desc(), _c.id.desc())
            branches = [
                select(*columns)
                .where(_c.state == one, *([] if pair is None else [pair]), *where)
                .order_by(*order)
                .limit(depth)
                .subquery()
                for one, pair in pairs
            ]
            if len(branches) == 1:
                merged = branches[0]
            else:
                merged = union_all(*(select(branch) for branch in branches)).subquery()
            newest = (merged.c.created_at.desc(), merged.c.id.desc())
            end = None
            if searched:
                # The matches in the window and, in the same statement (one
                # snapshot: a second one could see jobs gone from the window
                # and stop further down, skipping those in between), the
                # window's oldest job when the matches are fewer than a
                # page: where a next search goes on.  The window is read as
                # far as the matches need; to its end only for that job.
                window = select(merged).order_by(*newest).limit(depth).subquery()
                ordered = (window.c.created_at.desc(), window.c.id.desc())
                found = (
                    select(*(window.c[key] for key in keys))
                    .where(*(check(window.c) for check in searched))
                    .order_by(*ordered)
                    .limit(limit)
                    .cte("searched_found")
                )
                short = select(func.count()).select_from(found).scalar_subquery()
                last = (
                    select(*(window.c[key] for key in keys), literal(1).label("_end"))
                    .where(short < limit)  # evaluated once, before the scan
                    .order_by(*ordered)
                    .offset(depth - 1)
                    .limit(1)
                    .subquery()
                )
                found = select(*found.c, literal(0).label("_end")).subquery()
                both = union_all(select(found), select(last)).subquery()
                rows = connection.execute(
                    select(both).order_by(
                        both.c._end, both.c.created_at.desc(), both.c.id.desc()
                    )
                ).all()
                if rows and rows[-1]._end:
                    end, rows = rows[-1], rows[:-1]
            else:
                query = select(*(merged.c[key] for key in keys))
                rows = connection.execute(query.order_by(*newest).limit(limit)).all()
        jobs = [job_json(_without_end(row)) for row in rows]
        return {
            "jobs": [{key: job[key] for key in keys} for job in jobs],
            "searched": None if end is None else end.id,
            "searched_at": None
            if end is None
            else job_json(_without_end(end))["created_at"],
        }

    def _limit(self, limit):
        if isinstance(limit, bool) or not isinstance(limit, int):
            try:
                limit = int(str(limit).strip())
            except ValueError:
                raise BadParameter(
                    "limit", limit, f"bad limit {limit!r}: not a whole number"
                ) from None
        if not 1 <= limit <= self.max_limit:
            raise BadParameter(
                "limit", limit, f"bad limit {limit}: expected 1 to {self.max_limit}"
            )
        return limit

    @staticmethod
    def _workspace(value):
        """``{key: value}`` from a dict or from ``"key=value"`` texts (the
        value read as JSON when it is JSON, else as text), or None;
        BadParameter ``workspace``."""
        if value is None:
            return None
        if isinstance(value, dict):
            held = value
        else:
            held = {}
            for text in [value] if isinstance(value, str) else list(value):
                key, equals, raw = str(text).partition("=")
                if not equals or not key:
                    raise BadParameter(
                        "workspace", text, f"bad workspace {text!r}: not KEY=VALUE"
                    )
                try:
                    held[key] = json.loads(raw)
                except ValueError:
                    held[key] = raw
        if not held or not all(isinstance(key, str) and key for key in held):
            raise BadParameter(
                "workspace", value, f"bad workspace {value!r}: no KEY=VALUE"
            )
        return held

    def _holds(self, held):
        """The jobs whose workspace holds ``held``'s keys and values."""
        if self.store.dialect == "postgresql":  # @>, along the GIN index
            return type_coerce(_c.workspace, JSONB).contains(held)
        conditions = []
        for key, value in held.items():
            path = "$." + json.dumps(key)
            if isinstance(value, dict | list):
                value = func.json(json.dumps(value))
            elif value is None:
                conditions.append(func.json_type(_c.workspace, path) == "null")
                continue
            conditions.append(func.json_extract(_c.workspace, path) == value)
        return and_(*conditions)

    @staticmethod
    def _text(name, value):
        if value is not None and not isinstance(value, str):
            raise BadParameter(name, value, f"bad {name} {value!r}: not a string")
        return value or None

    @staticmethod
    def _time(name, value):
        """An aware datetime from ``value`` (one, or ISO 8601 text, UTC when
        it names no offset), None for None or ''; BadParameter ``name``."""
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.strip())
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            value = parsed if parsed is not None else value
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise BadParameter(
                name,
                value,
                f"bad {name} {value!r}: expected an ISO 8601 time such as "
                "2026-12-01T09:30 (UTC) or 2026-12-01T09:30+01:00, or an aware "
                "datetime",
            )
        # In UTC: SQLite compares the stored text, which is UTC's.
        return value.astimezone(UTC)

    def _before(self, connection, before):
        """The rows strictly older than ``before``: a job id (its job must
        exist) or the ``(created_at, id)`` of one (an aware datetime or ISO
        text, and an id: where a page ended, whether its job is still
        there or not)."""
        if isinstance(before, (tuple, list)) and len(before) == 2:
            created = self._time("before", before[0])
            job_id = before[1]
            if created is None or not isinstance(job_id, str):
                raise BadParameter("before", before, f"bad before {before!r}")
        elif isinstance(before, str):
            mark = connection.execute(
                select(_c.created_at, _c.id).where(_c.id == before)
            ).first()
            if mark is None:
                raise BadParameter(
                    "before", before, f"bad before {before!r}: no job has that id"
                )
            created, job_id = mark
        else:
            raise BadParameter("before", before, f"bad before {before!r}")
        return (_c.created_at <= created) & (
            (_c.created_at < created) | (_c.id < job_id)
        )

    def get(self, job_id):
        """The job ``job_id`` as :func:`job_json` gives it; UnknownJob."""
        with self._connect(), self.store.engine.connect() as connection:
            row = self._rows(connection, [job_id])[job_id]
        return job_json(row)

    # -- actions -------------------------------------------------------------

    def cancel(self, ids):
        """Cancel the jobs ``ids``: each unfinished one never runs.

        Every id is checked first (UnknownJob, nothing changed).  Each
        unfinished job becomes ``cancelled`` in one UPDATE naming the state
        it was found in; its message is revoked at the broker's workers; a
        ``started`` one is asked to stop (its ``cancel_requested()`` turns
        true, and a transactional run's transaction rolls back).  A finished
        job is left as it is.  Per id: ``{"id", "state_before", "state",
        "cancelled"}``; a workflow's unfinished steps are cancelled with it
        (its answer's ``"steps"``: their ids), so no later step runs.
        """
        with self._connect(), self.store.engine.connect() as connection:
            rows = self._rows(connection, ids)
        results = []
        with self.store.engine.begin() as connection:
            for job_id, row in rows.items():
                result = self._cancel_one(connection, job_id, row["state"])
                if result["cancelled"] and row["name"] == WORKFLOW_TASK:
                    result["steps"] = self._cancel_steps(connection, job_id)
                results.append(result)
        cancelled = [r["id"] for r in results if r["cancelled"]]
        cancelled += [step for r in results for step in r.get("steps", ())]
        if cancelled:
            self._revoke(cancelled)
            for result in results:
                if result["cancelled"]:
                    row = rows[result["id"]]
                    joblog.line(
                        joblog.CANCELLED,
                        row["id"],
                        row["name"],
                        row["queue"],
                        row["title"],
                        f"(it was {result['state_before']})",
                    )
        return results

    def _cancel_steps(self, connection, workflow_id):
        """Cancel the unfinished steps of a workflow: their ids."""
        steps = connection.execute(
            select(_c.id, _c.state).where(
                _c.parent_id == workflow_id, _c.state.in_(UNFINISHED)
            )
        ).all()
        results = [self._cancel_one(connection, step, state) for step, state in steps]
        return [result["id"] for result in results if result["cancelled"]]

    def _cancel_one(self, connection, job_id, state):
        while state in UNFINISHED:
            changed = connection.execute(
                update(_table)
                .where(_c.id == job_id, _c.state == state)
                .values(state=CANCELLED, finished_at=utcnow())
            ).rowcount
            if changed == 1:
                return {
                    "id": job_id,
                    "state_before": state,
                    "state": CANCELLED,
                    "cancelled": True,
                }
            # Changed since it was read: cancel it in its new state.
            state = self.store.state(job_id, connection)
        return {"id": job_id, "state_before": state, "state": state, "cancelled": False}

    def _revoke(self, ids):
        """Revoke ``ids`` at the workers; a broker that does not answer only
        costs a warning (the rows are cancelled: no worker starts them)."""
        try:
            with self._broker() as connection:
                self.app.control.revoke(ids, connection=connection)
        except Exception as exc:
            log.warning(
                "%d cancelled job(s) could not be revoked at the broker (no "
                "worker starts them anyway): %s",
                len(ids),
                one_line(exc),
            )

    def _broker(self):
        """A connection to the broker that fails within :data:`BROKER_TIMEOUT`."""
        connection = self.app.connection_for_write()
        options = {
            **connection.transport_options,
            "socket_timeout": BROKER_TIMEOUT,
            "socket_connect_timeout": BROKER_TIMEOUT,
            "max_retries": 1,
        }
        connection = connection.clone(
            connect_timeout=BROKER_TIMEOUT, transport_options=options
        )
        try:
            connection.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT)
        except BaseException:
            connection.release()
            raise
        return connection

    def clear(self, queues=None):
        """Cancel every waiting job (``pending`` or ``queued``) of ``queues``
        (a name or names; every known queue when None) and purge those queues
        at the broker.  ``{"queues": {queue: cancelled}, "purged": {queue:
        messages purged, or None when the broker did not answer or the queue
        was not purged}, "scheduled": {queue: scheduled or retrying jobs}}``.

        A queue with ``scheduled`` or ``retrying`` jobs is not purged: their
        messages wait there for a worker to take them (a purge would leave
        them ``scheduled`` for ever); the workers drop the cancelled jobs'
        messages instead."""
        with self._connect(), self.store.engine.connect() as connection:
            chosen = self._queues(connection, queues)
            if chosen is None:
                chosen = list(
                    dict.fromkeys(
                        self.configured_queues() + self.table_queues(connection)
                    )
                )
        cleared = {queue: 0 for queue in chosen}
        for queue in chosen:
            while True:
                # A bounded batch a transaction: a backlog of millions never
                # holds its locks in one statement.
                with self.store.engine.begin() as connection:
                    batch = (
                        select(_c.id)
                        .where(_c.queue == queue, _c.state.in_(WAITING))
                        .limit(self.batch_size)
                        .scalar_subquery()
                    )
                    count = connection.execute(
                        update(_table)
                        .where(_c.id.in_(batch), _c.state.in_(WAITING))
                        .values(state=CANCELLED, finished_at=utcnow())
                    ).rowcount
                cleared[queue] += count
                if count < self.batch_size:
                    break
        with self.store.engine.connect() as connection:
            delayed = {
                queue: connection.execute(
                    select(func.count()).where(_c.queue == queue, _c.state.in_(DELAYED))
                ).scalar()
                for queue in chosen
            }
        purged = {queue: None for queue in chosen}
        try:
            with self._broker() as connection:
                for queue in chosen:
                    if not delayed[queue]:
                        purged[queue] = self._purge(connection, queue)
        except Exception as exc:
            log.warning("The broker did not purge %s: %s", chosen, one_line(exc))
        for queue in chosen:
            log.info(
                "Queue %s cleared: %d job(s) cancelled, %s.",
                queue,
                cleared[queue],
                _purge_text(purged[queue], delayed[queue]),
            )
        return {"queues": cleared, "purged": purged, "scheduled": delayed}

    @staticmethod
    def _purge(connection, queue):
        channel = connection.channel()
        try:
            return channel.queue_purge(queue) or 0
        except connection.channel_errors:  # no such queue at the broker
            return 0
        finally:
            _close(channel)

    def delete(self, ids):
        """Delete the finished jobs ``ids`` (succeeded, failed, cancelled or
        dead): their rows are gone.

        Every id is checked first: an unknown one is UnknownJob, an
        unfinished job BadParameter naming it and its state (cancel it
        first); nothing changed.  One DELETE per :attr:`batch_size` ids, each
        naming the finished states (a job retried meanwhile is left, in its
        new state).  Per id ``{"id", "state_before", "state"}``, ``state``
        None once deleted.
        """
        with self._connect(), self.store.engine.connect() as connection:
            rows = self._rows(connection, ids)
        for job_id, row in rows.items():
            if row["state"] not in FINISHED:
                raise BadParameter(
                    "id",
                    job_id,
                    f"job {job_id} is {row['state']}: only a finished job is "
                    "deleted (cancel it first)",
                )
        ids = list(rows)
        kept = {}  # retried meanwhile: left, in the state it is in now
        with self.store.engine.begin() as connection:
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start : start + self.batch_size]
                connection.execute(
                    delete(_table).where(_c.id.in_(chunk), _c.state.in_(FINISHED))
                )
                kept.update(
                    connection.execute(
                        select(_c.id, _c.state).where(_c.id.in_(chunk))
                    ).all()
                )
        results = []
        for job_id, row in rows.items():
            state = kept.get(job_id)
            if state is None:
                log.info(
                    "Job %s[%s] deleted (it was %s).", row["name"], job_id, row["state"]
                )
            results.append({"id": job_id, "state_before": row["state"], "state": state})
        return results

    def retry(self, ids):
        """Run the failed, cancelled or dead jobs ``ids`` again: a new attempt
        of each under its id, published at once (no eta, no countdown).

        Every id is checked first: an unknown one is UnknownJob, a job in
        another state BadParameter naming it and its state; nothing changed.
        Each job goes back to ``pending`` (one UPDATE naming the state it
        was found in; its options' ``headers`` gain
        :data:`~pyramid_tasks.jobs.revoked.RETRIED_HEADER` and the time of
        this retry, :data:`~pyramid_tasks.jobs.model.RETRY_HEADER`), is
        published as
        the relay publishes, and is marked
        ``queued`` when the broker took it; what the broker did not take
        stays ``pending`` for the relay.  Per id ``{"id", "state_before",
        "state"}``.

        A workflow (:func:`~pyramid_tasks.jobs.workflow.workflow`) resumes
        at its step that failed (was cancelled, is dead): that step is
        retried, with the rest of the workflow in its message, and the
        workflow is ``queued`` again; its answer names the step (``"step"``).
        """
        with self._connect(), self.store.engine.connect() as connection:
            rows, resumed = self._resume_points(connection, self._rows(connection, ids))
        for job_id, row in rows.items():
            if row["state"] not in RETRYABLE:
                raise BadParameter(
                    "id",
                    job_id,
                    f"job {job_id} is {row['state']}: only a "
                    f"{', '.join(RETRYABLE[:-1])} or {RETRYABLE[-1]} job is retried",
                )
        try:
            retried = self._pend_again(rows)
        except IntegrityError:  # a key's holder committed after its check
            raise BadParameter(
                "id",
                list(rows),
                "a unique_key of the jobs "
                f"{', '.join(rows)} was taken meanwhile by another unfinished "
                "job: nothing retried",
            ) from None
        if any(row["state"] == CANCELLED for row in rows.values()):
            self._unrevoke(
                [job_id for job_id, r in rows.items() if r["state"] == CANCELLED]
            )
        sent_ids = self._send_now(retried)
        self._requeue_workflows(resumed)
        results = []
        for job_id, row in rows.items():
            state = QUEUED if job_id in sent_ids else PENDING
            joblog.line(
                joblog.RETRIED,
                job_id,
                row["name"],
                row["queue"],
                row["title"],
                f"by an operator (it was {row['state']}), {state}",
            )
            if job_id in resumed:  # asked for its workflow
                workflow = resumed[job_id]
                results.append(
                    {
                        "id": workflow["id"],
                        "state_before": workflow["state"],
                        "state": QUEUED,
                        "step": job_id,
                    }
                )
                continue
            results.append({"id": job_id, "state_before": row["state"], "state": state})
        return results

    @staticmethod
    def _resume_points(connection, rows):
        """``rows`` with each workflow that ended (failed, cancelled, dead)
        replaced by its newest step that ended so, and ``{step id: the
        workflow's row}``; BadParameter for a workflow with no such step."""
        points, resumed = {}, {}
        for job_id, row in rows.items():
            if row["name"] != WORKFLOW_TASK or row["state"] not in RETRYABLE:
                points[job_id] = row
                continue
            step = connection.execute(
                select(_table)
                .where(_c.parent_id == job_id, _c.state.in_(RETRYABLE))
                .order_by(_c.created_at.desc())
                .limit(1)
            ).first()
            if step is None:
                raise BadParameter(
                    "id",
                    job_id,
                    f"workflow {job_id} has no failed, cancelled or dead step "
                    "to resume at",
                )
            points[step.id] = loaded(step._asdict())
            resumed[step.id] = row
        return points, resumed

    def _requeue_workflows(self, resumed):
        """The workflows whose step was retried: ``queued`` again."""
        if not resumed:
            return
        with self.store.engine.begin() as connection:
            for workflow in resumed.values():
                connection.execute(
                    update(_table)
                    .where(_c.id == workflow["id"], _c.state == workflow["state"])
                    .values(state=QUEUED, finished_at=None, error=None, traceback=None)
                )

    def _send_now(self, rows):
        """Publish the ``pending`` job rows ``rows`` as the relay publishes,
        marking ``queued`` those the broker took: their ids (the others
        wait for the relay)."""
        sends, _unknown = Relay(self.app).sends(rows)
        sent = publish(self.app, sends, durable=True) if sends else []
        if sent:
            self.store.mark_published([(s.task_id, None) for s in sent])
        return {s.task_id for s in sent}

    def _pend_again(self, rows):
        """The retry's UPDATEs, in one transaction: each job of ``rows``
        back to ``pending``, its key checked free; the rows as sent."""
        retried = []
        claimed = {}  # unique_key: the id of this call that takes it
        with self.store.engine.begin() as connection:
            for job_id, row in rows.items():
                key = row["unique_key"]
                if key is not None and key in claimed:
                    raise BadParameter(
                        "id",
                        job_id,
                        f"jobs {claimed[key]} and {job_id} have the same "
                        f"unique_key {key!r}: only one of them can be unfinished, "
                        "retry one",
                    )
                claimed.setdefault(key, job_id)
                self._check_key_free(connection, job_id, key)
                options = {
                    k: v
                    for k, v in (row["options"] or {}).items()
                    if k not in ("eta", "countdown")
                }
                # Every later send carries the mark too (the relay's, a
                # worker's): one that drops it under the cancel's revoke
                # sends it again (pyramid_tasks.jobs.revoked).
                options = retry_mark(options, "operator")
                options["headers"][RETRIED_HEADER] = True
                changed = connection.execute(
                    update(_table)
                    .where(_c.id == job_id, _c.state == row["state"])
                    .values(
                        state=PENDING,
                        options=stored({"options": options})["options"],
                        eta=None,
                        # Its created_at is old: without this the relay would
                        # send it too, while this call publishes it.
                        publish_after=utcnow()
                        + timedelta(seconds=self.jobs.settings.relay_grace),
                        publish_attempts=0,
                        lost=0,  # its workers' deaths start counting again
                        published_at=None,
                        finished_at=None,
                    )
                ).rowcount
                if changed != 1:
                    raise BadParameter(
                        "id", job_id, f"job {job_id} changed meanwhile: try again"
                    )
                retried.append(
                    {**row, "state": PENDING, "eta": None, "options": options}
                )
        return retried

    def _unrevoke(self, ids):
        """Make the workers forget the revokes of cancelled jobs about to run
        again (each worker keeps a job's revoke for hours); waits for their
        answers, a second at most.  The fast path only: a worker that drops
        the job's message under the revoke all the same sends it again
        (:mod:`pyramid_tasks.jobs.revoked`)."""
        try:
            with self._broker() as connection:
                self.app.control.broadcast(
                    "pyramid_tasks_unrevoke",
                    arguments={"task_ids": ids},
                    connection=connection,
                    reply=True,
                    timeout=1.0,
                )
        except Exception as exc:
            log.warning("The workers could not be told of the retry: %s", one_line(exc))

    def run_now(self, ids):
        """Run the scheduled jobs ``ids`` now instead of at their eta: each is
        published again under its id, without eta or countdown.

        Every id is checked first: an unknown one is UnknownJob, a job not
        ``scheduled`` BadParameter naming it and its state; nothing changed.
        Each job goes back to ``pending`` with no eta (one UPDATE naming
        ``scheduled``), is published as :meth:`retry` publishes, and is
        marked ``queued`` when the broker took it.  Per id ``{"id",
        "state_before", "state"}``.

        The first message, with its eta, stays at the broker (a revoke of the
        id would drop the new one too).  When it is delivered, the worker
        skips a job that succeeded or was cancelled meanwhile; a
        transactional task (:class:`~pyramid_tasks.TransactionalTask` and
        its retryable subclass) locks its row before its body, so of two
        deliveries at once one runs and the other finds it done: its effects
        happen once.  A run that failed is no such fence: the old message is
        then one more attempt, as any redelivery of a failed job's message
        is.  Other task classes mark the job ``started`` outside the body's
        transaction: the old message of a job still running is a second run
        (at least once).
        """
        with self._connect(), self.store.engine.connect() as connection:
            rows = self._rows(connection, ids)
        for job_id, row in rows.items():
            if row["state"] != SCHEDULED:
                raise BadParameter(
                    "id",
                    job_id,
                    f"job {job_id} is {row['state']}: only a scheduled job is run now",
                )
        due = []
        with self.store.engine.begin() as connection:
            for job_id, row in rows.items():
                options = {
                    k: v
                    for k, v in (row["options"] or {}).items()
                    if k not in ("eta", "countdown")
                }
                changed = connection.execute(
                    update(_table)
                    .where(_c.id == job_id, _c.state == SCHEDULED)
                    .values(
                        state=PENDING,
                        options=stored({"options": options})["options"],
                        eta=None,
                        # This call publishes it; the relay after the grace.
                        publish_after=utcnow()
                        + timedelta(seconds=self.jobs.settings.relay_grace),
                        publish_attempts=0,
                        published_at=None,
                    )
                ).rowcount
                if changed != 1:
                    raise BadParameter(
                        "id", job_id, f"job {job_id} changed meanwhile: try again"
                    )
                due.append({**row, "state": PENDING, "eta": None, "options": options})
        sent_ids = self._send_now(due)
        results = []
        for job_id, row in rows.items():
            state = QUEUED if job_id in sent_ids else PENDING
            log.info(
                "Job %s[%s] run now by an operator (it was due %s): %s.",
                row["name"],
                job_id,
                _iso(row["eta"]) if row["eta"] is not None else "at no time",
                state,
            )
            results.append({"id": job_id, "state_before": SCHEDULED, "state": state})
        return results

    def test(self, queue=None):
        """Send the package's own test job (``pyramid_tasks.jobs.test``,
        which logs one INFO line on the worker that runs it) to ``queue``
        (the app's default queue when None), with a row like any job: its
        id.  Its log line says whether the broker took it, or the row is
        committed ``pending`` for the relay to send."""
        queues = self.check_queues(queue)
        options = {"queue": queues[0]} if queues else {}
        task = self.app.tasks[TEST_TASK]
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            job_id = task.apply_async(tm=tm, **options).id
        self.jobs.flush(BROKER_TIMEOUT)
        with self.store.engine.connect() as connection:
            state = connection.execute(select(_c.state).where(_c.id == job_id)).scalar()
        if state == PENDING:
            log.info(
                "Test job %s committed; the relay sends it when the broker is back.",
                job_id,
            )
        else:
            log.info("Test job %s sent.", job_id)
        return job_id

    def depth(self, include_scheduled=False):
        """Per known queue (configured or in the table), ascending:
        ``{"queue", "waiting", "broker", "oldest_waiting_age"}`` and, when
        ``include_scheduled``, ``"scheduled"``.

        ``waiting``: the table's ``pending`` and ``queued`` jobs of the
        queue; ``oldest_waiting_age``: seconds since the oldest of them was
        created (None when none waits); ``broker``: the messages the broker
        holds in the queue (Redis ``LLEN``, AMQP's passive declare), None
        when the broker does not answer within :data:`BROKER_TIMEOUT`;
        ``scheduled``: the ``scheduled`` and ``retrying`` jobs (an eta ahead:
        the broker counts their messages until a worker takes them to hold
        until then).
        """
        now = utcnow()
        with self._connect(), self.store.engine.connect() as connection:
            queues = sorted(
                set(self.configured_queues() + self.table_queues(connection))
            )
            found = []
            for queue in queues:
                count, oldest = connection.execute(
                    select(func.count(), func.min(_c.created_at)).where(
                        _c.queue == queue, _c.state.in_(WAITING)
                    )
                ).one()
                entry = {
                    "queue": queue,
                    "waiting": count,
                    "broker": None,
                    "oldest_waiting_age": None
                    if oldest is None
                    else (
                        now - loaded({"created_at": oldest})["created_at"]
                    ).total_seconds(),
                }
                if include_scheduled:
                    entry["scheduled"] = connection.execute(
                        select(func.count()).where(
                            _c.queue == queue, _c.state.in_(DELAYED)
                        )
                    ).scalar()
                found.append(entry)
        for entry, size in zip(found, self.broker_sizes(queues), strict=True):
            entry["broker"] = size
        return found

    def broker_sizes(self, queues):
        """The messages the broker holds in each of ``queues`` (None for
        each when it does not answer)."""
        sizes = []
        try:
            with self._broker() as connection:
                for queue in queues:
                    sizes.append(_size(connection, queue))
        except Exception as exc:
            log.warning("The broker did not tell its queue sizes: %s", one_line(exc))
        return sizes + [None] * (len(queues) - len(sizes))

    def prune(self, older_than=None, states=None):
        """Delete the finished jobs (``states``, a name or names among
        succeeded, failed, cancelled, dead; all of them when None) that
        finished more than ``older_than`` ago (seconds, a ``timedelta`` or a
        duration such as ``7d``; ``tasks.jobs.retention`` when None).

        In batches of at most :attr:`batch_size` rows a statement, each its
        own transaction, along the ``(state, created_at)`` index (a job
        finished before the cut-off was created before it).  ``{state:
        deleted}`` for each state asked.
        """
        seconds = self.duration("older_than", older_than, self.jobs.settings.retention)
        states = self._states(states, FINISHED, "finished state") or list(FINISHED)
        cutoff = utcnow() - timedelta(seconds=seconds)
        deleted = {state: 0 for state in states}
        with self._connect():
            for state in states:
                while True:
                    with self.store.engine.begin() as connection:
                        batch = (
                            select(_c.id)
                            .where(
                                _c.state == state,
                                _c.created_at < cutoff,
                                _c.finished_at < cutoff,
                            )
                            .limit(self.batch_size)
                            .scalar_subquery()
                        )
                        count = connection.execute(
                            delete(_table).where(_c.id.in_(batch), _c.state == state)
                        ).rowcount
                    deleted[state] += count
                    if count < self.batch_size:
                        break
        log.info(
            "Pruned the jobs finished before %s: %s.",
            _iso(cutoff),
            ", ".join(f"{n} {s}" for s, n in deleted.items()),
        )
        return deleted


def _contains(column, text):
    """``column`` contains ``text``, whatever the case (``%`` and ``_``
    taken literally)."""
    return func.lower(column).contains(text.lower(), autoescape=True)


def _without_end(row):
    """A row of :meth:`JobService.list_page`'s statement as a dict, without
    the mark of the window's end."""
    row = row._asdict()
    row.pop("_end", None)
    return row


def _purge_text(purged, scheduled):
    """What ``clear`` did at the broker to one queue, for its lines."""
    if scheduled:
        return (
            f"not purged at the broker: {scheduled} scheduled job(s) have their "
            "messages there (workers drop the cancelled ones)"
        )
    if purged is None:
        return "the broker did not answer"
    return f"{purged} message(s) purged at the broker"


def _route_queues(router, naming):
    """The queues a router names in mappings (Celery's MapRoute, ours)."""
    inner = getattr(router, "routers", None)
    if inner is not None:  # _PrefixedRoutes: its routers' queues, prefixed
        return [naming(q) for r in inner for q in _route_queues(r, naming)]
    queues = []
    for mapping in (getattr(router, "map", None), getattr(router, "patterns", None)):
        for route in (mapping or {}).values():
            queue = route if isinstance(route, str) else route.get("queue")
            queue = getattr(queue, "name", queue)
            if isinstance(queue, str):
                queues.append(queue)
    return queues


def _size(connection, queue):
    channel = connection.channel()
    try:
        return channel.queue_declare(queue=queue, passive=True).message_count
    except connection.channel_errors:  # the broker has no such queue
        return 0
    finally:
        _close(channel)


def _close(channel):
    # A channel the broker closed already (AMQP's 404) fails to close.
    with suppress(Exception):
        channel.close()
