"""Configurator directives and the deferred action that builds the Celery app."""

import functools
import os
import traceback
from datetime import timedelta
from functools import cached_property

import pyramid
from celery import Celery
from celery.app.routes import prepare as prepare_routes
from celery.utils.functional import maybe_evaluate
from celery.utils.text import str_to_list
from pyramid.config import PHASE2_CONFIG
from pyramid.config.actions import ActionInfo, action_method
from pyramid.exceptions import ConfigurationError

import pyramid_tasks

from .beat import check_beat_scheduler, check_redbeat_entries
from .broker import (
    broker_required,
    check_broker,
    default_confirms,
    warn_environment_overrides,
)
from .decorator import TaskHandle
from .retry import RetryPolicy
from .schedule import parse_beat_settings, parse_schedule
from .settings import (
    JOBS_INCLUDE_KEYS,
    bad_setting,
    check_serializers,
    parse_celery_settings,
    parse_tasks_settings,
)
from .task_classes import PyramidTask

__all__ = ["add_periodic_task", "add_task", "build_celery_app", "get_celery_app"]

APP_DISCRIMINATOR = "pyramid_tasks:celery_app"
LOADER = "pyramid_tasks.loader:PyramidLoader"
# Ordering of commit: the app is built first (PHASE2), tasks are registered at
# the default order 0, periodic entries after every task has its final name,
# and the beat check last.
_PERIODIC_ORDER = 1
_CHECK_ORDER = 2


def build_celery_app(registry):
    """Build ``registry.celery_app`` from the registry's settings.

    Runs as a deferred action, so it sees the settings as they are at commit.
    An app without a broker is refused (see :func:`.broker.check_broker`),
    unless it includes ``pyramid_tasks.testing``, which never sends; loaded
    by ``tasks-celery`` it is refused even so, and in eager mode.
    """
    settings = registry.settings
    options = parse_tasks_settings(settings)
    conf = parse_celery_settings(settings)
    check_serializers(conf, options.allow_pickle)
    _default_time_limit(conf, options.default_time_limit)
    check_beat_scheduler(conf, options.queue_prefix)
    conf["beat_schedule"] = parse_beat_settings(settings)
    conf["task_default_queue"] = options.queue_name(
        conf.get("task_default_queue", "celery")
    )
    for entry in conf["beat_schedule"].values():
        _prefix_queue(options, entry.get("options", {}))
    # ``@task(queue=...)`` becomes a route of our own, consulted before the
    # app's ``task_routes`` (the precedence Celery gives the deprecated
    # ``Task.queue`` attribute).  Filled in by add_task.
    task_queues = _TaskQueues()
    routes = (task_queues, *_as_routes(conf.get("task_routes")))
    if options.queue_prefix:
        routes = (_PrefixedRoutes(routes, options.queue_name),)
    conf["task_routes"] = routes

    _make_filesystem_folders(conf)
    app = _Celery(
        registry.package_name,
        loader=LOADER,
        task_cls=PyramidTask,
        set_as_current=False,
    )
    app.conf.update(conf)
    app.Worker = type("Worker", (_PrefixedQueues, app.Worker), {})
    warn_environment_overrides(conf)
    required = broker_required.get()
    if required or getattr(registry, "pyramid_tasks_capture", None) is None:
        # pyramid_tasks.testing captures every send: the web process uses no
        # broker.  tasks-celery always does.
        check_broker(app.conf, eager_ok=not required)
    default_confirms(app)
    app.pyramid_registry = registry
    app.pyramid_task_queues = task_queues
    registry.pyramid_tasks_settings = options
    registry.pyramid_tasks_retry_policy = RetryPolicy.from_settings(options)
    registry.celery_app = app
    return app


