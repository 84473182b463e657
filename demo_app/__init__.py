"""A small shop whose orders are confirmed, expired and reported on by tasks."""

import os

from pyramid.config import Configurator

# Environment variables that override INI settings (the twelve-factor way).
ENVIRONMENT = {
    "DATABASE_URL": ("sqlalchemy.url",),
    "REDIS_URL": ("celery.broker_url", "celery.result_backend"),
    "SITE_URL": ("tasks.site_url",),
}


def main(global_config, **settings):
    """Return the WSGI application (``use = egg:demo_app``)."""
    for variable, keys in ENVIRONMENT.items():
        if os.environ.get(variable):
            settings.update(dict.fromkeys(keys, os.environ[variable]))
    with Configurator(settings=settings) as config:
        config.include("pyramid_jinja2")
        config.include(".models")
        config.include("pyramid_tasks")
        # Durable mode: every task sent is a row of the job table, written
        # with the data that asked for it (registry["dbsession_factory"]).
        config.include("pyramid_tasks.jobs")
        config.include(".routes")
        config.scan()
    return config.make_wsgi_app()
