"""Worker side of durable mode: a retried job is never lost to an old
revoke, and a job revoked through Celery is not left waiting for ever.

``jobs cancel`` revokes the job's id at the workers, and each keeps it for
hours (longer with a ``--statedb``, and a worker starting later learns it
from its peers).  ``jobs retry`` sends the job again under the same id and
asks the workers to forget the revoke, but nothing orders that broadcast
before the message: a worker still holding the revoke drops the message
(Celery acknowledges it) and the job would wait ``queued`` for ever.

Celery reports each dropped delivery in the worker's main process (the
``task_revoked`` signal, whatever the pool).  The message tells the two
revokes apart: ``retry`` marks the job's message with the
:data:`RETRIED_HEADER` header (kept in the row's options, so every later
send of the job carries it).  A marked message of a job still waiting
(``pending``, ``queued``, ``scheduled``, ``retrying``) is sent again at
once and the revoke forgotten in this worker.  An unmarked one of a waiting
job was revoked by its user through Celery (``AsyncResult.revoke()``,
``celery control revoke``): the job is marked ``cancelled``, as the revoke
asked.  A cancelled, finished or started job, or a task without a row, stays
dropped.
"""

import logging
import queue
import threading

from celery import signals
from celery.utils.time import maybe_iso8601
from celery.worker import state as worker_state
from sqlalchemy import select, update

from ..publish import publish
from . import log as joblog
from .model import CANCELLED, PENDING, QUEUED, RETRYING, SCHEDULED, Job, loaded, utcnow
from .relay import Relay
from .store import one_line

__all__ = ["RETRIED_HEADER", "install", "send_again"]

log = logging.getLogger(__name__)

_table = Job.__table__
_c = _table.c

#: The states of a job whose dropped message must go out again.
WAITING = (PENDING, QUEUED, SCHEDULED, RETRYING)

#: The message header (and ``options["headers"]`` key of the row) that marks
#: a job ``retry`` sent again: a worker that drops it under an old revoke
#: sends it again.
RETRIED_HEADER = "pyramid_tasks_retried"


def install(app):
    """Send again the waiting jobs of ``app`` a worker drops as revoked."""
    drops = queue.SimpleQueue()
    thread = []

    def on_revoked(sender=None, request=None, terminated=False, expired=False, **kw):
        # Expired, or terminated while it ran: not a revoke a retry undoes.
        # Read now: an unrevoke arriving later must not hide this drop.
        if (
            sender.app is not app
            or terminated
            or expired
            or request.id not in worker_state.revoked  # by a stamped header
        ):
            return
        eta = maybe_iso8601(request.eta) if request.eta else None
        retried = bool(getattr(request, RETRIED_HEADER, None))
        drops.put((app, sender, request.id, eta, request.retries, retried))
        if not thread:
            # One thread, off the consumer's: a slow or locked database
            # (SQLite's writer is a running job's transaction) never stalls
            # consumption, and a burst of drops never a pool of connections.
            thread.append(
                threading.Thread(
                    target=_send_drops,
                    args=(drops,),
                    name="pyramid_tasks-revoked",
                    daemon=True,
                )
            )
            thread[0].start()

    signals.task_revoked.connect(on_revoked, weak=False)
    return on_revoked


def _send_drops(drops):
    while True:
        send_again(*drops.get())


def send_again(app, task, job_id, eta=None, retries=0, retried=True):
    """The delivery of ``job_id`` (``task``'s, with its ``eta`` and Celery
    ``retries``) was dropped as revoked by its id: when the job waits to
    run, forget the revoke here and send it again (True); a send the broker
    refuses leaves it ``pending`` for the relay.  A message not ``retried``
    (without :data:`RETRIED_HEADER`) was revoked through Celery: a waiting
    job is marked ``cancelled`` instead (False)."""
    store = app.pyramid_registry.pyramid_tasks_jobs.store
    try:
        with store.engine.begin() as connection:
            if not retried:
                return _cancel(store, connection, task, job_id)
            # The row stays locked (the relay skips it) until it is marked.
            waiting = connection.execute(
                update(_table)
                .where(_c.id == job_id, _c.state.in_(WAITING))
                .values(state=PENDING, publish_after=None)
            ).rowcount
            if not waiting:  # cancelled, finished, started, or no row
                _stays_dropped(store, connection, task, job_id)
                return False
            worker_state.revoked.discard(job_id)
            row = connection.execute(select(_table).where(_c.id == job_id)).one()
            row = loaded(row._asdict())
            if eta is not None:  # a retry()'s or a countdown's: kept
                row["eta"] = eta
            sends, _unknown = Relay(app).sends([row])
            for send in sends:
                send.options["retries"] = retries
                # Marked as the dropped message was (its row's options are).
                headers = send.options.get("headers") or {}
                send.options["headers"] = {**headers, RETRIED_HEADER: True}
            sent = publish(app, sends, durable=True) if sends else []
            store.relayed(connection, [(s.task_id, s.row["eta"]) for s in sent])
    except Exception as exc:
        log.error(
            "Job %s[%s] was dropped as revoked and its row could not be read "
            "or written (%s): if it was retried and does not run, cancel it "
            "and retry it again.",
            task.name,
            job_id,
            one_line(exc),
        )
        return False
    log.warning(
        "Job %s[%s] was retried after its cancel; this worker still held the "
        "revoke: %s.",
        task.name,
        job_id,
        "sent again" if sent else "left pending for the relay",
    )
    return True


def _cancel(store, connection, task, job_id):
    """The user revoked ``job_id`` through Celery: a waiting job never runs."""
    cancelled = connection.execute(
        update(_table)
        .where(_c.id == job_id, _c.state.in_(WAITING))
        .values(state=CANCELLED, finished_at=utcnow())
    ).rowcount
    if not cancelled:  # cancelled, finished, started, or no row
        _stays_dropped(store, connection, task, job_id)
        return False
    row = connection.execute(
        select(_c.name, _c.queue, _c.title).where(_c.id == job_id)
    ).one()
    joblog.line(
        joblog.CANCELLED,
        job_id,
        row.name,
        row.queue,
        row.title,
        "(revoked through Celery while it waited)",
    )
    return False


def _stays_dropped(store, connection, task, job_id):
    state = store.state(job_id, connection)
    log.info(
        "Job %s[%s] is %s: its revoked message stays dropped.",
        task.name,
        job_id,
        state or "not in the job table",
    )
