"""pyramid_tasks.testing with the cookiecutter's conftest, as generated: a
doomed ``tm`` shared by the test and the app, that never commits."""

import ast
import itertools
import logging
import textwrap
from pathlib import Path

import pytest
import transaction

from pyramid_tasks import NoActiveTransaction
from pyramid_tasks.testing import get_task_capture
from tests.pkgs.cookiecutter_app.models import Order
from tests.pkgs.cookiecutter_app.tasks import count_receipts, pack_order
from tests.pkgs.cookiecutter_app.views.default import checkout

ROOT = Path(__file__).resolve().parent.parent.parent


def docs_example(first_test):
    """The code block of docs/testing.rst whose first test is ``first_test``."""
    lines = (ROOT / "docs" / "testing.rst").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if f" def {first_test}(" in line)
    start = max(i for i in range(end) if lines[i] == ".. code-block:: python")
    block = itertools.takewhile(
        lambda line: not line or line.startswith(" "), lines[start + 1 :]
    )
    return textwrap.dedent("\n".join(block)).strip()


def imported(source):
    """The ``(module, name)`` pairs the imports of ``source`` bind."""
    pairs = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            pairs.update((getattr(node, "module", None), a.name) for a in node.names)
    return pairs


@pytest.mark.parametrize(
    "first_test",
    ["test_checkout_schedules_a_receipt", "test_place_order_reads_the_form"],
)
def test_the_docs_examples_are_run_verbatim(first_test):
    example = docs_example(first_test).replace("myapp.", "tests.pkgs.cookiecutter_app.")
    imports, _, tests = example.partition("\n\n\ndef ")
    assert tests.startswith(f"{first_test}(")
    mirror = (Path(__file__).parent / "test_docs_example.py").read_text()
    assert "def " + tests + "\n" in mirror
    # ruff sorts the imports of both examples into one block
    assert imported(imports)
    assert imported(imports) <= imported(mirror)


def test_run_sees_the_tests_rows_only_inside_its_transaction(
    testapp, app, tm, dbsession
):
    order_id = testapp.post("/checkout", {"email": "bo@example.com"}).json["order"]
    capture = get_task_capture(app.registry)
    [receipt] = capture.pending(tm)

    # Its own transaction, as on a worker: the test's rows are not committed.
    assert receipt.run() is None
    assert "no receipt yet" in testapp.get(f"/orders/{order_id}").text
    assert capture.pending(tm) == []  # run, so no longer pending

    url = receipt.run(tm=tm, dbsession=dbsession)  # the same task, run again
    assert url == f"https://example.com/orders/{order_id}"
    assert dbsession.get(Order, order_id).receipt_url == url
    page = testapp.get(f"/orders/{order_id}").text
    assert "receipt sent" in page
    assert "not packed" in page
    # What it scheduled on request.tm waits in the test's transaction.
    [packing] = capture.pending(tm)
    assert packing.name == pack_order.name
    assert (packing.args, packing.options) == ((order_id,), {})
    assert tm.isDoomed()  # no commit, no abort: still the test's transaction


def test_run_pending_runs_what_the_tasks_schedule(testapp, app, tm, dbsession):
    order_id = testapp.post("/checkout").json["order"]
    capture = get_task_capture(app.registry)
    url = f"https://example.com/orders/{order_id}"
    assert capture.run_pending(tm, dbsession=dbsession) == [url, None]
    assert capture.pending(tm) == []
    assert capture.run_pending(tm, dbsession=dbsession) == []
    assert "packed." in testapp.get(f"/orders/{order_id}").text
    testapp.get(f"/orders/{order_id + 1}", status=404)
    assert capture.sent == []  # nothing committed, nothing sent at once


def test_retryable_calls_run_in_the_lent_transaction(app, app_request, tm, dbsession):
    capture = get_task_capture(app.registry)
    capture.clear()
    dbsession.add(Order(email="cy@example.com", receipt_url="https://x.test/"))
    dbsession.flush()
    result = count_receipts.delay()
    [counting] = capture.sent
    assert counting.task_id == result.id
    assert (counting.args, counting.kwargs, counting.options) == ((), {}, {})

    assert counting.run() == 0  # a transaction of its own: nothing committed
    assert counting.run(tm=tm, dbsession=dbsession) == 1
    assert tm.get().status == "Doomed"
    capture.clear()


