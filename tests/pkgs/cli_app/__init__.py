"""Small apps for the ``tasks-celery`` and loader tests (``tests/ini/*.ini``).

``main`` includes pyramid_tasks and registers :func:`ping`; ``with_engine``
also keeps a SQLAlchemy engine in the registry and records every
:class:`~pyramid_tasks.WorkerProcessInit`; ``without_tasks`` forgets
``config.include('pyramid_tasks')``; ``plain`` is not a Pyramid app at all;
``wrap`` is a PasteDeploy filter, so a pipeline hides the router's registry.
"""

import functools

import sqlalchemy
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPNoContent

from pyramid_tasks import WorkerProcessInit, task


@task()
def ping():
    """Registered, never run: the tests read the app's task list."""


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_tasks")
        config.scan("tests.pkgs.cli_app")
    return config.make_wsgi_app()


def _record_worker_process_init(event):
    engine = event.registry["cli_app.engine"]
    event.registry["cli_app.events"].append((event, engine.pool.checkedin()))


def with_engine(global_config, **settings):
    url = settings.pop("cli_app.sqlalchemy_url")
    with Configurator(settings=settings) as config:
        config.include("pyramid_tasks")
        config.scan("tests.pkgs.cli_app")
        config.registry["cli_app.engine"] = sqlalchemy.create_engine(url)
        config.registry["cli_app.events"] = []
        config.add_subscriber(_record_worker_process_init, WorkerProcessInit)
    return config.make_wsgi_app()


def without_tasks(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.add_route("home", "/")
    return config.make_wsgi_app()


def plain(global_config, **settings):
    """A WSGI app that is not a Pyramid app."""
    return HTTPNoContent()


def wrap(global_config, **settings):
    def filter_(app):
        # A WSGI callable in front of the router, without its .registry.
        return functools.partial(app)

    return filter_
