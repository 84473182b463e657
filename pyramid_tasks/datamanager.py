"""Web side: tasks scheduled in a transaction, sent after it commits.

The pending list is a savepoint-aware data manager joined to the transaction;
one after-commit hook publishes the whole batch through one producer.
"""

from dataclasses import dataclass, field

from dateutil.parser import isoparse
from kombu.exceptions import EncodeError
from kombu.serialization import dumps, loads

__all__ = [
    "NoActiveTransaction",
    "PendingSends",
    "current_transaction",
    "pending_sends",
    "plain_json",
    "schedule",
    "snapshot",
    "take_pending_sends",
]


# ``Transaction.status`` values (transaction's Status is not public).
_ACTIVE, _DOOMED, _COMMITTING = "Active", "Doomed", "Committing"

# Key of the PendingSends in ``Transaction.data()``: one per transaction.
_DATA_KEY = object()


class NoActiveTransaction(RuntimeError):
    """``apply_async(tm=...)`` was given a manager with no transaction open."""


@dataclass
class Send:
    """One task to publish: the arguments are a snapshot taken at the call."""

    task: object
    args: tuple
    kwargs: dict
    options: dict
    task_id: str
    tm: object
    # Run in the transaction by pyramid_tasks.testing: the commit skips it.
    # A taken send stays in the list, so savepoint lengths stay true.
    taken: bool = False
    # Durable mode: the JSON columns of its job row, made at the call.
    json: dict = None
    # Durable mode: the job's title, unique key and workspace (columns, not
    # options).
    title: str = None
    unique_key: str = None
    workspace: dict = None
    # Its row was written at the call (unique_key=): the commit skips it.
    written: bool = False


def current_transaction(tm):
    """The transaction current in ``tm``, or None; never starts one.

    An implicit (non-explicit) manager's ``get()`` would *start* a transaction
    nobody commits, so the current one is read without creating it.
    """
    manager = getattr(tm, "manager", tm)  # ThreadTransactionManager wraps one
    return manager._txn


def active_transaction(tm, task_name):
    """The open transaction of ``tm``, or :class:`NoActiveTransaction`."""
    txn = current_transaction(tm)
    if txn is None or txn.status not in (_ACTIVE, _DOOMED, _COMMITTING):
        state = (
            "no transaction" if txn is None else f"a {txn.status.lower()} transaction"
        )
        raise NoActiveTransaction(
            f"{task_name}.apply_async(tm=...) needs an open transaction, but the "
            f"transaction manager has {state}: call it inside `with tm:` (or the "
            "pyramid_tm request), or leave out tm= to send at once."
        )
    return txn


def schedule(tm, send, publish, jobs=None):
    """Add ``send`` to the pending list of ``tm``'s open transaction.

    ``publish(sends)`` runs once, after a successful commit.  With ``jobs``
    (durable mode) the sends' job rows are written in the transaction, as
    it commits (:meth:`pyramid_tasks.jobs.web.JobRecorder.write`).
    """
    txn = active_transaction(tm, send.task.name)
    try:
        pending = txn.data(_DATA_KEY)
    except KeyError:
        pending = PendingSends(tm, jobs=jobs)
        txn.set_data(_DATA_KEY, pending)
        txn.addAfterCommitHook(pending.after_commit, (publish,))
    # Rolling back a savepoint aborts and unjoins a data manager that joined
    # after it: join again, or later savepoints would not truncate the list.
    # During the commit (an ORM flush in zope.sqlalchemy's tpc_begin) nothing
    # can join, nor roll back to a savepoint: the after-commit hook suffices.
    if not pending.joined and txn.status != _COMMITTING:
        txn.join(pending)
        pending.joined = True
    pending.sends.append(send)
    if jobs is not None and txn.status == _COMMITTING and not pending.will_write:
        pending.write_late(txn, send)


