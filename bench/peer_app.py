"""The same work on ``pyramid_celery`` 4 (scenario 8), run in its own virtualenv.

Only imported by workers started from ``bench/.peer-venv``, where
``pyramid_celery`` is installed (it cannot share one with pyramid_tasks).
"""

import redis
from pyramid.config import Configurator
from pyramid_celery import celery_app as app
from sqlalchemy import create_engine, insert
from sqlalchemy.orm import sessionmaker

from .schema import rows

_sessions = None


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.include("pyramid_celery")
    config.configure_celery(global_config["__file__"])
    return config.make_wsgi_app()


def _session():
    global _sessions
    if _sessions is None:
        settings = app.conf["PYRAMID_REGISTRY"].settings
        engine = create_engine(settings["bench.database_url"]).execution_options(
            schema_translate_map={None: settings["bench.schema"]}
        )
        _sessions = sessionmaker(bind=engine)
    return _sessions()


@app.task(name="bench.noop")
def noop():
    return None


@app.task(name="bench.insert")
def insert_row(n):
    with _session() as session:
        session.execute(insert(rows).values(n=n))
        session.commit()


@app.task(name="bench.done")
def done(key):
    redis.Redis.from_url(app.conf.broker_url).set(key, 1)
