"""includeme, the directives, ``@task`` handles and the deferred Celery app."""

from datetime import timedelta

import pytest
import transaction
from celery import Celery
from celery.schedules import crontab
from pyramid.config import Configurator
from pyramid.exceptions import (
    ConfigurationConflictError,
    ConfigurationError,
    ConfigurationExecutionError,
)
from pyramid.scripting import prepare
from pyramid.threadlocal import manager

from pyramid_tasks import PyramidTask, TaskNotRegistered, task
from pyramid_tasks.decorator import TaskHandle
from tests.pkgs import scanned

BROKER = "memory://"


def make_config(**settings):
    config = Configurator(settings={"celery.broker_url": BROKER, **settings})
    config.include("pyramid_tasks")
    return config


def queue_of(app, task_name):
    """The queue Celery's router sends ``task_name`` to."""
    return app.amqp.router.route({}, task_name)["queue"].name


def commit_error(config):
    """The error a deferred action raised at commit."""
    with pytest.raises(ConfigurationExecutionError) as info:
        config.commit()
    return info.value.evalue


def test_include_declares_only_and_commit_builds_the_app():
    config = make_config()
    assert not hasattr(config.registry, "celery_app")
    config.commit()
    app = config.registry.celery_app
    assert isinstance(app, Celery)
    assert app.pyramid_registry is config.registry
    assert app.main == config.registry.package_name
    assert issubclass(app.Task, PyramidTask)


def test_settings_changed_after_include_are_used():
    config = make_config()
    config.add_settings(
        {"celery.task_default_queue": "late", "celery.worker_concurrency": "3"}
    )
    app = config.get_celery_app()
    assert app.conf.task_default_queue == "late"
    assert app.conf.worker_concurrency == 3


def test_get_celery_app_request_method_and_registry_agree():
    config = make_config()
    app = config.get_celery_app()
    assert config.get_celery_app() is app
    config.make_wsgi_app()
    env = prepare(registry=config.registry)
    try:
        assert env["request"].celery_app is app
    finally:
        env["closer"]()


def test_including_twice_builds_one_app():
    config = make_config()
    config.include("pyramid_tasks")
    config.commit()
    assert isinstance(config.registry.celery_app, Celery)


def test_bad_setting_is_reported_at_commit_with_its_key():
    config = make_config(**{"celery.broker_ulr": "redis://:hunter2@example.com"})
    error = commit_error(config)
    assert isinstance(error, ConfigurationError)
    assert "celery.broker_ulr" in str(error)
    assert "did you mean celery.broker_url" in str(error)


def test_pickle_needs_opt_in():
    error = commit_error(make_config(**{"celery.task_serializer": "pickle"}))
    assert "celery.task_serializer" in str(error)
    config = make_config(
        **{"celery.task_serializer": "pickle", "tasks.allow_pickle": "true"}
    )
    assert config.get_celery_app().conf.task_serializer == "pickle"


def test_scan_registers_decorated_tasks_on_the_app():
    config = make_config()
    config.scan("tests.pkgs.scanned")
    app = config.get_celery_app()
    assert app.tasks["tests.pkgs.scanned.add"] is scanned.add._resolve()
    assert scanned.add.name == "tests.pkgs.scanned.add"
    where = app.tasks["scanned.where"]
    assert queue_of(app, "scanned.where") == "reports"
    assert queue_of(app, "tests.pkgs.scanned.add") == "celery"
    assert isinstance(where, PyramidTask)
    assert "tests.pkgs.scanned.not_a_task" not in app.tasks
    assert scanned.add(2, 3) == 5
    assert app.tasks["tests.pkgs.scanned.bare"] is scanned.bare._resolve()
    assert scanned.bare(7) == 7
    assert scanned.add.s(1, 2).task == "tests.pkgs.scanned.add"


def test_handle_resolves_to_the_current_registrys_app():
    first = make_config()
    first.scan("tests.pkgs.scanned")
    first_app = first.get_celery_app()
    second = make_config()
    second.scan("tests.pkgs.scanned")
    second_app = second.get_celery_app()

    assert scanned.add._resolve().app is second_app
    manager.push({"registry": first.registry, "request": None})
    try:
        assert scanned.add._resolve().app is first_app
    finally:
        manager.pop()


def test_handle_before_registration_names_the_task_and_the_fix():
    def orphan(x):
        return x * 2

    handle = task()(orphan)
    assert isinstance(handle, TaskHandle)
    assert handle(4) == 8  # a plain body runs in-process, as Celery's would
    with pytest.raises(TaskNotRegistered, match=r"test_config\..*orphan.*scan"):
        handle.delay(1)
    bound = task(bind=True)(orphan)
    with pytest.raises(TaskNotRegistered, match="include"):
        bound(1)
    assert not hasattr(handle, "__venusian_nothing__")
    assert "orphan" in repr(handle)


