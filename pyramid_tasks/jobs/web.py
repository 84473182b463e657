"""Web side of durable mode: the job rows commit with the business data.

At the commit of a transaction that scheduled tasks, the rows are inserted
through the SQLAlchemy session already joined to it (the same connection,
the same COMMIT), one INSERT executed for all of them.  After the commit
the batch is published with a short bound and the rows confirmed by the
broker are marked ``queued`` in one UPDATE, from a thread of its own; what
the broker did not take stays ``pending`` for the relay.
"""

import atexit
import logging
import os
import threading
from datetime import timedelta

from celery import current_task, signals
from celery.utils.time import maybe_make_aware
from dateutil.parser import isoparse
from pyramid.threadlocal import get_current_request
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import Session
from zope.interface import implementedBy, providedBy
from zope.sqlalchemy import mark_changed, register
from zope.sqlalchemy.datamanager import SessionDataManager

from ..datamanager import plain_json
from ..publish import publish
from ..request import close_request, make_request
from ..wire import routes_by_name
from . import log as joblog
from .events import JobCreated
from .model import PENDING, QUEUED, SCHEDULED, Job, loaded, stored, utcnow
from .store import JobTableMissing, explain_missing_table, one_line
from .workflow import WORKFLOW_HEADER

__all__ = ["JobRecorder"]

log = logging.getLogger(__name__)

# apply_async options that are not part of the message (the relay sends it
# with the rest as they were given).
_NOT_STORED = frozenset({"producer", "connection", "retry_policy"})


