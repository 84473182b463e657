"""The relay: a thread in each worker and beat process that sends again what
never reached the broker, and re-queues jobs whose worker died.

Each round, in one short transaction: ``started`` jobs whose lease expired
(no heartbeat for ``tasks.jobs.lease``) go back to ``pending``; then the
``pending`` rows older than ``tasks.jobs.relay_grace`` are claimed (``FOR
UPDATE SKIP LOCKED`` on PostgreSQL, so relays never share a row), published,
and marked ``queued``; a row whose publish failed backs off, and is ``dead``
after ``tasks.jobs.publish_attempts``.
"""

import logging
import threading

from celery import bootsteps, signals

from ..datamanager import Send
from ..publish import publish
from .store import JobTableMissing, explain_missing_table, one_line

__all__ = ["Relay", "RelayStep", "install"]

log = logging.getLogger(__name__)

# Rows claimed per round: bounds the time a round holds its locks.
_BATCH = 500


class Relay:
    """One relay of ``app``'s job table; :meth:`run_once` is one round."""

    def __init__(self, app):
        self.app = app
        self.jobs = app.pyramid_registry.pyramid_tasks_jobs
        self.settings = self.jobs.settings
        self.stopped = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(
            target=self._loop, name="pyramid_tasks-relay", daemon=True
        )
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(10)

    def _loop(self):
        store = self.jobs.store
        log.info(
            "Job relay started: every %g s, on %s.",
            self.settings.relay_interval,
            store.engine.url.render_as_string(hide_password=True),
        )
        wait = self.settings.relay_interval
        while not self.stopped.wait(wait):
            try:
                with explain_missing_table(store.engine):
                    self.run_once()
            except Exception as exc:
                # Failing rounds back off, up to a minute, and come back to
                # the interval at the first round that works.
                wait = min(max(60.0, self.settings.relay_interval), wait * 2)
                missing = isinstance(exc, JobTableMissing)
                log.log(
                    logging.ERROR if missing else logging.WARNING,
                    "The job relay's round failed (tried again in %g s): %s",
                    wait,
                    one_line(exc),
                )
            else:
                wait = self.settings.relay_interval

    def run_once(self):
        """One round: ``(rescued, sent, dead)`` counts."""
        store = self.jobs.store
        with store.engine.begin() as connection:
            rescued = store.expired_leases(connection, self.settings.lease, _BATCH)
        for job_id, name, worker, state in rescued:
            if state == "pending":
                log.warning(
                    "Job %s[%s] was started by %s, which sent no heartbeat for "
                    "%g s: re-queued.",
                    name,
                    job_id,
                    worker,
                    self.settings.lease,
                )
            else:
                log.error(
                    "Job %s[%s] was started by %s, which sent no heartbeat for "
                    "%g s: failed, its worker lost %d times "
                    "(tasks.jobs.lost_attempts).",
                    name,
                    job_id,
                    worker,
                    self.settings.lease,
                    self.settings.lost_attempts,
                )
        dead_count = 0
        with store.engine.begin() as connection:
            rows = store.claim_pending(connection, self.settings.relay_grace, _BATCH)
            sends, unknown = self.sends(rows)
            sent = publish(self.app, sends, durable=True) if sends else []
            store.relayed(connection, [(s.task_id, s.row["eta"]) for s in sent])
            sent_ids = {s.task_id for s in sent}
            for send in sent:
                log.warning(
                    "Job %s[%s] was committed but not at the broker: the relay sent it."
                    if not send.row["attempts"]
                    else "Job %s[%s] was re-queued: the relay sent it again.",
                    send.task.name,
                    send.task_id,
                )
            for row in [s.row for s in sends if s.task_id not in sent_ids] + unknown:
                left = self.settings.publish_attempts - row["publish_attempts"]
                if store.relay_failed(connection, row, left):
                    dead_count += 1
                    log.error(
                        "Job %s[%s] is dead: the relay could not send it in %d "
                        "attempts.",
                        row["name"],
                        row["id"],
                        row["publish_attempts"] + 1,
                    )
        return len(rescued), len(sent), dead_count

    def sends(self, rows):
        """The sends of job ``rows`` as the table keeps them (its options, its
        first queue, its eta), each with its ``row``; and the rows whose task
        is not registered here.  What the relay publishes, and what the
        operators' retry and a worker's re-send of a dropped job publish."""
        sends, unknown = [], []
        for row in rows:
            task = self.app.tasks.get(row["name"])
            if task is None:
                log.warning(
                    "Job %s[%s]: no task of that name is registered here.",
                    row["name"],
                    row["id"],
                )
                unknown.append(row)
                continue
            options = dict(row["options"] or {})
            if row["queue"] and not options.get("queue"):
                options["queue"] = row["queue"]  # as it was routed first
            if row["eta"] is not None:  # a countdown counts from the call
                options.pop("countdown", None)
                options["eta"] = row["eta"]
            send = _RelaySend(
                task, row["args"] or (), row["kwargs"] or {}, options, row["id"], None
            )
            send.row = row
            sends.append(send)
        return sends, unknown


class _RelaySend(Send):
    row: dict = None


class RelayStep(bootsteps.StartStopStep):
    """Worker bootstep: the relay runs in the worker's main process."""

    label = "pyramid_tasks job relay"

    def __init__(self, worker, **kwargs):
        self.relay = None
        # Before any step starts: a beat this worker embeds (``worker
        # --beat``, forked or a thread) sees it and runs no relay of its own.
        worker.app.pyramid_worker_relay = True

    def start(self, worker):
        self.relay = Relay(worker.app).start()

    def stop(self, worker):
        if self.relay is not None:
            self.relay.stop()


def install(app):
    """Run the relay in ``app``'s worker and beat processes.

    One a worker: the beat that ``worker --beat`` embeds runs none (its
    worker's does the work), so a worker on SQLite, which has no ``SKIP
    LOCKED``, runs one relay.
    """
    app.steps["worker"].add(RelayStep)

    def start_in_beat(sender=None, **kwargs):
        if (
            sender is not None
            and sender.app is app
            and not getattr(app, "pyramid_worker_relay", False)
        ):
            app.pyramid_beat_relay = Relay(app).start()

    signals.beat_init.connect(start_in_beat, weak=False)