def test_add_task_takes_functions_and_dotted_names():
    def square(x):
        return x * x

    config = make_config()
    config.add_task(square, name="math.square", base="pyramid_tasks.PyramidTask")
    config.add_task("tests.pkgs.scanned.not_a_task")
    config.add_task(scanned.add, name="math.add")
    app = config.get_celery_app()
    assert app.tasks["math.square"](3) == 9
    assert app.tasks["tests.pkgs.scanned.not_a_task"]() == "plain"
    assert app.tasks["math.add"](1, 1) == 2
    introspectable = config.registry.introspector.get("celery tasks", "math.square")
    assert introspectable["task"] is app.tasks["math.square"]


@pytest.mark.parametrize("func", [42, lambda: 1])
def test_add_task_refuses_non_functions_and_lambdas(func):
    with pytest.raises(ConfigurationError, match="needs a named function"):
        make_config().add_task(func)


def test_two_tasks_with_one_name_conflict():
    def one():
        """Never runs: only the names matter."""

    def two():
        """Never runs: only the names matter."""

    config = Configurator(settings={"celery.broker_url": BROKER}, autocommit=False)
    config.include("pyramid_tasks")
    config.add_task(one, name="dup")
    config.add_task(two, name="dup")
    with pytest.raises(ConfigurationConflictError):
        config.commit()


def test_queue_prefix_applies_to_every_queue():
    config = make_config(
        **{
            "tasks.queue_prefix": "site",
            "tasks.beat.nightly.task": "tests.pkgs.scanned.add",
            "tasks.beat.nightly.schedule": "1d",
            "tasks.beat.nightly.options": '{"queue": "night"}',
        }
    )
    config.scan("tests.pkgs.scanned")
    config.add_periodic_task(60, scanned.add, name="minutely", queue="fast")
    app = config.get_celery_app()
    assert app.conf.task_default_queue == "site.celery"
    assert queue_of(app, "scanned.where") == "site.reports"
    assert app.conf.beat_schedule["nightly"]["options"] == {"queue": "site.night"}
    assert app.conf.beat_schedule["minutely"]["options"] == {"queue": "site.fast"}


def test_add_periodic_task_accepts_every_schedule_form():
    config = make_config()
    config.scan("tests.pkgs.scanned")
    config.add_periodic_task("*/15 * * * *", "tests.pkgs.scanned.add", args=(1, 2))
    config.add_periodic_task(2.5, scanned.add, name="fast")
    config.add_periodic_task(timedelta(hours=1), scanned.where, name="hourly")
    config.add_periodic_task(crontab(hour=3), "scanned.where", name="nightly")
    schedule = config.get_celery_app().conf.beat_schedule
    assert schedule["tests.pkgs.scanned.add"]["schedule"] == crontab(minute="*/15")
    assert schedule["tests.pkgs.scanned.add"]["args"] == (1, 2)
    assert schedule["fast"]["schedule"] == timedelta(seconds=2.5)
    assert schedule["hourly"] == {
        "task": "scanned.where",
        "schedule": timedelta(hours=1),
        "args": (),
        "kwargs": {},
        "options": {},
    }
    assert schedule["nightly"]["schedule"] == crontab(hour=3)


@pytest.mark.parametrize("schedule", [0, -5, "soon"])
def test_add_periodic_task_refuses_bad_schedules(schedule):
    with pytest.raises(ConfigurationError, match="add_periodic_task"):
        make_config().add_periodic_task(schedule, "x")


def test_periodic_name_taken_by_the_ini_is_an_error():
    config = make_config(
        **{
            "tasks.beat.add.task": "tests.pkgs.scanned.add",
            "tasks.beat.add.schedule": "5",
        }
    )
    config.scan("tests.pkgs.scanned")
    config.add_periodic_task(5, scanned.add, name="add")
    assert "declared twice" in str(commit_error(config))


def test_beat_entry_for_an_unknown_task_is_an_error():
    config = make_config(
        **{
            "tasks.beat.typo.task": "myapp.tasks.clenup",
            "tasks.beat.typo.schedule": "5",
        }
    )
    error = commit_error(config)
    assert "'typo'" in str(error)
    assert "myapp.tasks.clenup" in str(error)


def test_beat_check_trusts_celery_imports():
    config = make_config(
        **{
            "celery.imports": "tests.pkgs.scanned",
            "tasks.beat.later.task": "registered.on.import",
            "tasks.beat.later.schedule": "5",
        }
    )
    assert "later" in config.get_celery_app().conf.beat_schedule


def test_task_queue_option_comes_before_the_apps_routes():
    config = make_config(**{"celery.task_routes": '{"scanned.*": {"queue": "routed"}}'})
    config.scan("tests.pkgs.scanned")
    app = config.get_celery_app()
    assert queue_of(app, "scanned.where") == "reports"
    config = make_config(**{"celery.task_routes": '{"tests.pkgs.*": "routed"}'})
    config.scan("tests.pkgs.scanned")
    assert queue_of(config.get_celery_app(), "tests.pkgs.scanned.add") == "routed"


