"""The app the docs' Python examples call ``myapp``: the names they take as
given (models, tasks, views, a security policy...), so that
``tests/test_docs_python.py`` can run each example against a real app.

The tasks and helpers are stand-ins: what the examples do with them is
scheduling, routing and registering, never running their bodies.
"""

from pyramid.config import Configurator


def main(global_config, **settings):
    """The app: its models, ``pyramid_tasks`` in durable mode, its tasks."""
    with Configurator(settings=settings) as config:
        config.include(".models")
        config.include("pyramid_tasks.jobs")
        config.scan(".tasks")
    return config.make_wsgi_app()