def _default_time_limit(conf, seconds):
    """``tasks.default_time_limit`` is ``celery.task_time_limit`` under the
    name CKAN's users look for: one of the two, never both."""
    if seconds is None:
        return
    if conf.get("task_time_limit") is not None:
        raise ConfigurationError(
            "Settings tasks.default_time_limit and celery.task_time_limit are "
            "both set: keep one (tasks.default_time_limit sets "
            "celery.task_time_limit)."
        )
    soft = conf.get("task_soft_time_limit")
    if soft is not None and soft >= seconds:
        raise ConfigurationError(
            f"Setting celery.task_soft_time_limit = {soft:g} is not below "
            f"tasks.default_time_limit = {seconds:g} s: the task would be "
            "killed before its soft limit is raised in it."
        )
    conf["task_time_limit"] = seconds


class _Celery(Celery):
    """Celery, with ``tasks.queue_prefix`` applied to the queue names it is
    given where routing does not look: ``send_task(..., queue="reports")``
    (``Task.apply_async`` sends through it too) and, with
    :class:`_PrefixedQueues`, the worker's ``-Q``/``-X``.  Idempotent: a name
    that has the prefix already is kept."""

    def send_task(self, name, args=None, kwargs=None, **options):
        queue = options.get("queue")
        if isinstance(queue, str):
            settings = self.pyramid_registry.pyramid_tasks_settings
            options["queue"] = settings.queue_name(queue)
        return super().send_task(name, args, kwargs, **options)

    @cached_property
    def Beat(self):
        """``celery beat``'s application: :class:`pyramid_tasks.beat.Beat`."""
        return self.subclass_with_self("pyramid_tasks.beat:Beat")


class _PrefixedQueues:
    """Worker mixin: ``-Q a,b`` and ``-X a`` name queues without the prefix."""

    def setup_queues(self, include, exclude=None):
        queue_name = self.app.pyramid_registry.pyramid_tasks_settings.queue_name
        return super().setup_queues(
            [queue_name(queue) for queue in str_to_list(include) or ()],
            [queue_name(queue) for queue in str_to_list(exclude) or ()],
        )


# kombu's filesystem:// transport raises FileNotFoundError for a missing folder.
_FILESYSTEM_FOLDERS = {
    "data_folder_in": "data_in",
    "data_folder_out": "data_out",
    "processed_folder": "processed",
    "control_folder": "control",
}


def _make_filesystem_folders(conf):
    """Create the folders of a ``filesystem://`` broker (one host, no server)."""
    if not str(conf.get("broker_url", "")).startswith("filesystem://"):
        return
    options = conf.get("broker_transport_options", {})
    for key, default in _FILESYSTEM_FOLDERS.items():
        folder = options.get(key, default)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise bad_setting(
                f"celery.broker_transport_options.{key}",
                folder,
                "a folder that can be created",
            ) from exc


class _TaskQueues:
    """A Celery router: the queue of each task declared with ``queue=``.

    A live lookup, not a dict: Celery copies mappings when it builds its
    router, which may happen before every task is registered.
    """

    by_name = True  # its answer depends on the task's name alone

    def __init__(self):
        self.queues = {}

    def __call__(self, name, args, kwargs, options, task=None, **kw):
        return self.queues.get(name)


class _PrefixedRoutes:
    """A Celery router: the app's routes, their queue names prefixed.

    ``tasks.queue_prefix`` must reach every route, the app's own
    ``celery.task_routes`` (maps and router functions) included, or two sites
    on one broker would share a queue.
    """

    def __init__(self, routes, queue_name):
        self.routers = prepare_routes(routes)
        self.queue_name = queue_name

    @property
    def by_name(self):
        """Whether every route depends on the task's name alone."""
        from .wire import _by_name

        return all(map(_by_name, self.routers))

    def __call__(self, name, args, kwargs, options, task=None, **kw):
        for router in self.routers:
            route = maybe_evaluate(router)(name, args, kwargs, options, task=task)
            if route is None:
                continue
            if isinstance(route, str):
                return self.queue_name(route)
            if isinstance(route.get("queue"), str):
                return {**route, "queue": self.queue_name(route["queue"])}
            return route
        return None


def _as_routes(routes):
    if routes is None:
        return ()
    return tuple(routes) if isinstance(routes, list | tuple) else (routes,)


