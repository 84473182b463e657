"""A small shop whose orders are confirmed by a background task."""

from pyramid.config import Configurator


def main(global_config, **settings):
    """Return the WSGI application (``use = egg:...`` / ``call:demo_app:main``)."""
    with Configurator(settings=settings) as config:
        config.include(".models")
        config.include("pyramid_tasks")
        config.include(".routes")
        config.scan()
    return config.make_wsgi_app()
