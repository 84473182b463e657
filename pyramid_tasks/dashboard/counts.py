"""The overview's figures: capped counts along the table's indexes.

No query counts more than :data:`CAP` rows or reads the whole table: each
count is of one queue in some states (the ``(queue, state)`` index), read
``CAP + 1`` entries deep at most; above the cap PostgreSQL's planner gives
its estimate (``EXPLAIN``, no row read).  The queues are found by a loose
index scan (:meth:`.JobService.table_queues`), never ``DISTINCT``.
"""

from sqlalchemy import func, select, text

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


def _estimate(connection, queue, states):
    """The planner's estimate of the rows of ``queue`` in ``states``
    (PostgreSQL), or None (another database)."""
    if connection.dialect.name != "postgresql":
        return None
    query = select(_c.id).where(_c.queue == queue, _c.state.in_(states))
    # Text, so the table's name as the connection maps it (an app's
    # schema_translate_map) and the values inline (EXPLAIN takes no
    # parameters): names of queues and states, quoted by the dialect.
    sql = query.compile(
        dialect=connection.dialect,
        schema_translate_map=connection.get_execution_options().get(
            "schema_translate_map"
        ),
        render_schema_translate=True,
        compile_kwargs={"literal_binds": True},
    )
    plan = connection.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar()
    return int(plan[0]["Plan"]["Plan Rows"])


def _oldest(connection, queue):
    """When the oldest waiting job of ``queue`` was created, or None: per
    waiting state that the queue has jobs in (one probe of ``(queue,
    state)``: a walk of ``(state, created_at)`` finding none of the queue
    would read every job in that state), the first entry of ``(state,
    created_at)`` of the queue."""
    found = []
    for state in WAITING:
        if not capped_count(connection, queue, (state,), cap=0):
            continue
        found.append(
            connection.execute(
                select(_c.created_at)
                .where(_c.state == state, _c.queue == queue)
                .order_by(_c.created_at)
                .limit(1)
            ).scalar()  # None if its jobs moved on meanwhile
        )
    found = [loaded({"created_at": c})["created_at"] for c in filter(None, found)]
    return min(found, default=None)


def overview(service, cap=CAP):
    """Per known queue (configured or in the table), ascending: ``{"queue",
    "oldest_waiting_age"}`` (seconds, or None) and, per :data:`COLUMNS`
    key, a count up to ``cap + 1`` (more than ``cap`` is "above the cap")."""
    now = utcnow()
    rows = []
    with service._connect(), service.store.engine.connect() as connection:
        queues = sorted(
            set(service.configured_queues() + service.table_queues(connection))
        )
        for queue in queues:
            row = {"queue": queue, "about": {}}
            for key, states in COLUMNS:
                row[key] = capped_count(connection, queue, states, cap)
                if row[key] > cap:
                    estimate = _estimate(connection, queue, states)
                    if estimate is not None:
                        row["about"][key] = estimate
            oldest = _oldest(connection, queue) if row["waiting"] else None
            row["oldest_waiting_age"] = (
                None if oldest is None else (now - oldest).total_seconds()
            )
            rows.append(row)
    return rows


def children_count(service, parent, cap=CAP):
    """The children of the job ``parent`` (``parent_id``), counted up to
    ``cap + 1`` along the ``(parent_id, state, created_at)`` index."""
    capped = select(_c.state).where(_c.parent_id == parent).limit(cap + 1).subquery()
    with service._connect(), service.store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(capped)).scalar()
