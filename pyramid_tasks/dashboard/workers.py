"""The workers page's figures: what Celery's remote inspection tells.

The broker is given :data:`.service.BROKER_TIMEOUT` to accept a connection
and the workers :data:`TIMEOUT` to answer, so a stopped broker or a silent
worker costs the page a second or two, never a hang.
"""

from ..jobs.store import one_line

__all__ = ["TIMEOUT", "inspect_workers"]

#: Seconds the workers have to answer the first question (``active``).
TIMEOUT = 1.0


def _worker(name, active, stats):
    pool = stats.get("pool") or {}
    implementation = pool.get("implementation") or ""
    return {
        "name": name,
        # "celery.concurrency.prefork:TaskPool": prefork
        "pool": implementation.split(":")[0].rsplit(".", 1)[-1] or None,
        "concurrency": pool.get("max-concurrency"),
        "pid": stats.get("pid"),
        "uptime": stats.get("uptime"),
        "active": [
            {"id": task["id"], "name": task.get("name")}
            for task in active
            if isinstance(task, dict) and "id" in task
        ],
    }


def inspect_workers(service, timeout=TIMEOUT):
    """``(workers, error)``: the workers that answered within ``timeout``,
    by name, each ``{"name", "pool", "concurrency", "pid", "uptime",
    "active": [{"id", "name"}]}``; ``error``: why the broker could not be
    asked (one line, secrets masked), else None."""
    app = service.app
    try:
        with service._broker() as connection:
            active = app.control.inspect(timeout=timeout, connection=connection)
            active = active.active() or {}
            stats = {}
            if active:  # only those: done when each has answered
                stats = app.control.inspect(
                    destination=list(active),
                    limit=len(active),
                    timeout=timeout,
                    connection=connection,
                ).stats()
    except Exception as exc:
        return [], one_line(exc)
    return [
        _worker(name, active[name] or [], (stats or {}).get(name) or {})
        for name in sorted(active)
    ], None
