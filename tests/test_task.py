"""PyramidTask: the request each execution gets, and how it ends."""

import logging

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.threadlocal import get_current_registry, get_current_request

from tests.pkgs import scanned


class ShopRequest(Request):
    """A custom request factory, as apps set with ``config.set_request_factory``."""

    shop = "ours"


def make_app(request_factory=ShopRequest, **settings):
    config = Configurator(
        settings={
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "celery.task_eager_propagates": "true",
            **settings,
        }
    )
    config.include("pyramid_tm")
    config.include("pyramid_tasks")
    config.set_request_factory(request_factory)
    config.add_request_method(
        lambda request: f"session for {request.url}", "dbsession", reify=True
    )
    config.add_request_method(lambda request, n: n * 2, "double")
    config.add_route("home", "/")
    config.add_route("order", "/orders/{id}")
    config.scan("tests.pkgs.scanned")
    return config


def add_body(config, body, **options):
    config.add_task(body, bind=True, **options)
    config.commit()
    app = config.get_celery_app()
    return app.tasks[f"{body.__module__}.{body.__name__}"]


def test_eager_request_honours_site_url_factory_and_request_methods():
    config = make_app(**{"tasks.site_url": "https://example.com/app/"})
    seen = {}

    def inspect(self, order_id):
        request = self.get_request()
        seen.update(
            url=request.route_url("order", id=order_id),
            home=request.route_url("home"),
            shop=request.shop,
            dbsession=request.dbsession,
            registry=request.registry,
            current=(get_current_request() is request, get_current_registry()),
            same=request is self.get_request(),
            double=request.double(21),
            tm=request.tm,
        )
        return seen["url"]

    task = add_body(config, inspect)
    assert task.delay(7).get() == "https://example.com/app/orders/7"
    assert seen["home"] == "https://example.com/app/"
    assert seen["shop"] == "ours"
    assert seen["dbsession"] == "session for https://example.com/app/"
    assert seen["registry"] is config.registry
    assert seen["current"] == (True, config.registry)
    assert seen["same"] is True
    assert seen["double"] == 42  # plain request methods are bound too
    assert isinstance(seen["tm"], transaction.TransactionManager)
    assert seen["tm"].explicit
    assert seen["tm"] is not transaction.manager
    # Threadlocals are popped once the execution ends.
    assert get_current_request() is None


def test_default_site_is_localhost_and_scanned_tasks_get_requests():
    config = make_app()
    config.get_celery_app()
    result = scanned.where.delay().get()
    assert result["url"] == "http://localhost/"
    assert result["same"] is True
    assert result["tm_explicit"] is True
    assert result["task_id"]


def test_each_execution_gets_a_new_request():
    config = make_app()
    requests = []

    def remember(self):
        requests.append(self.get_request())

    task = add_body(config, remember)
    task.delay().get()
    task.delay().get()
    task()  # a direct call is an execution too
    assert len({id(r) for r in requests}) == 3


def test_finished_callbacks_run_on_success_and_failure():
    config = make_app()
    finished = []

    def body(self, fail):
        request = self.get_request()
        request.add_finished_callback(lambda r: finished.append((fail, r)))
        if fail:
            raise ValueError("boom")
        return "ok"

    task = add_body(config, body)
    assert task.delay(False).get() == "ok"
    with pytest.raises(ValueError, match="boom"):
        task.delay(True).get()
    assert [fail for fail, _ in finished] == [False, True]
    assert get_current_request() is None


def test_a_transaction_left_open_is_aborted_with_a_warning(caplog):
    config = make_app()
    joined = []

    class DataManager:
        """A tiny data manager, to see the transaction's outcome."""

        transaction_manager = None

        def abort(self, txn):
            joined.append("abort")

    def leaky(self):
        request = self.get_request()
        request.tm.begin().join(DataManager())

    task = add_body(config, leaky)
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        task.delay().get()
    assert joined == ["abort"]
    assert "left a transaction open" in caplog.text
    assert "leaky" in caplog.text


def test_no_request_is_built_unless_asked():
    config = make_app()
    built = []
    config.add_request_method(lambda r: built.append(r) or "x", "probe", reify=True)

    def quiet(self):
        return 1

    task = add_body(config, quiet)
    assert task.delay().get() == 1
    assert built == []
    assert get_current_request() is None


def test_get_request_outside_an_execution_is_an_error():
    config = make_app()

    def body(self):
        """Never runs: get_request() is called from outside."""

    task = add_body(config, body)
    with pytest.raises(RuntimeError, match=r"get_request\(\) is only available"):
        task.get_request()


def test_a_nested_direct_call_gets_its_own_request():
    config = make_app()
    seen = []

    def inner(self):
        seen.append(("inner", self.get_request()))

    inner_task = add_body(config, inner)

    def outer(self):
        request = self.get_request()
        inner_task()
        seen.append(("outer", request))
        assert self.get_request() is request
        assert get_current_request() is request

    add_body(config, outer).delay().get()
    assert [name for name, _ in seen] == ["inner", "outer"]
    assert seen[0][1] is not seen[1][1]


def test_a_plain_pyramid_task_refuses_tm_instead_of_sending_at_once():
    config = make_app(**{"celery.task_always_eager": "false"})

    def immediate(self):
        """Never sent."""

    task = add_body(config, immediate)
    tm = transaction.TransactionManager(explicit=True)
    with (
        tm,
        pytest.raises(
            TypeError, match=r"immediate cannot send on commit.*ScheduleOnCommit"
        ),
    ):
        task.apply_async(tm=tm)


def test_request_properties_added_later_reach_new_requests():
    """The cached request class follows the app's request extensions."""
    config = make_app()
    seen = []

    def look(self):
        request = self.get_request()
        seen.append((getattr(request, "late", None), request.body))

    task = add_body(config, look)
    task.delay().get()
    config.add_request_method(lambda request: "added later", "late", reify=True)
    config.commit()
    task.delay().get()
    assert seen == [(None, b""), ("added later", b"")]


class RequestFactory:
    """A request factory that is an object, not a class: Pyramid's slow path."""

    def __call__(self, environ):
        return ShopRequest(environ)

    def blank(self, path, base_url=None):
        return self(ShopRequest.blank(path, base_url=base_url).environ)


def test_a_request_factory_object_is_honoured():
    config = make_app(
        RequestFactory(), **{"tasks.site_url": "https://example.com/shop"}
    )
    seen = []

    def look(self):
        request = self.get_request()
        seen.append((request.shop, request.dbsession, request.route_url("home")))

    add_body(config, look).delay().get()
    assert seen == [
        ("ours", "session for https://example.com/shop/", "https://example.com/shop/")
    ]
