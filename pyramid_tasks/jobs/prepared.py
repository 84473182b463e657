"""A transaction's BEGIN and its first statement in one round trip
(PostgreSQL through psycopg 3).

psycopg begins a transaction with a ``BEGIN`` of its own, one round trip,
before the first statement; the worker's lock of a job is a transactional
run's first statement, another.  Here both go in one message, ``BEGIN ...;
EXECUTE name(...)``, the statement prepared on the server once per
connection (``PREPARE``): a round trip less for every run (0.16 ms a task
on this project's machine, bench/README.rst).  Prepared, as psycopg
prepares a statement run often: the same text sent unprepared is planned
each time, which costs more than the round trip saved.  The messages are
sent and waited for as psycopg sends its own (its wait: interrupted by a
signal as any query is, cooperative under gevent).

When the database refuses it, the transaction it began is rolled back and
:func:`begin_with` returns None: the caller runs the statement the usual
way, which raises a lasting error (a missing table, a lost connection) as
SQLAlchemy does; a passing one (a statement timeout) is paid twice.
It returns None at once for a connection it is not to be used on:

- an asyncio engine's (the wait would block its loop);
- a connection where psycopg prepares nothing (``prepare_threshold`` None,
  the setting for PgBouncer's transaction pooling);
- one whose transaction has begun, is in autocommit or in pipeline mode;
- an engine whose connections lost the statement right after preparing it
  three times: a pooler in between that runs each transaction on another
  server connection.  A statement lost between two transactions is
  prepared again (psycopg deallocates every prepared statement when it
  rolls back a transaction).
"""

import hashlib
import logging
import re
import weakref

from psycopg import Error, IsolationLevel, pq
from psycopg.adapt import Transformer
from psycopg.generators import execute

__all__ = ["begin_with"]

log = logging.getLogger(__name__)

# Times a pool's connections lost the statement just prepared, after which
# it is not used there.
LOST_LIMIT = 3

_IDLE = pq.TransactionStatus.IDLE
_BEGUN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_EXISTS = b"42P05"  # duplicate_prepared_statement
_MISSING = b"26000"  # invalid_sql_statement_name

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_TYPES = {str: "text", int: "bigint"}


class _Statement:
    """One statement's text (psycopg's ``%(name)s`` placeholders) as a
    ``PREPARE`` named after it and its parameters' types, and the order of
    its parameters."""

    def __init__(self, text, types):
        self.names = []

        def numbered(match):
            name = match.group(1)
            if name is None:  # %%
                return "%"
            if name not in self.names:
                self.names.append(name)
            return f"${self.names.index(name) + 1}"

        body = _PLACEHOLDER.sub(numbered, text)
        declared = ", ".join(types[name] for name in self.names)
        digest = hashlib.sha1(f"{declared}\n{body}".encode()).hexdigest()[:16]
        self.name = f"pyramid_tasks_{digest}".encode()
        self.prepare = b"PREPARE %s(%s) AS %s" % (
            self.name,
            declared.encode(),
            body.encode(),
        )


class _Prepared:
    def __init__(self):
        self.statements = {}  # (text, types): _Statement
        # Per psycopg connection (one server session for its life): the
        # names it prepared.  Weak: a connection closed takes its own.
        self.kept = weakref.WeakKeyDictionary()
        # Per pool (an engine's, shared by its execution_options copies):
        # times a connection lost a statement right after preparing it.
        self.lost = weakref.WeakKeyDictionary()

    def statement(self, text, parameters):
        types = {}
        for name, value in parameters.items():
            kind = _TYPES.get(type(value))
            if kind is None or (kind == "text" and "\x00" in value):
                return None  # (a NUL: PostgreSQL's text has none)
            types[name] = kind
        key = (text, tuple(sorted(types.items())))
        try:
            return self.statements[key]
        except KeyError:
            statement = self.statements[key] = _Statement(text, types)
            return statement

    def begin_with(self, connection, text, parameters):
        pool = connection.engine.pool
        driver = connection.connection.driver_connection
        pgconn = driver.pgconn
        if (
            connection.dialect.is_async
            or driver.prepare_threshold is None
            or driver.autocommit
            or pgconn.transaction_status != _IDLE
            or pgconn.pipeline_status
            or self.lost.get(pool, 0) >= LOST_LIMIT
        ):
            return None
        statement = self.statement(text, parameters)
        if statement is None:
            return None
        with driver.lock:  # as psycopg's own calls
            try:
                row = self._run(driver, statement, parameters, connection)
                if row is None and pgconn.transaction_status in _BEGUN:
                    # The transaction is this try's: it was idle before.
                    _query(driver, b"ROLLBACK")
                return row
            except (Error, UnicodeEncodeError):  # a connection lost...
                return None

    def _run(self, driver, statement, parameters, connection):
        pgconn = driver.pgconn
        kept = self.kept.setdefault(driver, set())
        fresh = statement.name not in kept
        if fresh:
            result = _query(driver, statement.prepare)
            refused = result.status != _COMMAND_OK
            if refused and result.error_field(_SQLSTATE) != _EXISTS:
                return None  # a table missing...: the usual way says which
            kept.add(statement.name)
        encoding = driver.info.encoding
        literal = pq.Escaping(pgconn).escape_literal
        values = b", ".join(
            literal(str(parameters[name]).encode(encoding)) for name in statement.names
        )
        begin = _begin(driver)
        result = _query(driver, b"%s; EXECUTE %s(%s)" % (begin, statement.name, values))
        if result.status == _TUPLES_OK and result.ntuples == 1:
            loader = Transformer(driver)
            loader.set_pgresult(result)
            return loader.load_row(0, tuple)
        if result.error_field(_SQLSTATE) == _MISSING:
            kept.discard(statement.name)  # prepared again next time
            if fresh:
                self._lost(connection)
        return None

    def _lost(self, connection):
        pool = connection.engine.pool
        self.lost[pool] = lost = self.lost.get(pool, 0) + 1
        if lost == LOST_LIMIT:
            log.info(
                "Jobs on %s: the connections lose a statement prepared the "
                "message before (a pooler between?): a run's BEGIN and lock "
                "go in two round trips from now on.",
                connection.engine.url.render_as_string(hide_password=True),
            )


def _query(driver, command):
    """The last result of ``command`` (a simple query), sent and waited for
    as psycopg sends and waits for its own commands."""
    driver.pgconn.send_query(command)
    return driver.wait(execute(driver.pgconn))[-1]


def _begin(driver):
    """The BEGIN psycopg would send for ``driver``'s next transaction: its
    isolation level, read-only and deferrable flags (SQLAlchemy sets them on
    it: ``create_engine(isolation_level=...)``, a connection's
    ``execution_options``)."""
    parts = [b"BEGIN"]
    if driver.isolation_level is not None:
        level = IsolationLevel(driver.isolation_level).name.replace("_", " ")
        parts += [b"ISOLATION LEVEL", level.encode()]
    if driver.read_only is not None:
        parts.append(b"READ ONLY" if driver.read_only else b"READ WRITE")
    if driver.deferrable is not None:
        parts.append(b"DEFERRABLE" if driver.deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


_prepared = _Prepared()


def begin_with(connection, text, parameters):
    """The row of ``text`` (a SELECT of one row, psycopg's placeholders) run
    with ``parameters`` (text and integers) as the first statement of
    ``connection``'s transaction, its BEGIN in the same message; None when
    it was not run (the caller runs it the usual way)."""
    return _prepared.begin_with(connection, text, parameters)
