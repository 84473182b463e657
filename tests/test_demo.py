"""The demo app: eagerly, against a real worker, and its one-command supervisor."""

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
import webtest
from sqlalchemy import text

from demo_app import main
from demo_app.models import Order
from demo_app.tasks import expire_stale_orders

from .conftest import ROOT, free_port, wait_for


@pytest.fixture
def eager_app(tmp_path):
    app = main(
        {},
        **{
            "sqlalchemy.url": f"sqlite:///{tmp_path}/demo.sqlite",
            "demo.create_tables": "true",
            "demo.report_seconds": "0",
            "celery.broker_url": "memory://",
            "celery.task_always_eager": "true",
            "celery.task_eager_propagates": "true",
            "tasks.site_url": "https://shop.example.com",
        },
    )
    return webtest.TestApp(app)


def test_eager_orders_are_confirmed_after_the_commit(eager_app):
    eager_app.post("/orders", {"email": "ann@example.com"}, status=302)
    page = eager_app.get("/")
    assert "ann@example.com" in page.text
    assert "https://shop.example.com/orders/1" in page.text
    assert eager_app.get("/orders/1").json == {
        "id": 1,
        "status": "confirmed",
        "url": "https://shop.example.com/orders/1",
    }


def test_a_failed_request_saves_and_sends_nothing(eager_app):
    page = eager_app.post(
        "/orders", {"email": "lost@example.com", "fail": "1"}, status=500
    )
    assert "was never sent" in page.text
    assert "lost@example.com" not in eager_app.get("/").text
    eager_app.get("/orders/1", status=404)


def test_a_report_counts_the_orders(eager_app):
    eager_app.post("/orders", {"email": "ann@example.com"})
    eager_app.post("/reports", status=302)
    row = eager_app.get("/").html.select("table")[1].select("tr")[1]
    cells = [cell.text.strip() for cell in row.select("td")]
    assert cells[1] == "done"
    assert cells[4:7] == ["1", "1", "0"]


def test_beat_task_expires_stale_orders(eager_app):
    registry = eager_app.app.registry
    engine = registry["dbsession_factory"].kw["bind"]
    old = datetime.now(UTC) - timedelta(hours=2)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.insert(Order).values(email="old@example.com", created_at=old)
        )
        connection.execute(sqlalchemy.insert(Order).values(email="new@example.com"))
    assert expire_stale_orders.delay(older_than=3600).get() == 1
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT email, status FROM orders"))
        statuses = dict(rows.all())
    assert statuses == {"old@example.com": "expired", "new@example.com": "new"}


def test_a_real_worker_confirms_what_the_page_shows(start_worker, ini_vars):
    worker = start_worker("-P", "solo", section="main")
    from pyramid.paster import get_app

    browser = webtest.TestApp(get_app(str(worker.ini_path)))
    browser.post("/orders", {"email": "ann@example.com"}, status=302)
    browser.post("/orders", {"email": "lost@example.com", "fail": "1"}, status=500)

    def confirmed():
        return browser.get("/orders/1").json["status"] == "confirmed"

    wait_for(confirmed, timeout=30, message="the worker to confirm the order")
    page = browser.get("/").text
    assert "https://example.com/app/orders/1" in page
    assert "lost@example.com" not in page


def _descendants(pid):
    """Every process below ``pid``, from one ``ps`` snapshot."""
    table = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    children = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_the_one_command_demo_runs_and_stops_cleanly(tmp_path):
    (tmp_path / "conf").mkdir()
    config = shutil.copy(ROOT / "conf" / "local.ini", tmp_path / "conf" / "local.ini")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "demo_app", str(config), "--port", str(port)],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:

        def page(path=""):
            assert demo.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(url + path, timeout=2) as response:
                    return response.read().decode()
            except urllib.error.URLError:
                return None

        wait_for(page, timeout=60, message="the demo's web server")
        assert url in log_path.read_text()
        order = urllib.parse.urlencode({"email": "ann@example.com"}).encode()
        urllib.request.urlopen(url + "orders", data=order, timeout=5).close()
        wait_for(
            lambda: json.loads(page("orders/1"))["status"] == "confirmed",
            timeout=30,
            message="the demo's worker to confirm the order",
        )
        processes = _descendants(demo.pid)
        assert len(processes) >= 3  # web server, worker and its pool
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, log_path.read_text()
    left = [pid for pid in processes if Path(f"/proc/{pid}").exists()]
    assert left == [], f"processes left behind: {left}"
    assert "did not stop" not in log_path.read_text()  # stopped, not killed
    assert (tmp_path / "var" / "local.sqlite").exists()
