"""The two examples of docs/testing.rst ("Testing your app"), verbatim but
for the app's name: ``test_capture.py`` checks that they are the docs' text."""

from urllib.parse import urlencode

from pyramid_tasks.testing import get_task_capture
from tests.pkgs.cookiecutter_app.models import Order
from tests.pkgs.cookiecutter_app.tasks import send_receipt
from tests.pkgs.cookiecutter_app.views.default import checkout, place_order


def test_checkout_schedules_a_receipt(app, app_request, tm):
    info = checkout(app_request)
    [receipt] = get_task_capture(app.registry).pending(tm)
    assert receipt.name == send_receipt.name
    assert receipt.args == (info["order"],)
    assert receipt.kwargs == {}
    assert receipt.task_id == info["receipt_task"]


def test_receipt_page(testapp, app, tm, dbsession):
    order_id = testapp.post("/checkout", {"email": "ann@example.com"}).json["order"]
    capture = get_task_capture(app.registry)
    assert [t.name for t in capture.pending(tm)] == [send_receipt.name]
    # run it, and the tasks it schedules, in the test's transaction and session
    capture.run_pending(tm, dbsession=dbsession)
    assert "receipt sent" in testapp.get(f"/orders/{order_id}").text


def test_place_order_reads_the_form(app, app_request, tm, dbsession):
    app_request.method = "POST"
    app_request.content_type = "application/x-www-form-urlencoded"
    app_request.body = urlencode({"email": "bo@example.com"}).encode()
    info = place_order(app_request)
    assert dbsession.get(Order, info["order"]).email == "bo@example.com"
    [receipt] = get_task_capture(app.registry).pending(tm)
    assert receipt.args == (info["order"],)


def test_place_order_through_the_app(testapp, app, tm):
    testapp.post("/orders", {"email": "nobody"}, status=400)
    assert get_task_capture(app.registry).pending(tm) == []
    order_id = testapp.post("/orders", {"email": "cy@example.com"}).json["order"]
    [receipt] = get_task_capture(app.registry).pending(tm)
    assert receipt.args == (order_id,)
