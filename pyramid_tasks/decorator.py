"""``@task``: the venusian decorator and the handle it returns."""

import functools

import venusian
from pyramid.exceptions import ConfigurationError
from pyramid.threadlocal import get_current_registry

__all__ = ["TaskHandle", "TaskNotRegistered", "task"]


class TaskNotRegistered(RuntimeError):
    """A ``@task`` handle was used before any Pyramid app registered its task."""


class TaskHandle:
    """What ``@task`` returns: the module-level name users call.

    Once a configuration that scanned the function is committed, every
    attribute (``apply_async``, ``delay``, ``s``, ``name``...) is the Celery
    task registered on that app's Celery app.  Inside a request or a task of
    an app, that app's task is used; elsewhere, the most recently registered.
    """

    def __init__(self, func, options):
        functools.update_wrapper(self, func)
        self._options = options
        self._task = None

    def _bind(self, celery_task):
        self._task = celery_task

    def _resolve(self):
        registry = get_current_registry()
        app = getattr(registry, "celery_app", None)
        if app is not None and self._task is not None:
            found = app.tasks.get(self._task.name)
            if found is None:
                # Never another app's task: its broker, registry and database.
                raise TaskNotRegistered(
                    f"Task {self._task.name} is not registered on the Celery app "
                    f"of the current app ({registry.package_name}): scan "
                    f"{self.__module__!r} in that app's configuration."
                )
            return found
        if self._task is None:
            raise TaskNotRegistered(
                f"Task {self.__module__}.{self.__qualname__} is not registered on "
                "any Celery app yet: call config.include('pyramid_tasks') and "
                f"config.scan() the module {self.__module__!r}, then commit the "
                "configuration (config.make_wsgi_app(), bootstrap() or get_app())."
            )
        return self._task

    def __getattr__(self, name):
        # venusian and functools probe dunders on the handle: those must not
        # resolve (or fail to resolve) the task.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._resolve(), name)

    def __call__(self, *args, **kwargs):
        """Run the task body in-process, as calling a Celery task does."""
        if self._task is None and not self._options.get("bind"):
            return self.__wrapped__(*args, **kwargs)
        return self._resolve()(*args, **kwargs)

    def __repr__(self):
        return f"<@task {self.__module__}.{self.__qualname__}>"


def task(func=None, /, **options):
    """Declare a Celery task, registered when ``config.scan()`` finds it.

    The keyword arguments are Celery's task options (``name``, ``bind``,
    ``base``, ``queue``, ``time_limit``, ``autoretry_for``...); the default
    base class is :class:`pyramid_tasks.PyramidTask`.  Imperative twin:
    ``config.add_task(func, **options)``.

    .. code-block:: python

        @task(bind=True, queue="mail")
        def send_welcome(self, user_id):
            request = self.get_request()
            ...

    ``@task`` without parentheses works too, as with Celery's ``shared_task``.
    """

    def decorate(func):
        handle = TaskHandle(func, options)

        def callback(scanner, name, ob):
            config = scanner.config.with_package(ob.__module__)
            if "add_task" not in getattr(config.registry, "_directives", {}):
                raise ConfigurationError(
                    f"config.scan() found {ob!r}, but the app does not include "
                    "pyramid_tasks: add config.include('pyramid_tasks') (or "
                    "pyramid_tasks.jobs) before the scan."
                )
            config.add_task(ob, **options)

        # venusian matches callbacks by identity: attach to what we return.
        venusian.attach(handle, callback, category="pyramid", depth=depth)
        return handle

    if func is not None:  # bare @task
        depth = 2
        return decorate(func)
    depth = 1
    return decorate
