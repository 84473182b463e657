"""A small shop whose orders are confirmed, expired and reported on by tasks."""

import os

from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy

from .security import LocalOperatorPolicy

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
        # The jobs dashboard (conf/local.ini includes it) needs a security
        # policy and a place for its CSRF tokens: the local user operates.
        config.set_security_policy(LocalOperatorPolicy())
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        config.include(".models")
        # conf/local.ini and conf/development.ini add durable mode with
        # ``pyramid.includes = pyramid_tasks.jobs``: the same as
        # config.include("pyramid_tasks.jobs") here.
        config.include("pyramid_tasks")
        config.include(".routes")
        config.scan()
    return config.make_wsgi_app()