def _prefix_queue(options, task_options):
    if task_options.get("queue"):
        task_options["queue"] = options.queue_name(task_options["queue"])
    return task_options


def _task_name(obj):
    """The Celery name of a function, ``@task`` handle or name string."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, TaskHandle):
        if obj._options.get("name"):
            return obj._options["name"]
        obj = obj.__wrapped__
    return f"{obj.__module__}.{obj.__name__}"


def add_task(config, func, **options):
    """Register ``func`` (a function, ``@task`` handle or dotted name) as a task.

    ``options`` are Celery's task options, as for ``@task``; ``base`` may be
    a dotted name.  Two tasks with one name are a configuration conflict.
    """
    func = config.maybe_dotted(func)
    handle = func if isinstance(func, TaskHandle) else None
    body = handle.__wrapped__ if handle is not None else func
    if handle is not None:
        options = {**handle._options, **options}
    if not callable(body) or getattr(body, "__name__", "") == "<lambda>":
        # Celery builds the task's signature from the function's name.
        raise ConfigurationError(f"add_task() needs a named function, got {func!r}")
    if "base" in options:
        options["base"] = config.maybe_dotted(options["base"])
    name = options.get("name") or _task_name(body)
    registry = config.registry

    def register():
        app = registry.celery_app
        task_options = dict(options)
        if getattr(registry, "pyramid_tasks_jobs", None) is not None:
            from .jobs.worker import durable_task_options

            durable_task_options(task_options.get("base"), task_options)
        queue = task_options.pop("queue", None)
        celery_task = app.task(shared=False, lazy=False, **task_options)(body)
        if queue:
            queue_name = registry.pyramid_tasks_settings.queue_name(queue)
            app.pyramid_task_queues.queues[celery_task.name] = {"queue": queue_name}
        if handle is not None:
            handle._bind(celery_task)
        intr["task"] = celery_task

    intr = config.introspectable("celery tasks", name, name, "celery task")
    intr["callable"] = body
    intr["options"] = options
    config.action(
        ("pyramid_tasks:task", name), _action(register), introspectables=(intr,)
    )


def add_periodic_task(
    config, schedule, task_name_or_func, args=(), kwargs=None, name=None, **options
):
    """Add a beat entry, as ``tasks.beat.<name>.*`` settings do.

    ``schedule`` is seconds, a :class:`~datetime.timedelta`, a
    :class:`~celery.schedules.crontab` or a string in the INI grammar;
    ``task_name_or_func`` a ``@task`` handle, function or task name.  ``name``
    defaults to the task name; ``options`` are ``apply_async`` options.
    """
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule, key="add_periodic_task(schedule)")
    elif isinstance(schedule, int | float) and not isinstance(schedule, bool):
        if schedule <= 0:
            raise ConfigurationError(
                f"add_periodic_task(schedule={schedule!r}): expected seconds > 0"
            )
        schedule = timedelta(seconds=schedule)
    task_name = _task_name(task_name_or_func)
    name = name or task_name
    registry = config.registry

    def register():
        app = registry.celery_app
        if name in app.conf.beat_schedule:
            raise ConfigurationError(
                f"Beat entry {name!r} is declared twice (tasks.beat.{name}.* "
                "settings and add_periodic_task)."
            )
        app.conf.beat_schedule[name] = {
            "task": task_name,
            "schedule": schedule,
            "args": tuple(args),
            "kwargs": dict(kwargs or {}),
            "options": _prefix_queue(registry.pyramid_tasks_settings, dict(options)),
        }

    config.action(
        ("pyramid_tasks:beat", name), _action(register), order=_PERIODIC_ORDER
    )


def check_beat_tasks(registry):
    """Every beat entry names a registered task (unless Celery imports more),
    and RedBeat, if it is the scheduler, can store each."""
    app = registry.celery_app
    check_redbeat_entries(app.conf)
    if app.conf.imports or app.conf.include:
        return
    for name, entry in app.conf.beat_schedule.items():
        if entry["task"] not in app.tasks:
            raise ConfigurationError(
                f"Beat entry {name!r} runs task {entry['task']!r}, which is not "
                "registered: check its name and that its module is scanned."
            )


def check_jobs_settings(registry):
    """``tasks.jobs.*`` settings need ``pyramid_tasks.jobs``, and those of an
    include on top of it (:data:`.settings.JOBS_INCLUDE_KEYS`) that include:
    never ignored; nor are ``tasks.dashboard.*`` without the dashboard."""
    included = getattr(registry, "pyramid_tasks_jobs_includes", ())
    dashboard = sorted(k for k in registry.settings if k.startswith("tasks.dashboard."))
    if dashboard and "pyramid_tasks.dashboard" not in included:
        raise ConfigurationError(
            f"Setting {dashboard[0]} is set, but the app does not include "
            "pyramid_tasks.dashboard: add config.include('pyramid_tasks.dashboard') "
            "(or remove the setting)."
        )
    if getattr(registry, "pyramid_tasks_jobs", None) is not None:
        for name, includes in JOBS_INCLUDE_KEYS.items():
            key = f"tasks.jobs.{name}"
            if key in registry.settings and not set(includes) & set(included):
                raise ConfigurationError(
                    f"Setting {key} is set, but the app does not include "
                    f"{' or '.join(includes)}: add config.include("
                    f"'{includes[0]}') (or remove the setting)."
                )
        return
    keys = sorted(k for k in registry.settings if k.startswith("tasks.jobs."))
    if keys:
        raise ConfigurationError(
            f"Setting {keys[0]} is set, but the app does not include "
            "pyramid_tasks.jobs: add config.include('pyramid_tasks.jobs') (or "
            "remove the tasks.jobs.* settings)."
        )


def _action(func, *args):
    """A deferred action calling ``func(*args)``: a configuration error leaves
    it as a message, without the frames below it or its cause.

    Pyramid re-raises an error of a deferred action as
    ConfigurationExecutionError while it handles it, so a traceback (pserve's)
    prints the error twice, each time with its frames.  Our
    ConfigurationError is a message naming the setting, not a bug: cutting
    its traceback to this frame and dropping its ``from`` cause leaves the
    two tracebacks their last lines.  Any other error keeps everything.
    """

    @functools.wraps(func)
    def action():
        try:
            func(*args)
        except ConfigurationError as exc:
            raise exc.with_traceback(None) from None

    return action


def get_celery_app(config):
    """The Celery app of this configuration (commits pending actions first)."""
    app = getattr(config.registry, "celery_app", None)
    if app is None:
        config.commit()
        app = config.registry.celery_app
    return app


def declare(config):
    """The deferred actions of ``includeme``, located at the app's include.

    Pyramid reports an error raised in a deferred action, or a conflict, with
    the action's location: without one it says "Line 0 of file None".
    """
    _declare(config, _info=_include_info())


# Frames of these packages are skipped when locating the app's include.
_FRAMEWORK_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (pyramid, pyramid_tasks)
)


def _include_info():
    """Where the app includes pyramid_tasks: the innermost frame of its own code.

    That is the ``config.include("pyramid_tasks")`` line, or for
    ``pyramid.includes`` the ``Configurator(settings=...)`` line.
    """
    stack = traceback.extract_stack()
    frame = next(
        (f for f in reversed(stack) if not f.filename.startswith(_FRAMEWORK_DIRS)),
        stack[0],
    )
    return ActionInfo(frame.filename, frame.lineno, frame.name, frame.line or "")


@action_method
def _declare(config):
    registry = config.registry
    intr = config.introspectable(
        "celery apps", APP_DISCRIMINATOR, "celery app", "celery app"
    )
    config.action(
        APP_DISCRIMINATOR,
        _action(build_celery_app, registry),
        order=PHASE2_CONFIG,
        introspectables=(intr,),
    )
    config.action(
        "pyramid_tasks:check_beat",
        _action(check_beat_tasks, registry),
        order=_CHECK_ORDER,
    )
    config.action(
        "pyramid_tasks:check_jobs",
        _action(check_jobs_settings, registry),
        order=_CHECK_ORDER,
    )