def test_a_failing_body_leaves_the_tests_transaction_open(app, tm, dbsession, caplog):
    capture = get_task_capture(app.registry)
    pack_order.apply_async((404,), tm=tm)  # no such order
    caplog.set_level(logging.WARNING, logger="pyramid_tasks")
    with pytest.raises(AttributeError):
        capture.run_pending(tm, dbsession=dbsession)
    assert tm.get().status == "Doomed"
    assert capture.pending(tm) == []
    assert "left a transaction open" not in caplog.text


def test_a_unit_test_with_the_dummy_request(app, dummy_config, dummy_request, tm):
    dummy_request.params["email"] = "di@example.com"
    info = checkout(dummy_request)
    [receipt] = get_task_capture(app.registry).pending(tm)
    assert receipt.args == (info["order"],)


def test_run_needs_an_open_transaction(app, tm, dbsession):
    pack_order.apply_async((1,), tm=tm)
    [packing] = get_task_capture(app.registry).pending(tm)
    with pytest.raises(TypeError, match=r"run\(dbsession=...\): request attributes"):
        packing.run(dbsession=dbsession)
    with pytest.raises(TypeError, match=r"run\(order_id=...\): request attributes"):
        packing.run(request_attributes={"order_id": 5})
    with pytest.raises(TypeError, match="unexpected keyword argument 'order_id'"):
        packing.run(tm=tm, order_id=5)  # not taken for a task argument
    with pytest.raises(TypeError, match=r"\{'tm': ...\}\): give the transaction"):
        packing.run(tm=tm, request_attributes={"tm": tm})
    with pytest.raises(TypeError, match="the session is given twice"):
        packing.run(
            tm=tm, dbsession=dbsession, request_attributes={"dbsession": dbsession}
        )
    closed = transaction.TransactionManager(explicit=True)
    with pytest.raises(NoActiveTransaction, match=r"pack_order.run\(tm=...\) runs"):
        packing.run(tm=closed)
    with pytest.raises(NoActiveTransaction, match=r"capture.run_pending\(tm\) runs"):
        get_task_capture(app.registry).run_pending(closed)
    with pytest.raises(NoActiveTransaction, match=r"run_pending\(tm\) runs"):
        get_task_capture(app.registry).run_pending(None)
    assert get_task_capture(app.registry).pending(tm) == [packing]  # none ran


def test_run_in_the_tests_transaction_needs_the_tests_session(
    testapp, app, tm, dbsession
):
    """Without dbsession= the task would get a second session on a second
    connection: blind to the test's rows, and on PostgreSQL blocked for ever
    by their row locks.  Refused while the test's session is in tm."""
    order_id = testapp.post("/checkout").json["order"]
    capture = get_task_capture(app.registry)
    [receipt] = capture.pending(tm)
    with pytest.raises(TypeError, match=r"send_receipt.run\(tm=...\) without dbs"):
        receipt.run(tm=tm)
    with pytest.raises(TypeError, match=r"run_pending\(tm\) without dbsession="):
        capture.run_pending(tm)
    assert capture.pending(tm) == [receipt]  # refused before it ran
    assert dbsession.get(Order, order_id).receipt_url is None
    attributes = {"dbsession": dbsession, "marker": 1}
    assert receipt.run(tm=tm, request_attributes=attributes).endswith(
        f"/orders/{order_id}"
    )


def test_the_form_of_app_request_is_its_body(app_request):
    """What the docs say of ``app_request.POST``: not filled in, parsed."""
    with pytest.raises(KeyError, match="Not an HTML form submission"):
        app_request.POST["email"] = "ann@example.com"
    app_request.method = "POST"
    app_request.content_type = "application/x-www-form-urlencoded"
    app_request.body = b"email=ann%40example.com"
    assert app_request.POST["email"] == "ann@example.com"
