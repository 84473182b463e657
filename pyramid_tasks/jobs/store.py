"""The job store: every read and state change of ``pyramid_tasks_job``.

Each change is one statement naming the state (and, on the worker side, the
attempt) it expects, and its row count is checked: a job is never both
finished and failed, and a late writer never overwrites a newer attempt.
"""

import json
import logging
import socket
import traceback as traceback_module
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import (
    bindparam,
    case,
    func,
    insert,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, StatementError

from ..masking import mask_secrets
from . import log as joblog
from .model import (
    _JSON_COLUMNS,
    CANCELLED,
    DEAD,
    FAILED,
    PENDING,
    QUEUED,
    RETRYING,
    RUNNABLE,
    SCHEDULED,
    STARTED,
    SUCCEEDED,
    UNFINISHED,
    Job,
    _unfinished,
    loaded,
    retry_mark,
    stored,
    utcnow,
)

__all__ = ["JobStore", "JobTableMissing"]

log = logging.getLogger(__name__)

_table = Job.__table__
_c = _table.c


class JobTableMissing(RuntimeError):
    """The database has no ``pyramid_tasks_job`` table."""


@contextmanager
def explain_missing_table(engine):
    """Turn the database's "no such table" into :class:`JobTableMissing`."""
    try:
        yield
    except DBAPIError as exc:
        message = str(exc.orig)
        if Job.__tablename__ in message and (
            "does not exist" in message or "no such table" in message
        ):
            where = engine.url.render_as_string(hide_password=True)
            raise JobTableMissing(
                f"The job table {Job.__tablename__} does not exist in {where}: "
                "create it with `tasks-celery CONFIG jobs init-db` or your "
                "migrations (docs/jobs.rst)."
            ) from exc
        raise


_NO_FLUSH_WAIT = func.set_config("synchronous_commit", "off", True)

# A transaction-scoped advisory lock on a job id (PostgreSQL).
_LOCK_KEY = func.hashtextextended(bindparam("job_id"), 0)
_LOCK = select(func.pg_advisory_xact_lock(_LOCK_KEY))
_TRY_LOCK = select(func.pg_try_advisory_xact_lock(_LOCK_KEY))
# The lock and the row (NULLs without one) in one index probe.
_TRY_LOCK_AND_READ = select(
    func.pg_try_advisory_xact_lock(_LOCK_KEY), _c.state, _c.attempts, _c.title
).select_from(
    select(literal_column("1"))
    .subquery("one")
    .outerjoin(_table, _c.id == bindparam("job_id"))
)

# A succeeded job's progress is 100; the message of its last report stays
# only if that report said 100 % (a summary), not "part 9 of 10".
_FINAL_MESSAGE = case((_c.progress == 100, _c.progress_message), else_=None)

# succeeded, in the task's own transaction (JobStore.succeed_in): built once,
# 0.2 ms a task less than building them at each call.
_NOW = bindparam("now")
# The states in the SQL's text: an IN of parameters is expanded again at
# every execution (a tenth of the statement's time in the worker).
_RUNNABLE_TEXT = [literal_column(f"'{state}'") for state in RUNNABLE]
_SUCCEED_IN = (
    update(_table)
    .where(_c.id == bindparam("job_id"), _c.state.in_(_RUNNABLE_TEXT))
    .values(
        state=SUCCEEDED,
        finished_at=_NOW,
        progress=100,
        progress_message=_FINAL_MESSAGE,
    )
)


# ... by a run whose started mark never landed: what it would have written.
def _published_by(started, deferred=False):
    """``published_at`` no later than a start at ``started``: a publish
    mark that landed after the start it preceded (the worker was quicker
    than the marker thread) moves back to it.

    ``deferred``: the mark of a run that read the row under its lock, so
    the message it received was published from that row: none recorded yet
    (the marker thread still to come) is the start too, and the marker's
    late mark, finding one, leaves the row alone (its outcome stays the last
    write, in the run's own transaction for the transactional classes).  A
    row the worker makes itself (a task sent by name) keeps none."""
    if deferred:
        return case(
            (_c.published_at.is_(None) | (_c.published_at > started), started),
            else_=_c.published_at,
        )
    return case((_c.published_at > started, started), else_=_c.published_at)


_SUCCEED_IN_UNSTARTED = _SUCCEED_IN.values(
    attempts=_c.attempts + 1,
    started_at=bindparam("started_at"),
    published_at=_published_by(bindparam("started_at"), deferred=True),
    heartbeat_at=_NOW,
    worker=bindparam("worker"),
    progress_message=None,
    error=None,
    traceback=None,
)


def _publish_marks(dialect):
    """:meth:`JobStore.mark_published`'s two UPDATEs (:meth:`JobStore._mark`'s
    way), built once: of the jobs ``ids`` still ``pending``, ``state`` and
    ``published_at``; of the others, ``published_at`` alone.  The ids are
    one array on PostgreSQL (not a thousand parameters, each bound and sent
    on its own: a third of the marks' time for 10,000 jobs), joined as the
    rows of ``unnest``: ``id = ANY(array)`` is a filter PostgreSQL's generic
    plan of the prepared statement checks against the whole array for each
    pending row (10,000 jobs marked in 0.7 to 3 s, not 0.13)."""
    if dialect == "postgresql":
        marked = (
            func.unnest(bindparam("ids", type_=ARRAY(_c.id.type)))
            .table_valued("id")
            .render_derived(name="marked")
        )
        ids = _c.id == marked.c.id
        returning = (_c.id, _NO_FLUSH_WAIT)
    else:
        ids = _c.id.in_(bindparam("ids", expanding=True))
        returning = (_c.id,)
    published = (
        update(_table)
        .where(ids, _c.state == PENDING)
        .values(state=bindparam("state"), published_at=_NOW)
    )
    late = (
        update(_table)
        .where(ids, _c.published_at.is_(None))
        .values(published_at=case((_c.started_at < _NOW, _c.started_at), else_=_NOW))
    )
    return published.returning(*returning), late.returning(*returning)


class _DriverSQL:
    """Statements the worker runs for every job, as the driver's SQL.

    SQLAlchemy's execution of a compiled statement costs more in Python than
    the database's work for these (its cache key, its parameters'
    processing, its result: 0.1 to 0.2 ms a statement); the text, compiled
    once per schema map, goes on PostgreSQL to a cursor of the connection by
    SQLAlchemy's short path (``Connection._cursor_execute``, its own for a
    column default's SQL): its echo, its errors and the invalidation of a
    lost connection as for any statement, without an execution context or
    a result (a run's lock and mark: 0.16 ms a transaction less than through
    ``exec_driver_sql``, bench/README.rst).

    ``exec_driver_sql`` still runs them for an engine or connection with
    event listeners (a ``before_cursor_execute`` listener may read the
    context the short path does not make), an engine that hides its
    parameters (SQLAlchemy 2.0's short path logs them all the same), and a
    connection not yet in a transaction (the short path would not begin
    SQLAlchemy's)."""

    def __init__(self):
        self._texts = {}

    def one(self, connection, statement, parameters):
        """The row of ``statement``, which returns one."""
        return self._execute(connection, statement, parameters, _one_row)

    def first_one(self, connection, statement, parameters):
        """:meth:`one` for a statement that may be the first of the
        transaction of ``connection``: if it is, on psycopg 3, the BEGIN and
        the statement go in one round trip (:mod:`.prepared`), unless an
        echo wants it logged."""
        if (
            connection.dialect.driver == "psycopg"
            and _short_path(connection)
            and not connection._echo
        ):
            from .prepared import begin_with

            text, given = self._text(connection, statement)
            row = begin_with(connection, text, {**given, **parameters})
            if row is not None:
                return row
        return self.one(connection, statement, parameters)

    def rowcount(self, connection, statement, parameters):
        """The count of rows ``statement`` changed."""
        return self._execute(connection, statement, parameters, _rowcount)

    def _execute(self, connection, statement, parameters, read):
        """``read(cursor or result)`` of ``statement`` with ``parameters`` (its
        other bound values as compiled) on ``connection``."""
        if connection.dialect.paramstyle != "pyformat":  # SQLite's qmark
            return read(connection.execute(statement, parameters))
        text, given = self._text(connection, statement)
        parameters = {**given, **parameters}
        if not _short_path(connection):
            return read(connection.exec_driver_sql(text, parameters))
        try:
            cursor = connection.connection.cursor()
        except BaseException as exc:  # a closed connection: as exec_driver_sql
            connection._handle_dbapi_exception(exc, text, parameters, None, None)
        try:
            connection._cursor_execute(cursor, text, parameters)
            return read(cursor)
        finally:
            cursor.close()

    def _text(self, connection, statement):
        schemas = connection.get_execution_options().get("schema_translate_map")
        dialect = connection.dialect
        key = (statement, dialect.driver, tuple(schemas.items()) if schemas else ())
        try:
            return self._texts[key]
        except KeyError:
            compiled = statement.compile(
                dialect=dialect,
                schema_translate_map=schemas or None,
                render_schema_translate=bool(schemas),
            )
            self._texts[key] = (str(compiled), compiled.params)
            return self._texts[key]


def _short_path(connection):
    """Whether :class:`_DriverSQL` may go by SQLAlchemy's short path."""
    return not (
        connection._has_events
        or connection.engine._has_events
        or connection.engine.hide_parameters
        or not connection.in_transaction()  # exec_driver_sql begins one
    )


def _one_row(cursor):
    return cursor.fetchone()


def _rowcount(cursor):
    return cursor.rowcount


_driver_sql = _DriverSQL()


def one_line(exc):
    """An error on one line, secrets masked: a database error's own message,
    its first line (no SQL, no parameters, no context), else the text."""
    if isinstance(exc, StatementError) and exc.orig is not None:
        text_ = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    else:
        text_ = str(exc) or type(exc).__name__
    return " ".join(mask_secrets(text_).split())[:500]


# json.dumps's text, without its call of the same encoder (three values a
# row: a tenth of a COPY's time in Python).
_json_text = json.JSONEncoder().encode

# From this many rows on, an insert goes by COPY on psycopg 3 (below, the
# executemany costs no more).
_COPY_FROM = 100


class _Layout:
    """How rows with one set of ``keys`` go to ``schema``'s job table on
    psycopg 3: the INSERT's text (``%s`` for each key, the defaults of the
    columns not given inline), the COPY's, and each row's values."""

    def __init__(self, schema, keys, driver):
        from psycopg import sql

        # The columns' defaults, which SQLAlchemy's INSERT would apply.
        defaults = [
            (column.name, column.default.arg)
            for column in _table.columns
            if column.name not in keys
            and column.default is not None
            and column.default.is_scalar
        ]
        self.keys = keys
        self.fixed = [value for _, value in defaults]
        name = sql.Identifier(*filter(None, (schema, _table.name)))
        columns = sql.SQL(", ").join(
            map(sql.Identifier, [*keys, *(column for column, _ in defaults)])
        )
        values = [sql.Placeholder()] * len(keys) + list(map(sql.Literal, self.fixed))
        self.insert = (
            sql.SQL("INSERT INTO {} ({}) VALUES ({})")
            .format(name, columns, sql.SQL(", ").join(values))
            .as_string(driver)
        )
        self.copy = (
            sql.SQL("COPY {} ({}) FROM STDIN").format(name, columns).as_string(driver)
        )
        self.json = [n for n, key in enumerate(keys) if key in _JSON_COLUMNS]
        # SQL NULL for None, as SQLAlchemy writes it (its none_as_null).
        self.null = {n for n, key in enumerate(keys) if key == "workspace"}

    def values(self, row, dumps):
        """``row``'s values in the order of the keys; each JSON value as its
        text, which PostgreSQL reads as the column's type (no adapter: a
        third of a COPY's time), None too (JSON null, as SQLAlchemy writes
        it) but the workspace's."""
        values = [row[key] for key in self.keys]
        for n in self.json:
            if values[n] is not None or n not in self.null:
                values[n] = dumps(values[n])
        return values


class JobStore:
    """The SQL of the job table on ``engine`` (short transactions of its own),
    or on a connection the caller's transaction holds.
    """

    def __init__(self, engine, settings):
        self.engine = engine
        self.settings = settings
        self.dialect = engine.dialect.name
        self.worker_name = f"{socket.gethostname()}"
        self._layouts = {}  # _layout's
        self._publish_marks = _publish_marks(self.dialect)

    @contextmanager
    def marking(self):
        """A connection for marks, each UPDATE committing on its own: one
        round trip, no BEGIN, no COMMIT (:meth:`_mark`)."""
        with self.engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")

    def _mark(self, connection, statement, *returning, wait_flush=False):
        """Run the UPDATE ``statement`` on a :meth:`marking` connection; the
        rows it changed, as ``(id, *returning)``.

        A mark the job table can do without after a database crash (queued,
        heartbeat, progress, the outcome of a non-transactional run; not
        ``started``, ``wait_flush``): on PostgreSQL its commit does not wait
        for the WAL flush (a
        ``set_config`` local to the statement's own transaction).  A mark lost
        that way costs a second delivery (the relay, a lease), which the
        transactional classes absorb; never a lost job.  The rows of
        committed jobs are never written this way.
        """
        columns = [_c.id, *returning]
        if self.dialect == "postgresql" and not wait_flush:
            columns.append(_NO_FLUSH_WAIT)
        return connection.execute(statement.returning(*columns)).all()

    # -- writing rows ------------------------------------------------------

    # SQLAlchemy's INSERT costs in Python what the database's work does (a
    # compiled statement's cache key, its parameters' processing, a result):
    # rows go in by the INSERT's text written once per set of keys (executed
    # through SQLAlchemy: its events and errors as for any statement), or by
    # COPY, on psycopg 3; by SQLAlchemy's INSERT elsewhere.

    def insert(self, connection, rows):
        """Insert ``rows`` (dicts with the same keys, as the table keeps them:
        :meth:`JobRecorder.row <pyramid_tasks.jobs.web.JobRecorder.row>`'s;
        at least one) on ``connection``.  Many rows on PostgreSQL through
        psycopg 3 go by ``COPY``, in the same transaction."""
        with explain_missing_table(self.engine):
            if connection.dialect.driver != "psycopg":
                connection.execute(insert(_table), rows)
                return
            layout = self._layout(connection, rows[0])
            dumps = connection.dialect._json_serializer or _json_text
            if len(rows) >= _COPY_FROM:
                self._copy(connection, layout, rows, dumps)
            else:  # one row: one execute; more: executemany
                connection.exec_driver_sql(
                    layout.insert, [tuple(layout.values(row, dumps)) for row in rows]
                )

    def _layout(self, connection, row):
        """The :class:`_Layout` of rows with ``row``'s keys on ``connection``
        (its schema_translate_map applied), made once."""
        translate = connection.get_execution_options().get("schema_translate_map")
        schema = (translate or {}).get(_table.schema, _table.schema)
        key = (schema, tuple(row))
        try:
            return self._layouts[key]
        except KeyError:
            driver = connection.connection.driver_connection
            layout = self._layouts[key] = _Layout(schema, key[1], driver)
            return layout

    @staticmethod
    def _copy(connection, layout, rows, dumps):
        """``COPY ... FROM STDIN`` of ``rows``: 10,000 rows in a fifth of the
        time of the executemany (which psycopg pipelines already)."""
        driver = connection.connection.driver_connection
        fixed = layout.fixed
        try:
            with driver.cursor() as cursor, cursor.copy(layout.copy) as copy:
                for row in rows:
                    copy.write_row(layout.values(row, dumps) + fixed)
        except connection.dialect.loaded_dbapi.Error as exc:
            # As SQLAlchemy raises what the driver raised: a DBAPIError,
            # which the retries and explain_missing_table read.
            raise DBAPIError.instance(
                layout.copy, None, exc, connection.dialect.loaded_dbapi.Error
            ) from exc

    def insert_missing(self, rows):
        """Insert ``rows`` (at least one) in a short transaction, skipping ids
        already there."""
        with self.engine.begin() as connection:
            connection.execute(self._insert_ignore(), rows)

    def _insert_ignore(self):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(_table).on_conflict_do_nothing()

    def insert_unique(self, connection, row):
        """Insert ``row`` (it has a ``unique_key``) on ``connection`` unless an
        unfinished job holds that key: None, or that job's id.

        The partial unique index decides, never a read-then-insert: an
        uncommitted row with the key makes this INSERT wait until its
        transaction ends (committed: its id is returned; aborted: this row
        goes in).  A job that finishes between the two statements frees the
        key: the INSERT is tried again.
        """
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        statement = (
            dialect_insert(_table)
            .on_conflict_do_nothing(
                index_elements=[_c.unique_key], index_where=_unfinished
            )
            .returning(_c.id)
        )
        holder = select(_c.id).where(
            _c.unique_key == row["unique_key"], _c.state.in_(UNFINISHED)
        )
        with explain_missing_table(self.engine):
            while True:
                if connection.execute(statement, row).first() is not None:
                    return None
                existing = connection.execute(holder).scalar()
                if existing is not None:
                    return existing

    def mark_published(self, sent):
        """``sent``: ``[(id, eta)]`` confirmed by the broker: ``queued`` (or
        ``scheduled``, its eta ahead), in one UPDATE, if still ``pending``;
        those no longer ``pending`` only get their ``published_at``.  The
        jobs marked."""
        now = utcnow()
        scheduled = [job_id for job_id, eta in sent if eta is not None and eta > now]
        queued = [job_id for job_id, eta in sent if eta is None or eta <= now]
        count = 0
        published, late_published = self._publish_marks
        with self.marking() as connection:
            for state, ids in ((QUEUED, queued), (SCHEDULED, scheduled)):
                if ids:
                    marked = connection.execute(
                        published, {"ids": ids, "state": state, "now": now}
                    ).all()
                    count += len(marked)
                    late = set(ids) - {row[0] for row in marked}
                    if late:
                        # A worker started them first (it often beats this
                        # mark): published all the same, before they started.
                        connection.execute(
                            late_published, {"ids": list(late), "now": now}
                        )
        return count

    # -- reading -----------------------------------------------------------

    def get(self, job_id):
        """The row of ``job_id`` as a mapping, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(select(_table).where(_c.id == job_id)).first()
        return None if row is None else loaded(row._asdict())

    def workspace(self, job_id, connection=None):
        """The workspace of ``job_id`` (None without one), read on
        ``connection`` (the run's transaction) or on a connection of its own."""
        if connection is None:
            with self.engine.connect() as connection:
                return self.workspace(job_id, connection)
        value = connection.execute(
            select(_c.workspace).where(_c.id == job_id)
        ).scalar_one_or_none()
        return loaded({"workspace": value})["workspace"]

    def save_workspace(self, job_id, workspace, connection=None):
        """Write ``workspace`` as the job's, on ``connection`` (the run's
        transaction) or in a short transaction of its own."""
        if connection is None:
            with self.engine.begin() as connection:
                self.save_workspace(job_id, workspace, connection)
            return
        value = stored({"workspace": workspace})["workspace"]
        connection.execute(
            update(_table).where(_c.id == job_id).values(workspace=value)
        )

    def workflow_step(self, step, outcome, name, exc=None):
        """A step of a workflow (``step``: its message's ``{"id", "step",
        "steps"}``) ended ``outcome`` (started, succeeded, failed): the
        workflow's row follows, in one short UPDATE naming the states it may
        be in.  It never gets a heartbeat: no lease finds it lost."""
        number, count = step["step"], step["steps"]
        now = utcnow()
        if outcome == STARTED:
            values = {
                "state": STARTED,
                "started_at": func.coalesce(_c.started_at, now),
                "finished_at": None,
                "error": None,
                "traceback": None,
                "progress": round(100 * (number - 1) / count),
                "progress_message": f"step {number} of {count}: {name}",
            }
            states = (PENDING, QUEUED, STARTED, FAILED)
        elif outcome == SUCCEEDED and number < count:
            values = {
                "progress": round(100 * number / count),
                "progress_message": f"step {number} of {count} done: {name}",
            }
            states = (STARTED,)
        elif outcome == SUCCEEDED:
            values = {
                "state": SUCCEEDED,
                "finished_at": now,
                "progress": 100,
                "progress_message": f"{count} steps done",
            }
            states = (STARTED,)
        else:
            text_ = f"step {number} of {count} ({name}): {type(exc).__name__}: {exc}"
            values = {
                "state": FAILED,
                "finished_at": now,
                "error": mask_secrets(text_)[:10000],
                "progress_message": f"step {number} of {count} failed: {name}",
            }
            states = (PENDING, QUEUED, STARTED)
        with self.engine.begin() as connection:
            connection.execute(
                update(_table)
                .where(_c.id == step["id"], _c.state.in_(states))
                .values(values)
            )

    def state(self, job_id, connection=None):
        if connection is None:
            with self.engine.connect() as connection:
                return self.state(job_id, connection)
        return connection.execute(
            select(_c.state).where(_c.id == job_id)
        ).scalar_one_or_none()

    # -- worker side -------------------------------------------------------

    def _started(self, now, deferred=False):
        """The values of a ``started`` mark made at ``now`` (``deferred``: by
        a run that read the row under its lock, :func:`_published_by`)."""
        return {
            "state": STARTED,
            "attempts": _c.attempts + 1,
            "started_at": now,
            "published_at": _published_by(now, deferred),
            "heartbeat_at": now,
            "finished_at": None,
            "worker": self.worker_name,
            "progress": None,
            "progress_message": None,
            "error": None,
            "traceback": None,
        }

    def start(self, row, acked=True):
        """Mark the job ``started``: ``(attempt, state, title)``.

        ``row`` describes the job as the message does (id, name, args...), to
        create the row of a job sent without one (by name, or by a canvas).
        A job that already took effect or was cancelled is not started:
        ``(None, its state, None)``.  ``acked``: the broker forgot the message
        (no ``acks_late``), so the mark must survive a database crash.
        """
        now = utcnow()
        values = self._started(now)
        with explain_missing_table(self.engine), self.marking() as connection:
            # Each statement sees what committed before it: another pass
            # comes only after a concurrent writer changed the row.
            while True:
                started = self._mark(
                    connection,
                    update(_table)
                    .where(_c.id == row["id"], _c.state.in_(RUNNABLE))
                    .values(values),
                    _c.attempts,
                    _c.title,
                    # A job whose message was acknowledged and whose
                    # "started" vanished would wait "queued" for ever; an
                    # unacknowledged one comes back from the broker.
                    wait_flush=acked,
                )
                if started:
                    return started[0][1], STARTED, started[0][2]
                state = self.state(row["id"], connection)
                if state is None:
                    # Sent without a row: created now (or by a concurrent
                    # delivery of the same message first), then started.
                    connection.execute(
                        self._insert_ignore(),
                        [stored({**row, "state": QUEUED, "created_at": now})],
                    )
                elif state not in RUNNABLE:
                    return None, state, None
                # Else the row was committed after the UPDATE looked (a task
                # sent without tm= writes it after the send): start it.

    def start_late(self, job_id, seen, started_at):
        """The ``started`` mark of a run that read the job runnable with
        ``seen`` attempts under its lock and ran without waiting for this
        mark (:class:`~pyramid_tasks.jobs.worker.JobRun`, a transactional run
        with ``acks_late``): its attempt, or None when the job is no longer
        runnable (a late mark never overwrites ``succeeded``, ``cancelled``,
        nor a ``failed`` or ``dead`` written after that read).  It counts
        one more run on top of any other delivery started since."""
        values = {**self._started(started_at, deferred=True), "heartbeat_at": utcnow()}
        changed = self._marking(
            update(_table)
            .where(
                _c.id == job_id,
                _c.state.in_(UNFINISHED)
                | (_c.state.in_((FAILED, DEAD)) & (_c.attempts == seen)),
            )
            .values(values),
            _c.attempts,
        )
        return changed[0][1] if changed else None

    def record_attempt(self, job_id, attempt, start):
        """A run cancelled before its ``started`` mark (``start``, as for
        :meth:`succeed_in`) landed: counted, its start and worker recorded,
        the job left ``cancelled``."""
        seen, started_at = start
        changed = self._marking(
            update(_table)
            .where(_c.id == job_id, _c.state == CANCELLED, _c.attempts == seen)
            .values(attempts=seen + 1, started_at=started_at, worker=self.worker_name)
        )
        return len(changed) == 1

    def _marking(self, statement, *returning):
        with self.marking() as connection:
            return self._mark(connection, statement, *returning)

    def lock(self, connection, job_id, waiting=None):
        """Lock ``job_id`` for the transaction of ``connection``; its state
        attempts and title, ``(None, None, None)`` without a row.

        PostgreSQL: a transaction-scoped advisory lock on the id, so a second
        delivery of the message waits here until the first one's transaction
        ends, while progress, heartbeats and cancellation still write the row
        (``waiting()`` is called before it waits).  Elsewhere a write that
        changes nothing: SQLite's database lock.
        """
        if self.dialect == "postgresql":
            # Uncontended (the rule), one round trip: the lock and the row.
            # A delivery that ended between this statement's snapshot and
            # the lock (microseconds) is caught by succeed_in()'s guard.
            with explain_missing_table(self.engine):
                locked, *row = _driver_sql.first_one(
                    connection, _TRY_LOCK_AND_READ, {"job_id": job_id}
                )
            if locked:
                return tuple(row)
            if waiting is not None:
                waiting()
            connection.execute(_LOCK, {"job_id": job_id})
        else:  # a write: SQLite's database lock, a row lock elsewhere
            connection.execute(
                update(_table).where(_c.id == job_id).values(attempts=_c.attempts)
            )
        row = connection.execute(
            select(_c.state, _c.attempts, _c.title).where(_c.id == job_id)
        ).first()
        return (None, None, None) if row is None else tuple(row)

    def succeed_in(self, connection, job_id, start=None):
        """``succeeded`` in the task's own transaction; False when the job is
        no longer runnable (it was cancelled meanwhile).  ``start``:
        ``(seen, started_at)`` of a run whose ``started`` mark never landed,
        written with this one as :meth:`start_late` would have."""
        parameters = {"job_id": job_id, "now": utcnow()}
        if start is None:
            statement = _SUCCEED_IN
        else:
            statement = _SUCCEED_IN_UNSTARTED
            parameters.update(started_at=start[1], worker=self.worker_name)
        return _driver_sql.rowcount(connection, statement, parameters) == 1

    def _unstarted(self, start):
        """What the ``started`` mark of a run would have written, with its
        outcome (one statement for both)."""
        return {**self._started(start[1], deferred=True), "heartbeat_at": utcnow()}

    # The outcome of a run, conditioned on its attempt: ``start``, as for
    # succeed_in(), when its started mark never landed; the row must then
    # be as that run read it (no other delivery started since).

    def succeed(self, job_id, attempt, start=None):
        return self._finish(
            job_id,
            attempt,
            start,
            state=SUCCEEDED,
            progress=100,
            progress_message=_FINAL_MESSAGE,
        )

    def fail(self, job_id, attempt, exc, start=None):
        text_ = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback_module.format_exception(exc))
        return self._finish(
            job_id,
            attempt,
            start,
            state=FAILED,
            error=mask_secrets(text_)[:10000],
            traceback=mask_secrets(tb)[-100000:],
        )

    def retrying(self, job_id, attempt, exc=None, start=None):
        """Celery's ``retry()`` ended the run: ``retrying``, its time in the
        options (:func:`~.model.retry_mark`).  Read then written: only a run
        of this attempt writes them while it is ``started`` (the UPDATE
        names both), and an operator's retry needs it finished."""
        with self.engine.connect() as connection:
            options = connection.execute(
                select(_c.options).where(_c.id == job_id)
            ).scalar()
        values = {"state": RETRYING, "options": retry_mark(options, "task")}
        if exc is not None:
            values["error"] = mask_secrets(f"{type(exc).__name__}: {exc}")[:10000]
        return self._finish(job_id, attempt, start, finished=False, **values)

    def requeued(self, job_id, attempt, start=None):
        """Back in line (Celery's ``Ignore`` or ``Reject``): ``queued``."""
        return self._finish(job_id, attempt, start, finished=False, state=QUEUED)

    def _finish(self, job_id, attempt, start, finished=True, **values):
        if finished:
            values["finished_at"] = utcnow()
        if start is None:
            where = (_c.attempts == attempt, _c.state == STARTED)
        else:
            where = (_c.attempts == start[0], _c.state.in_(RUNNABLE))
            values = {**self._unstarted(start), **values}
        changed = self._marking(
            update(_table).where(_c.id == job_id, *where).values(values)
        )
        return len(changed) == 1

    def heartbeat(self, runs):
        """Renew the leases of this process's runs, ``[(id, attempt)]``: an
        old run still going never renews a newer attempt's lease."""
        with self.marking() as connection:
            return len(
                self._mark(
                    connection,
                    update(_table)
                    .where(
                        tuple_(_c.id, _c.attempts).in_(list(runs)),
                        _c.state == STARTED,
                    )
                    .values(heartbeat_at=utcnow()),
                )
            )

    def set_progress(self, job_id, attempt, progress, message):
        with self.marking() as connection:
            self._mark(
                connection,
                update(_table)
                .where(_c.id == job_id, _c.attempts == attempt, _c.state == STARTED)
                .values(progress=progress, progress_message=message),
            )

    # -- operators -----------------------------------------------------------

    def cancel(self, ids):
        """Cancel the unfinished jobs among ``ids``; the ids cancelled."""
        with self.engine.begin() as connection:
            rows = connection.execute(
                update(_table)
                .where(_c.id.in_(list(ids)), _c.state.in_(UNFINISHED))
                .values(state=CANCELLED, finished_at=utcnow())
                .returning(_c.id, _c.name, _c.queue, _c.title)
            ).all()
        joblog.batch(joblog.CANCELLED, [row._mapping for row in rows])
        return [row.id for row in rows]

    # -- relay -------------------------------------------------------------

    def claim_pending(self, connection, grace, limit):
        """Pending rows older than ``grace`` seconds and due, locked for the
        transaction of ``connection``; rows another relay holds are skipped."""
        now = utcnow()
        query = (
            select(_table)
            .where(
                _c.state == PENDING,
                _c.created_at <= now - timedelta(seconds=grace),
                (_c.publish_after.is_(None)) | (_c.publish_after <= now),
            )
            .order_by(_c.created_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return [loaded(row._asdict()) for row in connection.execute(query)]

    def relayed(self, connection, sent):
        """Mark rows the relay published (``[(id, eta)]``)."""
        now = utcnow()
        for job_id, eta in sent:
            state = SCHEDULED if eta is not None and eta > now else QUEUED
            connection.execute(
                update(_table)
                .where(_c.id == job_id, _c.state == PENDING)
                .values(state=state, published_at=now, publish_after=None)
            )

    def relay_failed(self, connection, row, attempts_left):
        """Count a failed publish of ``row``: back off, or ``dead``."""
        attempts = row["publish_attempts"] + 1
        values = {"publish_attempts": attempts}
        if attempts_left <= 1:
            values.update(state=DEAD, finished_at=utcnow())
        else:
            delay = min(300.0, self.settings.relay_interval * 2**attempts)
            values["publish_after"] = utcnow() + timedelta(seconds=delay)
        connection.execute(
            update(_table).where(_c.id == row["id"], _c.state == PENDING).values(values)
        )
        return values.get("state")

    def expired_leases(self, connection, lease, limit):
        """``started`` jobs whose worker sent no heartbeat for ``lease``
        seconds: made ``pending`` again for the relay, or ``failed`` once
        their workers were lost ``tasks.jobs.lost_attempts`` times (a job
        that kills its worker is not run for ever).  ``[(id, name, worker,
        new state)]``."""
        cutoff = utcnow() - timedelta(seconds=lease)
        query = (
            select(_c.id, _c.name, _c.worker, _c.lost)
            .where(_c.state == STARTED, _c.heartbeat_at < cutoff)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = connection.execute(query).all()
        rescued = []
        for job_id, name, worker, lost in rows:
            if (
                self.dialect == "postgresql"
                and not connection.execute(
                    # A transactional task still holding its lock is alive,
                    # heartbeat or not (a stopped process, a long GC pause).
                    _TRY_LOCK,
                    {"job_id": job_id},
                ).scalar()
            ):
                continue
            lost = (lost or 0) + 1
            values = {"lost": lost, "progress": None, "progress_message": None}
            if lost >= self.settings.lost_attempts:
                values.update(
                    state=FAILED,
                    finished_at=utcnow(),
                    error=f"WorkerLostError: its worker was lost {lost} times "
                    "(tasks.jobs.lost_attempts)",
                )
            else:
                values.update(state=PENDING, publish_after=None)
            changed = connection.execute(
                update(_table)
                .where(_c.id == job_id, _c.state == STARTED)
                .values(values)
                .returning(_c.id)
            ).all()
            rescued += [(job_id, name, worker, values["state"]) for _ in changed]
        return rescued