@dataclass(eq=False)
class PendingSends:
    """``IDataManager`` holding the sends of one transaction.

    It owns no external resource: it only forgets its list when the
    transaction aborts and truncates it when a savepoint rolls back.
    """

    transaction_manager: object
    sends: list = field(default_factory=list)
    joined: bool = False
    jobs: object = None
    # Job rows on a connection of their own, committed in tpc_finish.
    own_rows: object = None
    # Whether commit() wrote the job rows already.
    rows_written: bool = False
    # Rows of sends scheduled during the commit, on connections of their own.
    late_rows: list = field(default_factory=list)

    @property
    def will_write(self):
        """Whether commit() will write the rows of sends added now."""
        return self.joined and not self.rows_written

    def write_late(self, txn, send):
        """The job row of ``send``, scheduled during the commit (an ORM flush
        in zope.sqlalchemy's tpc_begin or vote) after commit() wrote the rows
        or with this list not joined: written now, through the session that
        flushes, or on a connection of its own settled by the after-commit
        hook."""
        own = self.jobs.write(txn, [send])
        if own is not None:
            self.late_rows.append(own)

    def after_commit(self, committed, publish):
        late, self.late_rows = self.late_rows, []
        for own in late:
            if committed:
                own.commit()
            else:
                own.rollback()
        sends = [send for send in self.sends if not send.taken]
        self.sends = []
        if committed and sends:
            publish(sends)

    def abort(self, txn):
        self.sends.clear()
        self.joined = False
        own, self.own_rows = self.own_rows, None
        if own is not None:
            own.rollback()

    tpc_abort = abort

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        # Every resource has flushed (tpc_begin); none has committed: the
        # job rows join the database transaction of the business data.
        self.rows_written = True
        sends = [send for send in self.sends if not send.taken]
        if self.jobs is not None and sends:
            self.own_rows = self.jobs.write(txn, sends)

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        own, self.own_rows = self.own_rows, None
        if own is not None:
            own.commit()

    def sortKey(self):
        # Before zope.sqlalchemy's "~sqlalchemy:" (and any name after "p"):
        # durable mode's job rows are inserted in commit(), which must run
        # before that session's own commit() closes a session with no
        # changes marked.  It votes nothing and publishes only after every
        # resource has finished, from the after-commit hook.
        return f"pyramid_tasks:{id(self)}"

    def savepoint(self):
        return _Savepoint(self, len(self.sends))


@dataclass
class _Savepoint:
    pending: PendingSends
    length: int

    def rollback(self):
        del self.pending.sends[self.length :]


def pending_sends(tm):
    """The sends waiting for the commit of ``tm``'s open transaction."""
    return [send for send in _pending_list(tm) if not send.taken]


def take_pending_sends(tm):
    """Take and return the sends waiting in ``tm``'s open transaction.

    The commit will not send them (``pyramid_tasks.testing`` runs them in the
    test's transaction instead).  They are marked, not removed: a savepoint
    taken before still drops exactly what was scheduled after it.
    """
    sends = pending_sends(tm)
    for send in sends:
        send.taken = True
    return sends


def _pending_list(tm):
    txn = current_transaction(tm)
    if txn is None:
        return []
    try:
        return txn.data(_DATA_KEY).sends
    except KeyError:
        return []


def snapshot(task, args, kwargs, options):
    """``(args, kwargs)`` as the worker will see them, serialized now.

    A value the serializer refuses fails here, at the call site, and later
    changes to the caller's objects do not leak into the message.
    """
    _check_times(task, options)
    serializer = options.get("serializer") or task.serializer
    if serializer == "json" and plain_json(args, kwargs):
        return tuple(args or ()), dict(kwargs or {})
    try:
        content_type, encoding, data = dumps(
            (args or (), kwargs or {}), serializer=serializer
        )
    except EncodeError as exc:
        raise EncodeError(
            f"Arguments of task {task.name} cannot be serialized with "
            f"{serializer}: {exc}"
        ) from exc
    args, kwargs = loads(data, content_type, encoding, accept={content_type})
    return tuple(args), kwargs


# JSON gives these back unchanged, and they cannot change after the call.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def plain_json(args, kwargs):
    """Whether the JSON round trip of ``(args, kwargs)`` is a copy of them."""
    if type(args) not in (tuple, list, type(None)):
        return False
    if type(kwargs) not in (dict, type(None)):
        return False
    for value in args or ():
        if type(value) not in _PLAIN:
            return False
    for key, value in (kwargs or {}).items():
        if type(key) is not str or type(value) not in _PLAIN:
            return False
    return True


def _check_times(task, options):
    """Refuse at the call what Celery would only refuse when publishing."""
    if not options:
        return
    for key in ("eta", "expires"):
        value = options.get(key)
        if isinstance(value, str):
            try:
                isoparse(value)
            except ValueError as exc:
                raise ValueError(
                    f"{task.name}.apply_async({key}={value!r}): expected a "
                    "datetime or an ISO 8601 string"
                ) from exc
    countdown = options.get("countdown")
    if countdown is not None and not isinstance(countdown, int | float):
        raise TypeError(
            f"{task.name}.apply_async(countdown={countdown!r}): expected seconds"
        )
    priority = options.get("priority")
    # A message priority, and the job table's integer column: "high" would
    # fail only at the commit's INSERT (PostgreSQL) or at the publish.
    if priority is not None and (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not 0 <= priority <= 255
    ):
        raise ValueError(
            f"{task.name}.apply_async(priority={priority!r}): expected a whole "
            "number from 0 to 255"
        )
