"""The overview's figures: capped counts along the table's indexes.

No query counts more than :data:`CAP` rows or reads the whole table: each
count is of one queue in some states (the ``(queue, state, created_at)``
index), read ``CAP + 1`` entries deep at most; above the cap PostgreSQL's
planner gives its estimate (``EXPLAIN``, no row read).  The queues are
found by a loose index scan (:meth:`.JobService.table_queues`), never
``DISTINCT``.  The counts of every queue are one statement: at ten
million jobs a round trip costs more than the index reads.
"""

import functools

from sqlalchemy import func, select, union_all

from ..jobs.model import DEAD, FAILED, STARTED, Job, loaded, utcnow
from ..jobs.service import DELAYED, WAITING

__all__ = ["CAP", "COLUMNS", "WAITING", "capped_count", "children_count", "overview"]

#: Counts stop here: the page shows "1000+" (an exact count of millions of
#: rows would cost seconds).
CAP = 1000

_c = Job.__table__.c

#: The overview's columns: ``(key, states)``.
COLUMNS = (
    ("waiting", WAITING),
    ("running", (STARTED,)),
    ("scheduled", DELAYED),
    ("failed", (FAILED,)),
    ("dead", (DEAD,)),
)


def capped_count(connection, queue, states, cap=CAP):
    """The jobs of ``queue`` in ``states``, counted up to ``cap + 1``."""
    # Only columns of ``(queue, state)``: an index-only scan where the
    # table's visibility map allows.
    capped = (
        select(_c.state)
        .where(_c.queue == queue, _c.state.in_(states))
        .limit(cap + 1)
        .subquery()
    )
    return connection.execute(select(func.count()).select_from(capped)).scalar()


def _capped(queue, states, cap):
    """:func:`capped_count` as a scalar subquery."""
    capped = (
        select(_c.state)
        .where(_c.queue == queue, _c.state.in_(states))
        .limit(cap + 1)
        .subquery()
    )
    return select(func.count()).select_from(capped).scalar_subquery()


def _first(queue, state):
    """When the oldest job of ``queue`` in ``state`` was created: the first
    entry of its ``(queue, state, created_at)`` range."""
    return (
        select(func.min(_c.created_at))
        .where(_c.queue == queue, _c.state == state)
        .scalar_subquery()
    )


@functools.lru_cache(maxsize=32)
def _counts_query(queues, cap):
    """The overview's one SELECT for ``queues`` (a tuple): the capped
    counts of each queue's :data:`COLUMNS`, then its first waiting entries.
    Built once per set of queues."""
    return select(
        *(_capped(q, states, cap) for q in queues for _, states in COLUMNS),
        *(_first(q, state) for q in queues for state in WAITING),
    )


@functools.lru_cache(maxsize=32)
def _estimates_query(queues, sets):
    """A branch for the table, one a queue, one a set of states."""
    return union_all(
        select(_c.id),
        *(select(_c.id).where(_c.queue == queue) for queue in queues),
        *(select(_c.id).where(_c.state.in_(states)) for states in sets),
    )


@functools.lru_cache(maxsize=64)
def _literal(query, dialect, schemas):
    """The text of ``query`` with its values inline (names of queues and
    states, quoted by ``dialect``) and the table's name as the schema map
    ``schemas`` (its items) has it, for the driver as it is: compiled once,
    and no bound parameters to process (an overview's SELECT has a hundred)."""
    return str(
        query.compile(
            dialect=dialect,
            schema_translate_map=dict(schemas) or None,
            render_schema_translate=True,
            compile_kwargs={"literal_binds": True},
        )
    )


def _run(connection, query):
    """``query``'s result: on PostgreSQL its cached text (:func:`_literal`)."""
    if connection.dialect.name != "postgresql":
        return connection.execute(query)
    schemas = connection.get_execution_options().get("schema_translate_map") or {}
    return connection.exec_driver_sql(
        _literal(query, connection.dialect, tuple(schemas.items()))
    )


def _estimates(connection, cells):
    """The planner's estimates of the rows of each ``(queue, states)`` of
    ``cells`` (PostgreSQL), None each on another database.

    One EXPLAIN of a UNION ALL, a branch for the table, one a queue and one
    a set of states: the planner multiplies the two selectivities (the
    columns are independent to it), so ``queue rows * states rows /
    table rows`` is its estimate of the pair, for a fraction of the
    planning of a branch a pair.
    """
    if connection.dialect.name != "postgresql":
        return [None] * len(cells)
    queues = tuple(dict.fromkeys(queue for queue, _ in cells))
    sets = tuple(dict.fromkeys(tuple(states) for _, states in cells))
    schemas = connection.get_execution_options().get("schema_translate_map") or {}
    # EXPLAIN takes no parameters: the values inline.
    sql = _literal(
        _estimates_query(queues, sets), connection.dialect, tuple(schemas.items())
    )
    plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}").scalar()
    rows = [branch["Plan Rows"] for branch in plan[0]["Plan"]["Plans"]]
    total = max(rows[0], 1)
    of_queue = dict(zip(queues, rows[1:], strict=False))
    of_states = dict(zip(sets, rows[1 + len(queues) :], strict=True))
    return [
        round(of_queue[queue] * of_states[tuple(states)] / total)
        for queue, states in cells
    ]


def overview(service, cap=CAP):
    """Per known queue (configured or in the table), ascending: ``{"queue",
    "oldest_waiting_age"}`` (seconds, or None) and, per :data:`COLUMNS`
    key, a count up to ``cap + 1`` (more than ``cap`` is "above the cap").

    Three statements whatever the number of queues (each a round trip):
    the queues (:meth:`.JobService.table_queues`, one probe a queue), one
    SELECT of every capped count and every queue's first waiting entries,
    and on PostgreSQL one EXPLAIN for the estimates above the cap.
    """
    now = utcnow()
    rows = []
    with service._connect(), service.store.engine.connect() as connection:
        queues = sorted(
            set(service.configured_queues() + service.table_queues(connection))
        )
        cells = [(q, key, states) for q in queues for key, states in COLUMNS]
        firsts = [(q, state) for q in queues for state in WAITING]
        found = _run(connection, _counts_query(tuple(queues), cap)).one()
        counts = dict(zip(((q, k) for q, k, _ in cells), found, strict=False))
        oldest = {}
        for (queue, _), created in zip(firsts, found[len(cells) :], strict=True):
            if created is not None:
                created = loaded({"created_at": created})["created_at"]
                oldest[queue] = min(oldest.get(queue, created), created)
        above = [(q, k, states) for q, k, states in cells if counts[q, k] > cap]
        estimates = {}
        if above:
            guesses = _estimates(connection, [(q, states) for q, _, states in above])
            estimates = {(q, k): e for (q, k, _), e in zip(above, guesses, strict=True)}
    for queue in queues:
        row = {"queue": queue, "about": {}}
        for key, _ in COLUMNS:
            row[key] = counts[queue, key]
            if estimates.get((queue, key)) is not None:
                row["about"][key] = estimates[queue, key]
        first = oldest.get(queue) if row["waiting"] else None
        row["oldest_waiting_age"] = (
            None if first is None else (now - first).total_seconds()
        )
        rows.append(row)
    return rows


def children_count(service, parent, cap=CAP):
    """The children of the job ``parent`` (``parent_id``), counted up to
    ``cap + 1`` along the ``(parent_id, state, created_at)`` index."""
    capped = select(_c.state).where(_c.parent_id == parent).limit(cap + 1).subquery()
    with service._connect(), service.store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(capped)).scalar()
