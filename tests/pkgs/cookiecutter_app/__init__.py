"""A pyramid-cookiecutter-starter app (sqlalchemy, jinja2) with pyramid_tasks
added as the docs say: the generated layout, one model, a view that schedules a
task on commit, and the generated ``pshell.py``."""

from pyramid.config import Configurator


def main(global_config, **settings):
    """This function returns a Pyramid WSGI application."""
    with Configurator(settings=settings) as config:
        config.include("pyramid_jinja2")
        config.include("pyramid_tasks")
        config.include(".routes")
        config.include(".models")
        config.scan()
    return config.make_wsgi_app()
