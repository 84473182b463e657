"""Tasks the broker end-to-end suite (tests/test_brokers_e2e.py) adds to
``conf/test.ini#jobs_probe`` through ``pyramid.includes``."""

import threading

import redis
from sqlalchemy import text, update
from zope.sqlalchemy import mark_changed

from demo_app.models import Order
from pyramid_tasks import PyramidTask, RetryableTransactionTask, task


def includeme(config):
    # pyramid.includes run before the app's own includes; Pyramid resolves
    # the app's include of pyramid_tasks as the same.
    config.include("pyramid_tasks")
    config.scan(__name__)


def _redis(request):
    return redis.Redis.from_url(request.registry.settings["probe.redis_url"])


def _set_status(connection, email, status):
    connection.execute(update(Order).where(Order.email == email).values(status=status))


@task(bind=True, base=RetryableTransactionTask)
def deadlocked(self, key):
    """Update the orders ``<key>:a`` then ``<key>:b``; on the first attempt
    a rival transaction holds ``b`` and waits for ``a``: PostgreSQL picks
    this transaction (the shorter ``deadlock_timeout``) as the deadlock's
    victim (SQLSTATE 40P01), and the task runs again."""
    request = self.get_request()
    session = request.dbsession
    attempt = request.transaction_attempt
    _redis(request).rpush(f"{key}:attempts", attempt)
    session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
    _set_status(session, f"{key}:a", f"task {attempt}")
    if attempt == 1:
        holds_b = threading.Event()
        engine = session.get_bind()

        def rival():
            with engine.begin() as connection:
                connection.execute(text("SET LOCAL deadlock_timeout = '10s'"))
                _set_status(connection, f"{key}:b", "rival")
                holds_b.set()
                _set_status(connection, f"{key}:a", "rival")

        threading.Thread(target=rival, daemon=True).start()
        holds_b.wait(10)
    _set_status(session, f"{key}:b", f"task {attempt}")
    mark_changed(session)
    return attempt


@task(bind=True, base=PyramidTask)
def tick(self, key):
    """The beat entry: count the runs."""
    _redis(self.get_request()).incr(key)
