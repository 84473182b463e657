"""zope.sqlalchemy registered once per session factory, not once per session.

The cookiecutter's ``get_tm_session`` calls ``zope.sqlalchemy.register`` on
every new session: seven event listeners attached to that one session, about
0.1 ms a request or task. Here they are attached to the factory once, and each
session names its transaction manager in ``session.info``::

    from pyramid_tasks.sqlalchemy import get_tm_session, register_factory

    factory = register_factory(sessionmaker(bind=engine))

    def dbsession(request):
        return get_tm_session(factory, request.tm, request=request)

Each listener behaves exactly as zope.sqlalchemy's own, with the session's
manager.  A session of a registered factory made without a manager raises
:class:`NoTransactionManager` on first use (a query, ``add()``).
"""

import weakref

from sqlalchemy import event
from zope.sqlalchemy.datamanager import STATUS_ACTIVE, ZopeTransactionEvents
from zope.sqlalchemy.datamanager import mark_changed as _mark_changed

__all__ = [
    "TM_KEY",
    "NoTransactionManager",
    "get_tm_session",
    "mark_changed",
    "register_factory",
]

#: The key of a session's transaction manager in ``session.info``.
TM_KEY = "transaction_manager"


class NoTransactionManager(LookupError):
    """A session of a registered factory has no manager in ``session.info``."""


# The listeners of each registered factory (a sessionmaker or a Session
# subclass): registering twice would attach every listener twice.
_registered = weakref.WeakKeyDictionary()

# Where get_tm_session() leaves a session's listeners, for mark_changed().
_EVENTS_KEY = "pyramid_tasks.sqlalchemy.events"


def register_factory(factory, initial_state=STATUS_ACTIVE, keep_session=False):
    """Join every session ``factory`` makes to its own transaction manager.

    ``factory`` is a ``sessionmaker`` or a ``Session`` subclass;
    ``initial_state`` and ``keep_session`` mean what they mean to
    ``zope.sqlalchemy.register``.  Registering again does nothing.  Returns
    ``factory``.
    """
    if factory in _registered:
        return factory
    events = _registered[factory] = _FactoryEvents(initial_state, keep_session)
    for name in _EVENTS:
        event.listen(factory, name, getattr(events, name))
    return factory


def get_tm_session(session_factory, transaction_manager, request=None):
    """A new session of a registered factory, joined to ``transaction_manager``.

    The cookiecutter's ``get_tm_session``, with the same arguments, minus the
    per-session registration.  A factory nobody registered is refused: its
    sessions would join no transaction and their writes would be lost.
    """
    events = _events_of(session_factory)
    if events is None:
        raise TypeError(
            f"get_tm_session() needs a session factory registered with "
            f"pyramid_tasks.sqlalchemy.register_factory, not {session_factory!r}: "
            "register it once, where it is made."
        )
    info = {TM_KEY: transaction_manager, "request": request, _EVENTS_KEY: events}
    return session_factory(info=info)


def mark_changed(session):
    """``zope.sqlalchemy.mark_changed`` with the session's own manager.

    Call it after writing with Core or ``text()``, which zope.sqlalchemy
    cannot see: without it the commit rolls those writes back.
    """
    events = session.info.get(_EVENTS_KEY)
    if events is None:  # made without get_tm_session: zope's defaults
        _mark_changed(session, _manager(session))
    else:  # joins, if it must, with the factory's own keep_session
        events.mark_changed(session)


def _events_of(factory):
    """The listeners registered for ``factory``, or for its Session class."""
    class_ = getattr(factory, "class_", factory)  # a sessionmaker's class
    candidates = (factory, *getattr(class_, "__mro__", ()))
    for candidate in candidates:
        try:
            events = _registered.get(candidate)
        except TypeError:  # not weakly referenceable: never registered
            continue
        if events is not None:
            return events
    return None


def _manager(session):
    try:
        return session.info[TM_KEY]
    except KeyError:
        raise NoTransactionManager(
            f"This session's factory was registered with pyramid_tasks."
            f"sqlalchemy.register_factory, but the session has no "
            f"session.info[{TM_KEY!r}]: make it with get_tm_session(factory, "
            f"request.tm) or factory(info={{{TM_KEY!r}: tm}})."
        ) from None


_EVENTS = (
    "after_begin",
    "after_attach",
    "after_flush",
    "after_bulk_update",
    "after_bulk_delete",
    "before_commit",
    "do_orm_execute",
)


class _FactoryEvents:
    """zope.sqlalchemy's listeners, each run with its session's own manager."""

    def __init__(self, initial_state, keep_session):
        self.initial_state = initial_state
        self.keep_session = keep_session

    def _events(self, session):
        # A plain object of three attributes: cheaper than caching it.
        return ZopeTransactionEvents(
            self.initial_state, _manager(session), self.keep_session
        )

    def mark_changed(self, session):
        self._events(session).mark_changed(session)

    def after_begin(self, session, transaction, connection):
        self._events(session).after_begin(session, transaction, connection)

    def after_attach(self, session, instance):
        self._events(session).after_attach(session, instance)

    def after_flush(self, session, flush_context):
        self._events(session).after_flush(session, flush_context)

    def after_bulk_update(self, update_context):
        self._events(update_context.session).after_bulk_update(update_context)

    def after_bulk_delete(self, delete_context):
        self._events(delete_context.session).after_bulk_delete(delete_context)

    def before_commit(self, session):
        self._events(session).before_commit(session)

    def do_orm_execute(self, execute_state):
        self._events(execute_state.session).do_orm_execute(execute_state)
