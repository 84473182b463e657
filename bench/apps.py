"""The two apps the worker scenarios compare: plain Celery and pyramid_tasks.

Both run the same work on the same broker and database: a no-op, and one
INSERT through SQLAlchemy.  Settings come from the environment (plain) and
from ``bench/bench.ini`` with ``--var`` (ours).  ``bench.durable = true``
includes ``pyramid_tasks.jobs`` (durable mode, scenarios P5 and P9).
"""

import os

import redis
from celery import Celery
from pyramid.config import Configurator
from pyramid.settings import asbool
from sqlalchemy import create_engine, insert
from sqlalchemy.orm import sessionmaker

from pyramid_tasks import PyramidTask, RetryableTransactionTask
from pyramid_tasks.sqlalchemy import get_tm_session, mark_changed, register_factory

from .schema import rows


def _engine(url, schema):
    engine = create_engine(url)
    return engine.execution_options(schema_translate_map={None: schema})


# -- plain Celery: ``celery -A bench.apps:plain worker`` -------------------------
plain = Celery("bench_plain", set_as_current=False)
plain.conf.broker_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
plain.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "bench")
plain.conf.worker_hijack_root_logger = False
_plain_sessions = None


def _plain_session():
    global _plain_sessions
    if _plain_sessions is None:
        engine = _engine(os.environ["BENCH_DATABASE_URL"], os.environ["BENCH_SCHEMA"])
        _plain_sessions = sessionmaker(bind=engine)
    return _plain_sessions()


@plain.task(name="bench.noop", shared=False)
def plain_noop():
    return None


@plain.task(name="bench.insert", shared=False)
def plain_insert(n):
    with _plain_session() as session:
        session.execute(insert(rows).values(n=n))
        session.commit()


@plain.task(name="bench.done", shared=False)
def plain_done(key):
    redis.Redis.from_url(plain.conf.broker_url).set(key, 1)


# -- pyramid_tasks: ``tasks-celery bench/bench.ini --var ... -- worker`` -----------
def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("pyramid_tasks")
        engine = _engine(settings["bench.database_url"], settings["bench.schema"])
        # zope.sqlalchemy's listeners once on the factory; each session
        # carries its request's manager (the cookiecutter registers each
        # session: about 0.1 ms a task).
        factory = register_factory(sessionmaker(bind=engine))
        config.registry["bench_dbsession_factory"] = factory
        if asbool(settings.get("bench.durable", False)):
            config.registry.settings.setdefault(
                "tasks.jobs.session_factory", "bench_dbsession_factory"
            )
            config.include("pyramid_tasks.jobs")

        def dbsession(request):
            return get_tm_session(factory, request.tm, request=request)

        config.add_request_method(dbsession, reify=True)
        config.add_task(noop, bind=True, base=PyramidTask, name="bench.noop")
        config.add_task(
            insert_row, bind=True, base=RetryableTransactionTask, name="bench.insert"
        )
        config.add_task(done, bind=True, base=PyramidTask, name="bench.done")
    return config.make_wsgi_app()


def noop(self):
    self.get_request()  # build (and close) the request, as a real task would


def insert_row(self, n):
    self.get_request().dbsession.execute(insert(rows).values(n=n))
    mark_changed(self.get_request().dbsession)


def done(self, key):
    redis.Redis.from_url(self.app.conf.broker_url).set(key, 1)