class JobRecorder:
    """``registry.pyramid_tasks_jobs``: durable mode of one app."""

    def __init__(self, registry, settings, store):
        self.registry = registry
        self.settings = settings
        self.store = store
        self._listened = {}

    # -- events ------------------------------------------------------------

    def listened(self, event_class):
        """Whether any subscriber listens for ``event_class`` (cached: the
        configuration is committed before the first job)."""
        try:
            return self._listened[event_class]
        except KeyError:
            found = bool(
                self.registry.adapters.subscriptions(
                    (implementedBy(event_class),), None
                )
            )
            self._listened[event_class] = found
            return found

    def notify(self, event_class, run, *extra):
        """Worker side: send ``event_class`` about ``run`` with a new request."""
        if not self.listened(event_class):
            return
        settings = self.registry.pyramid_tasks_settings
        try:
            request = make_request(self.registry, settings.site_url)
            try:
                workspace = self.store.workspace(run.workspace_id())
                self._send(
                    event_class(request, run.task, run.id, *extra, workspace=workspace)
                )
            finally:
                # Its finished callbacks: the subscribers' too.
                close_request(request, run.task.name)
        except Exception:
            log.exception(
                "Sending %s for job %s[%s] failed; the job goes on.",
                event_class.__name__,
                run.task.name,
                run.id,
            )

    def check(self, send):
        """The JSON of ``send``'s row, made at the call: what the row cannot
        hold (it is JSON, as Celery's default serializer) is refused here,
        not at the commit."""
        try:
            return _encoded(send.args, send.kwargs, send.options)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{send.task.name}.apply_async(tm=...): durable mode keeps a "
                f"job's arguments and options as JSON, and {exc}"
            ) from exc

    def created(self, send):
        """Web side: :class:`JobCreated` for ``send``, in its transaction.

        Its request is the current one when that request's ``tm`` is the
        transaction's manager (a view, a task body), else one made for it."""
        if not self.listened(JobCreated):
            return
        request = get_current_request()
        if request is not None and getattr(request, "tm", None) is send.tm:
            self._send(JobCreated(request, send.task, send.task_id, _given(send)))
            return
        settings = self.registry.pyramid_tasks_settings
        try:
            request = make_request(self.registry, settings.site_url, send.tm)
            try:
                self._send(JobCreated(request, send.task, send.task_id, _given(send)))
            finally:
                close_request(request, send.task.name, owns_tm=False)
        except Exception:
            log.exception(
                "Sending JobCreated for job %s[%s] failed; the job goes on.",
                send.task.name,
                send.task_id,
            )

    def _send(self, event):
        for handler in self.registry.adapters.subscriptions((providedBy(event),), None):
            try:
                handler(event)
            except Exception:
                log.exception(
                    "A subscriber of %s for job %s[%s] failed; the job goes on.",
                    type(event).__name__,
                    event.task_name,
                    event.job_id,
                )

    # -- rows ----------------------------------------------------------------

    def row(
        self,
        task,
        task_id,
        args,
        kwargs,
        options,
        state=PENDING,
        now=None,
        json=None,
        title=None,
        unique_key=None,
        batch=None,
        workspace=None,
    ):
        """The row of a task about to be sent, as the table keeps it (``json``:
        its JSON columns, when :meth:`check` made them already; ``batch``: a
        dict the rows of one commit share, for what they have in common)."""
        now = now or utcnow()
        return {
            "id": task_id,
            "name": task.name,
            "title": title,
            "unique_key": unique_key,
            "queue": _queue(task, args, kwargs, options, batch),
            # The task's own priority (@task(priority=...)) when not given.
            "priority": options.get("priority", task.priority),
            **(json or _encoded(args, kwargs, options)),
            "state": state,
            "attempts": 0,
            "publish_attempts": 0,
            "created_at": now,
            "eta": _eta(options, now),
            "parent_id": _workflow_id(options)
            or (_parent_id() if batch is None else batch["parent_id"]),
            "workspace": workspace,
        }

    # -- at the commit -------------------------------------------------------

    def write(self, txn, sends):
        """Insert the rows of ``sends`` in ``txn``, before anything commits.

        Through the session joined to ``txn`` on the job table's database;
        with none, on a connection of its own that commits only if the whole
        transaction does (:class:`_OwnConnection`, returned).
        """
        now = utcnow()
        pending = [s for s in sends if not s.written]
        batch = {"parent_id": _parent_id(), "routes": {}}
        rows = [self._send_row(s, now, batch) for s in pending]
        joblog.keep_rows(pending, rows)
        if not rows:  # each written at its call (unique_key=)
            return None
        session = self._joined_session(txn)
        if session is not None:
            self.store.insert(session.connection(), rows)
            mark_changed(session)  # Core writes are invisible to zope.sqlalchemy
            return None
        own = _OwnConnection(self.store.engine.connect())
        try:
            own.connection.begin()
            self.store.insert(own.connection, rows)
        except BaseException:
            own.rollback()
            raise
        return own

    def _send_row(self, send, now=None, batch=None):
        return self.row(
            send.task,
            send.task_id,
            send.args,
            send.kwargs,
            send.options,
            now=now,
            json=send.json,
            title=send.title,
            unique_key=send.unique_key,
            batch=batch,
            workspace=send.workspace,
        )

    def _joined_session(self, txn):
        for resource in txn._resources:
            if isinstance(resource, SessionDataManager) and self._on_store(
                resource.session
            ):
                return resource.session
        return None

    def _on_store(self, session):
        """Whether ``session`` writes the job table to the store's engine."""
        try:
            bind = session.get_bind(mapper=Job.__mapper__)
        except UnboundExecutionError:  # bound per mapper, not for jobs
            return False
        return getattr(bind, "engine", bind) is self.store.engine

    # -- unique_key= ---------------------------------------------------------

    def write_unique(self, txn, send):
        """Write the row of ``send`` (it has a ``unique_key``) now, in ``txn``:
        None; or, when an unfinished job holds the key, write nothing and
        return that job's id.

        Through the session joined to ``txn`` on the job table's database;
        else the current request's (``tasks.jobs.request_session``) when its
        ``tm`` is the send's, which joins it; else a session of its own
        joined to ``txn``.  The unique index makes a concurrent transaction
        writing the same key wait until this one commits or aborts.
        """
        session = self._session_in(txn, send.tm)
        row = self._send_row(send)
        existing = self.store.insert_unique(session.connection(), row)
        if existing is None:
            mark_changed(session)  # Core writes are invisible to zope.sqlalchemy
            send.written = True
            joblog.keep_rows([send], [row])
        return existing

    def write_now(self, row, tm=None, txn=None):
        """Insert ``row`` (as the table keeps it) now: in ``txn``, ``tm``'s
        open transaction, through the session joined to it (as
        :meth:`write_unique`); committed on its own without ``tm``."""
        if tm is None:
            with self.store.engine.begin() as connection:
                self.store.insert(connection, [row])
            return
        session = self._session_in(txn, tm)
        self.store.insert(session.connection(), [row])
        mark_changed(session)

    def _session_in(self, txn, tm):
        """The session joined to ``txn`` on the job table's database, else
        one for ``tm`` (:meth:`_session_for`)."""
        session = self._joined_session(txn)
        return self._session_for(tm) if session is None else session

    def _session_for(self, tm):
        request = get_current_request()
        if request is not None and getattr(request, "tm", None) is tm:
            session = getattr(request, self.settings.request_session, None)
            if session is not None and self._on_store(session):
                return session
        session = Session(bind=self.store.engine)
        register(session, transaction_manager=tm)
        return session

    def claim(self, send):
        """Without ``tm``: commit the ``pending`` row of ``send`` (it has a
        ``unique_key``) in a short transaction of its own: None; or the id of
        the unfinished job holding the key (nothing written)."""
        with self.store.engine.begin() as connection:
            return self.store.insert_unique(connection, self._send_row(send))

    # -- after the commit ----------------------------------------------------

    def publish(self, app, sends):
        """Publish committed ``sends`` within ``tasks.jobs.publish_timeout``;
        those the broker took are marked ``queued`` by the marker thread."""
        joblog.committed(joblog.SCHEDULED, sends)
        marked = set()  # id()s of the sends given to the marker

        def mark(sent):
            # Each pipeline's jobs as it goes out: the marker's UPDATE runs
            # in the database while the next pipelines are filled.
            marked.update(map(id, sent))
            _marker.put(self.store, [(s.task_id, _eta(s.options)) for s in sent])

        sent = publish(app, sends, durable=True, on_sent=mark)
        joblog.committed(joblog.PUBLISHED, sent)
        rest = [s for s in sent if id(s) not in marked]
        if rest:
            mark(rest)

    def flush(self, timeout=None):
        """Wait until the rows published so far are marked; False on timeout.

        For tests and scripts: ``registry.pyramid_tasks_jobs.flush(5)``."""
        return _marker.flush(timeout)

    def record_sent(
        self, task, task_id, args, kwargs, options, title=None, workspace=None
    ):
        """The row of a task sent at once (no ``tm``): written after the send,
        ``queued``, unless a worker already made it."""
        if task.app.conf.task_always_eager or self.store.dialect == "sqlite":
            # Eager: it ran already, and made its row.  SQLite: the caller's
            # own transaction may hold the database's one write lock, which
            # this connection would wait for; the worker makes the row.
            return
        row = self.row(
            task,
            task_id,
            args,
            kwargs,
            options,
            QUEUED,
            title=title,
            workspace=workspace,
        )
        row["published_at"] = row["created_at"]
        if row["eta"] is not None and row["eta"] > row["created_at"]:
            row["state"] = SCHEDULED
        try:
            with explain_missing_table(self.store.engine):
                self.store.insert_missing([row])
        except JobTableMissing as exc:
            log.error("Job %s[%s] was sent with no row: %s", task.name, task_id, exc)
        except Exception as exc:
            log.warning(
                "Job %s[%s] was sent; its row could not be written (the worker "
                "that starts it will): %s",
                task.name,
                task_id,
                one_line(exc),
            )


