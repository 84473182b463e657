"""The example of docs/transactions.rst ("Testing your app"), verbatim but for
the app's name: ``test_capture.py`` checks that it is the docs' text."""

from pyramid_tasks.testing import get_task_capture
from tests.pkgs.cookiecutter_app.tasks import send_receipt
from tests.pkgs.cookiecutter_app.views.default import checkout


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