def test_inside_an_app_that_lacks_the_task_the_handle_refuses():
    """Never another app's task: that would be its broker and its database."""
    config = make_config()
    config.scan("tests.pkgs.scanned")
    config.commit()
    bare = make_config()
    bare.commit()
    manager.push({"registry": bare.registry, "request": None})
    try:
        with pytest.raises(TaskNotRegistered, match=r"scanned\.add.*current app"):
            scanned.add.delay(1, 2)
    finally:
        manager.pop()


def test_filesystem_broker_folders_are_created(tmp_path):
    folders = {
        "data_folder_in": tmp_path / "broker",
        "data_folder_out": tmp_path / "broker",
        "processed_folder": tmp_path / "done",
        "control_folder": tmp_path / "control",
    }
    config = make_config(
        **{
            "celery.broker_url": "filesystem://",
            **{
                f"celery.broker_transport_options.{key}": str(folder)
                for key, folder in folders.items()
            },
        }
    )
    app = config.get_celery_app()
    assert all(folder.is_dir() for folder in folders.values())
    # Publishing works across the folders kombu would otherwise refuse.
    app.send_task("anything", args=(1,))
    assert len(list((tmp_path / "broker").iterdir())) == 1


def test_an_uncreatable_filesystem_folder_names_its_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = make_config(
        **{
            "celery.broker_url": "filesystem://",
            "celery.broker_transport_options.data_folder_in": str(blocker / "in"),
        }
    )
    error = commit_error(config)
    assert "celery.broker_transport_options.data_folder_in" in str(error)


def test_add_task_of_a_handle_keeps_its_options():
    handle = task(bind=True, name="kept.name", queue="mail")(scanned.where.__wrapped__)
    config = make_config()
    config.add_route("home", "/")
    config.add_task(handle)
    app = config.get_celery_app()
    assert handle.name == "kept.name"
    assert queue_of(app, "kept.name") == "mail"
    assert app.tasks["kept.name"]()["same"] is True  # bound: self is the task


def test_add_periodic_task_takes_the_documented_keyword():
    config = make_config()
    config.scan("tests.pkgs.scanned")
    config.add_periodic_task(schedule=5, task_name_or_func=scanned.add, args=(1, 2))
    assert "tests.pkgs.scanned.add" in config.get_celery_app().conf.beat_schedule


def test_the_package_lists_and_refuses_names_lazily():
    import pyramid_tasks

    assert {"task", "PyramidTask", "retryable", "includeme"} <= set(dir(pyramid_tasks))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pyramid_tasks.nothing_here  # noqa: B018


def test_without_typing_celery_does_not_check_arguments():
    def loose(x):
        """Never runs."""

    config = make_config()
    config.add_task(loose, typing=False, base="pyramid_tasks.ScheduleOnCommitTask")
    task = config.get_celery_app().tasks["tests.test_config.loose"]
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    assert task.apply_async((1, 2, 3), tm=tm).id  # as Celery would accept it
    tm.abort()


def route_maintenance(name, args, kwargs, options, task=None, **kw):
    """An app's router function (``celery.task_routes``)."""
    if name.endswith(".add"):
        return {"queue": "maint"}
    return None


def route_maintenance_by_name(name, args, kwargs, options, task=None, **kw):
    """A router function may answer with just the queue's name."""
    return "maint" if name.endswith(".add") else None


@pytest.mark.parametrize(
    "routes",
    [
        '{"tests.pkgs.scanned.add": {"queue": "maint"}}',
        '{"tests.pkgs.scanned.add": "maint"}',
        "tests.test_config.route_maintenance",
        "tests.test_config.route_maintenance_by_name",
    ],
)
def test_queue_prefix_reaches_the_apps_own_routes(routes):
    config = make_config(
        **{"tasks.queue_prefix": "siteA", "celery.task_routes": routes}
    )
    config.scan("tests.pkgs.scanned")
    app = config.get_celery_app()
    assert queue_of(app, "tests.pkgs.scanned.add") == "siteA.maint"
    assert queue_of(app, "scanned.where") == "siteA.reports"
    assert queue_of(app, "tests.pkgs.scanned.bare") == "siteA.celery"


def test_a_route_to_a_queue_object_is_left_as_it_is():
    from kombu import Queue

    special = Queue("exact")
    config = make_config(**{"tasks.queue_prefix": "siteA"})
    app = config.get_celery_app()
    router = app.conf.task_routes[0]
    router.routers.append(lambda *a, **k: {"queue": special})
    assert router("x", (), {}, {}) == {"queue": special}


def test_a_scan_without_the_include_says_what_is_missing():
    config = Configurator(settings={"celery.broker_url": "memory://"})
    with pytest.raises(ConfigurationError) as info:
        config.scan("tests.pkgs.scanned")
    assert str(info.value) == (
        "config.scan() found <@task tests.pkgs.scanned.add>, but the app does "
        "not include pyramid_tasks: add config.include('pyramid_tasks') (or "
        "pyramid_tasks.jobs) before the scan."
    )