class _OwnConnection:
    """Job rows of a transaction that joined no session on their database:
    committed in ``tpc_finish``, after every resource voted, rolled back on
    abort."""

    def __init__(self, connection):
        self.connection = connection

    def commit(self):
        try:
            self.connection.commit()
        except Exception as exc:
            # The transaction has committed everywhere else: its tasks are
            # still sent, and a worker makes each row as it starts the job.
            log.error(
                "The job rows of a committed transaction could not be committed: %s",
                one_line(exc),
            )
        finally:
            self.connection.close()

    def rollback(self):
        try:
            self.connection.rollback()
        finally:
            self.connection.close()


# Seconds the marker waits, once something was published, for what the
# next commits publish: under load one UPDATE marks many commits' rows
# (0.25 s rather than 0.05 s: bench/README.rst, P5 web, 2026-12-04).
MARK_LINGER = 0.25


class _Marker:
    """Marks published rows ``queued`` from a thread of its own, so the
    request that committed them never waits for that UPDATE: one UPDATE per
    job store for everything published within :data:`MARK_LINGER` of the
    first (at once when someone waits in :meth:`flush`).

    A mark that never happens (the process killed first) leaves the row
    ``pending``: the relay sends it again after ``tasks.jobs.relay_grace``
    unless a worker started it, and the transactional classes absorb the
    second delivery.  At a normal exit the marks are flushed (2 s at most).
    """

    def __init__(self):
        self.condition = threading.Condition()
        self.items = []
        self.busy = False
        self.flushing = 0
        self.pid = None

    def put(self, store, sent):
        with self.condition:
            # Only the first of a batch wakes the thread (it waits for
            # items, then lingers for the rest): a wake-up at every commit
            # would cost the committing thread a switch of threads.
            if not self.items:
                self.condition.notify_all()
            self.items.append((store, sent))
            if self.pid != os.getpid():  # the first mark, or a forked child's
                self.pid = os.getpid()
                threading.Thread(
                    target=self._run, name="pyramid_tasks-marker", daemon=True
                ).start()

    def flush(self, timeout=None):
        with self.condition:
            self.flushing += 1
            self.condition.notify_all()
            try:
                return self.condition.wait_for(
                    lambda: not self.items and not self.busy, timeout
                )
            finally:
                self.flushing -= 1

    def _run(self):
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.items)
                self.condition.wait_for(lambda: self.flushing, MARK_LINGER)
                items, self.items = self.items, []
                self.busy = True
            try:
                self.mark(items)
            finally:
                with self.condition:
                    self.busy = False
                    self.condition.notify_all()

    @staticmethod
    def mark(items):
        by_store = {}
        for store, sent in items:
            by_store.setdefault(store, []).extend(sent)
        for store, sent in by_store.items():
            try:
                store.mark_published(sent)
            except Exception as exc:
                log.warning(
                    "%d committed job(s) were sent but not marked queued (the "
                    "relay may send them again): %s",
                    len(sent),
                    one_line(exc),
                )

    def forget(self):
        """In a forked child: a lock and a list of its own, no thread yet
        (the parent's marks are the parent's to make)."""
        self.condition = threading.Condition()
        self.items = []
        self.busy = False
        self.flushing = 0
        self.pid = None


