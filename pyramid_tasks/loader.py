"""Worker side: the Pyramid app from the INI, once per process, and fork safety."""

import gc
import logging

import plaster
from celery import signals
from celery.loaders.app import AppLoader
from pyramid.config import global_registries
from pyramid.exceptions import ConfigurationError
from sqlalchemy.engine import Engine

from .events import WorkerProcessInit
from .startup import ConsumerCheck, TimeLimitCheck, follow_ini_logging

__all__ = ["PyramidLoader", "load_celery_app"]

log = logging.getLogger(__name__)

_CELERY_CONSUMER = "celery.worker.consumer:Consumer"


class PyramidLoader(AppLoader):
    """The Celery loader of every app built by ``pyramid_tasks``.

    Configuration comes from the Pyramid settings (already applied when the
    app was built).  A worker gets the consumer that sets malformed messages
    aside (unless the app set ``worker_consumer``: it warns at start when that
    consumer does not derive from ours) and warns at start about time limits
    its pool will not enforce.  In each forked worker child it
    disposes the SQLAlchemy pools inherited from the parent and notifies
    :class:`WorkerProcessInit`.
    """

    def on_worker_init(self):
        # Worker and beat processes: before the worker reads its settings.
        conf = self.app.conf
        if conf.worker_consumer == _CELERY_CONSUMER:
            conf.worker_consumer = "pyramid_tasks.malformed:Consumer"
        self.app.steps["worker"].add(TimeLimitCheck)
        self.app.steps["worker"].add(ConsumerCheck)
        # ``worker --beat`` forks beat from the worker's main process: it
        # must not use the connections it inherited either (durable mode
        # writes the rows of beat's sends; SQLite says "disk I/O error").
        signals.beat_embedded_init.connect(_dispose_in_embedded_beat, weak=False)
        jobs = getattr(self.app.pyramid_registry, "pyramid_tasks_jobs", None)
        if jobs is not None:
            from .jobs import limits, revoked

            limits.install(self.app)
            revoked.install(self.app)
        if jobs is not None and jobs.settings.relay:
            from .jobs.relay import install

            install(self.app)

    def on_worker_process_init(self):
        disposed = _dispose_inherited_engines()
        log.debug("Disposed %d inherited SQLAlchemy engine pool(s).", disposed)
        registry = self.app.pyramid_registry
        registry.notify(WorkerProcessInit(self.app, registry))


# The pools an embedded beat inherited, never collected: Celery closed their
# descriptors when it forked beat, and closing one of those numbers again
# (as a collected connection does) could close a file beat has since opened.
_inherited_pools = []


def _dispose_in_embedded_beat(sender=None, **kwargs):
    disposed = _dispose_inherited_engines(keep=_inherited_pools)
    log.debug("Embedded beat: disposed %d inherited engine pool(s).", disposed)


def _dispose_inherited_engines(keep=None):
    # A forked child shares its parent's pooled sockets; using one from two
    # processes corrupts both sessions.  ``dispose(close=False)`` drops the
    # child's references without closing the parent's connections.  Engines
    # are found by type because the app may keep them anywhere.
    engines = [obj for obj in gc.get_objects() if isinstance(obj, Engine)]
    for engine in engines:
        if keep is not None:
            keep.append(engine.pool)
        engine.dispose(close=False)
    return len(engines)


def load_celery_app(config_uri, options=None):
    """Bootstrap the Pyramid app at ``config_uri`` and return its Celery app.

    The INI's ``[loggers]`` are applied first (Celery then leaves logging
    alone, and the worker's and beat's banners show the INI's level);
    ``options`` fill ``%(name)s`` variables.  Raises
    :class:`ConfigurationError` when the app does not include pyramid_tasks.
    """
    loader = plaster.get_loader(config_uri, protocols=["wsgi"])
    ini_logging = "loggers" in loader.get_sections()
    if ini_logging:
        loader.setup_logging(options)
        signals.setup_logging.connect(_keep_ini_logging, weak=False)
    earlier = global_registries.last
    wsgi_app = loader.get_wsgi_app(defaults=options)
    registry = getattr(wsgi_app, "registry", None)
    if registry is None and global_registries.last is not earlier:
        # Behind a filter: the registry made by this load, never one an app
        # loaded before in this process left behind.
        registry = global_registries.last
    celery_app = getattr(registry, "celery_app", None)
    if celery_app is None:
        raise ConfigurationError(
            f"The app in {config_uri} does not include pyramid_tasks: add "
            "config.include('pyramid_tasks') or pyramid.includes = pyramid_tasks."
        )
    if ini_logging:
        follow_ini_logging(celery_app)
    return celery_app


def _keep_ini_logging(**kwargs):
    """``setup_logging`` receiver: its presence stops Celery configuring logging."""
