"""A transaction's BEGIN and its first statement in one round trip
(PostgreSQL through psycopg 3).

psycopg begins a transaction with a ``BEGIN`` of its own, one round trip,
before the first statement; the worker's lock of a job is a transactional
run's first statement, another.  Here both go in one message, ``BEGIN ...;
EXECUTE name(...)``, the statement prepared on the server once per
connection (``PREPARE``): a round trip less for every run (0.1 to 0.15 ms on
this project's machine, bench/README.rst).  Prepared, as psycopg prepares a
statement run often: the same text sent unprepared is planned each time,
which costs more than the round trip saved.

Whatever goes wrong is undone and left to the usual way, which raises what
it raises: :func:`begin_with` returns None when the database refused (the
transaction it began rolled back), and when this connection is not one to
use it on:

- a process where gevent patched ``select``: the one message is sent and
  read by libpq's blocking ``PQexec``, which would hold up every greenlet
  (psycopg waits in Python there);
- a connection where psycopg prepares nothing (``prepare_threshold`` None,
  the setting for PgBouncer's transaction pooling);
- one whose transaction has begun, is in autocommit or in pipeline mode;
- an engine that lost the prepared statement three times: a pool that does
  not keep a connection's prepared statements from one transaction to the
  next (PgBouncer 1.21 keeps psycopg's, not ``PREPARE``'s).
"""

import hashlib
import logging
import re
import sys
import weakref

from psycopg import Error, IsolationLevel, pq
from psycopg.adapt import Transformer

__all__ = ["begin_with"]

log = logging.getLogger(__name__)

# Times an engine's connections lost the statement before it is not used.
LOST_LIMIT = 3

_IDLE = pq.TransactionStatus.IDLE
_IN_ERROR = pq.TransactionStatus.INERROR
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_EXISTS = b"42P05"  # duplicate_prepared_statement
_MISSING = b"26000"  # invalid_sql_statement_name

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_TYPES = {str: "text", int: "bigint"}


class _Statement:
    """One statement's text (psycopg's ``%(name)s`` placeholders) as a
    ``PREPARE`` named after it, and the order of its parameters."""

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
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        self.name = f"pyramid_tasks_{digest}".encode()
        declared = ", ".join(types[name] for name in self.names)
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
        # times a connection lost a statement it had prepared.
        self.lost = weakref.WeakKeyDictionary()

    def statement(self, text, parameters):
        types = {}
        for name, value in parameters.items():
            kind = _TYPES.get(type(value))
            if kind is None:
                return None
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
            driver.prepare_threshold is None
            or driver.autocommit
            or pgconn.transaction_status != _IDLE
            or pgconn.pipeline_status
            or self.lost.get(pool, 0) >= LOST_LIMIT
            or _greened()
        ):
            return None
        statement = self.statement(text, parameters)
        if statement is None:
            return None
        try:
            return self._run(driver, pgconn, statement, parameters, connection)
        except (Error, UnicodeEncodeError):  # the usual way raises it
            return None  # (a connection closed, a text it cannot encode)

    def _run(self, driver, pgconn, statement, parameters, connection):
        kept = self.kept.setdefault(driver, set())
        if statement.name not in kept:
            result = pgconn.exec_(statement.prepare)
            refused = result.status != _COMMAND_OK
            if refused and result.error_field(_SQLSTATE) != _EXISTS:
                return None  # a table missing...: the usual way says which
            kept.add(statement.name)
        encoding = driver.info.encoding
        literal = pq.Escaping(pgconn).escape_literal
        values = b", ".join(
            literal(str(parameters[name]).encode(encoding)) for name in statement.names
        )
        result = pgconn.exec_(
            b"%s; EXECUTE %s(%s)" % (_begin(driver), statement.name, values)
        )
        if result.status == _TUPLES_OK and result.ntuples == 1:
            loader = Transformer(driver)
            loader.set_pgresult(result)
            return loader.load_row(0, tuple)
        # Refused: nothing of the app's ran in this transaction (there was
        # none), so it is rolled back and the usual way runs the statement.
        if pgconn.transaction_status == _IN_ERROR:
            pgconn.exec_(b"ROLLBACK")
        if result.error_field(_SQLSTATE) == _MISSING:
            kept.discard(statement.name)
            pool = connection.engine.pool
            self.lost[pool] = lost = self.lost.get(pool, 0) + 1
            if lost == LOST_LIMIT:
                log.info(
                    "Jobs on %s: the connections do not keep a prepared "
                    "statement (a pooler between?): a run's BEGIN and lock "
                    "go in two round trips from now on.",
                    connection.engine.url.render_as_string(hide_password=True),
                )
        return None


def _greened():
    """Whether gevent patched ``select`` (psycopg's own test)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("select")


def _begin(driver):
    """The BEGIN psycopg would send for ``driver``'s next transaction: its
    isolation level (SQLAlchemy's ``isolation_level`` sets it), read-only
    and deferrable flags."""
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
