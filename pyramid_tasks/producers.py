"""The producers of the after-commit publish: one pool per app and process,
its waits bounded by ``tasks.publish_timeout``, closed with the app.

A pool of its own, not Celery's ``app.amqp.producer_pool``, so the bounds
never reach a worker's consumer connection, whose BRPOP blocks on purpose.
"""

import functools
import os
import threading

from kombu.exceptions import LimitExceeded
from kombu.pools import ProducerPool

__all__ = ["acquire", "close", "confirmed"]

# The Redis transport options that bound each socket operation of the
# publishing connection.  Other transports ignore tasks.publish_timeout.
_REDIS_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")

# Held while a pool is looked up or created: concurrent first commits share
# one pool.  Held across fork() so a child never inherits it locked.
_lock = threading.Lock()
os.register_at_fork(
    before=_lock.acquire,
    after_in_parent=_lock.release,
    after_in_child=_lock.release,
)


class NoFreeConnection(Exception):
    """Every connection of ``celery.broker_pool_limit`` stayed in use for
    ``tasks.publish_timeout``: nothing was sent."""


def acquire(app):
    """A producer of the publish pool, as a context manager releasing it.

    Waits at most ``tasks.publish_timeout`` for a free connection (for ever
    with ``none``), then raises :class:`NoFreeConnection`.
    """
    timeout = app.pyramid_registry.pyramid_tasks_settings.publish_timeout
    pool = _pool(app)
    try:
        return pool.acquire(block=True, timeout=timeout)
    except LimitExceeded:
        raise NoFreeConnection(
            f"no broker connection was free within tasks.publish_timeout "
            f"({timeout:g} s); celery.broker_pool_limit is {pool.limit}"
        ) from None


def confirmed(app):
    """Whether the publish pool confirms its messages itself: RabbitMQ with
    ``confirm_publish`` on (:mod:`.confirms` waits once per batch)."""
    return _pool(app).pyramid_confirms


def _pool(app):
    """This process's pool of ``app``, created by the first caller.

    A forked child makes its own: it never shares the parent's sockets.
    """
    with _lock:
        pid, pool = getattr(app, "pyramid_publish_pool", (None, None))
        if pid != os.getpid():
            pool = _create(app)
            app.pyramid_publish_pool = (os.getpid(), pool)
            # Celery's own close() only forgets its connection pool.
            app.close = functools.partial(close, app)
        return pool


def _create(app):
    """A pool on the app's broker connection; on Redis, the connection has
    ``tasks.publish_timeout`` as its socket timeouts (a shorter one of the
    broker's transport options is kept) and never ``retry_on_timeout``:
    redis-py would write again a command Redis may have received.

    In durable mode a connection is tried once: kombu would otherwise try
    again for ``celery.broker_connection_timeout`` (4 s), pausing 2 s between
    tries, before the first message of a publish that sends without Celery's
    retry policy; the relay sends what was not taken."""
    registry = app.pyramid_registry
    timeout = registry.pyramid_tasks_settings.publish_timeout
    connection = app.connection_for_write()
    bounds = {}
    if connection.transport.driver_type == "redis":
        options = connection.transport_options
        bounds["retry_on_timeout"] = False
        if timeout is not None:
            bounds.update(
                (n, min(options.get(n) or timeout, timeout)) for n in _REDIS_TIMEOUTS
            )
    confirms = bool(
        connection.transport.driver_name == "py-amqp"
        and connection.transport_options.get("confirm_publish")
    )
    if confirms:
        bounds["confirm_publish"] = False
    if getattr(registry, "pyramid_tasks_jobs", None) is not None:
        bounds["max_retries"] = 0
    connection = app.connection_for_write(transport_options=bounds)
    limit = app.conf.broker_pool_limit
    pool = ProducerPool(connection.Pool(limit), limit=limit, Producer=app.amqp.Producer)
    pool.pyramid_confirms = confirms
    return pool


def close(app):
    """Close the publish pool's connections of this process, then the app
    (Celery's ``close``).  A forked child leaves its parent's sockets alone:
    closing an AMQP connection there would close it for the parent."""
    pid, pool = vars(app).pop("pyramid_publish_pool", (None, None))
    if pid == os.getpid():
        pool.force_close_all()
        pool.connections.force_close_all()
    type(app).close(app)