_marker = _Marker()
atexit.register(_marker.flush, 2)
os.register_at_fork(after_in_child=_marker.forget)
# A prefork child ends with os._exit(): atexit never runs there.
signals.worker_process_shutdown.connect(lambda **kwargs: _marker.flush(2), weak=False)


def _stored_options(options):
    """``options`` as the row keeps them: JSON, a kombu ``Queue`` or
    ``Exchange`` by its name (the relay publishes to that name)."""
    stored = {}
    for key, value in options.items():
        if key in _NOT_STORED:
            continue
        if key in ("queue", "exchange") and not isinstance(value, str | None):
            value = getattr(value, "name", value)
        stored[key] = value
    return stored


def _queue(task, args, kwargs, options, batch=None):
    queue = options.get("queue")
    if isinstance(queue, str):
        return queue
    if queue is not None:
        return getattr(queue, "name", str(queue))
    routes = None if batch is None else batch["routes"]
    if routes is not None and task.name in routes:
        return routes[task.name]
    try:
        route = task.app.amqp.router.route(options, task.name, args, kwargs)
        name = route["queue"].name
    except Exception:  # a router that fails fails again at the publish
        return None
    if routes is not None and routes_by_name(task.app):
        routes[task.name] = name
    return name


def _eta(options, now=None):
    eta = options.get("eta")
    if eta is not None:
        if isinstance(eta, str):
            eta = isoparse(eta)
        return maybe_make_aware(eta)
    countdown = options.get("countdown")
    if countdown:
        return (now or utcnow()) + timedelta(seconds=countdown)
    return None


def _encoded(args, kwargs, options):
    if plain_json(args, kwargs):  # flat JSON values (most calls): as they are
        encoded = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    else:
        encoded = stored({"args": list(args or ()), "kwargs": dict(kwargs or {})})
    encoded.update(stored({"options": _stored_options(options)}))
    return encoded


def _given(send):
    """The workspace ``send`` was given, as its runs will read it."""
    if send.workspace is None:
        return None
    return loaded({"workspace": send.workspace})["workspace"]


def _workflow_id(options):
    """The id of the workflow whose step this send is, or None."""
    headers = options.get("headers")
    if not headers or WORKFLOW_HEADER not in headers:
        return None
    return headers[WORKFLOW_HEADER]["id"]


def _parent_id():
    task = current_task
    request = getattr(task, "request", None) if task else None
    return getattr(request, "id", None)
