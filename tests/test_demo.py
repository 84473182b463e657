"""The demo app: eagerly, against a real worker, and its one-command supervisor."""

import contextlib
import fcntl
import functools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import bs4
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
            "pyramid.includes": "pyramid_tasks.jobs",  # as conf/development.ini
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
    (link,) = page.html.select("td a")  # the confirmation link, a link
    assert link["href"] == link.text == "https://shop.example.com/orders/1"
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


@pytest.mark.parametrize(
    "path",
    [
        "/orders/abc",
        "/orders/1x",
        "/orders/-1",
        "/orders/%EF%BC%91",  # a fullwidth 1: int() takes it, the route does not
        "/orders/99999999999999999999",  # past 64 bits: SQLite would raise
    ],
)
def test_an_order_path_that_is_no_id_is_not_found(eager_app, path):
    eager_app.post("/orders", {"email": "ann@example.com"}, status=302)
    eager_app.get(path, status=404)
    eager_app.get("/orders/1", status=200)
    eager_app.get("/orders/999999999999999999", status=404)  # 18 digits: no row


def _count_orders(app):
    engine = app.app.registry["dbsession_factory"].kw["bind"]
    with engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM orders")).scalar()


@pytest.mark.parametrize(
    ("email", "message"),
    [
        ("", "Enter an email address: the order needs one."),
        ("   ", "Enter an email address: the order needs one."),
        ("ann", "'ann' is not an email address (it has no @)."),
    ],
)
def test_an_order_without_an_email_is_refused(eager_app, email, message):
    eager_app.post("/orders", {"email": "ann@example.com"}, status=302)
    assert _count_orders(eager_app) == 1
    page = eager_app.post("/orders", {"email": email}, status=400)
    assert _count_orders(eager_app) == 1  # nothing created, nothing sent
    (alert,) = page.html.select("p.error")
    assert alert.text == f"{message} No order was placed."
    assert page.html.select_one("input[name=email]")["value"] == email.strip()
    # The form stays put: no refresh to re-request the POST's URL.
    assert page.html.select("meta[http-equiv=refresh]") == []
    assert "anonymous" not in eager_app.get("/").text


def _refreshes(app):
    return app.get("/").html.select("meta[http-equiv=refresh]") != []


def test_the_page_refreshes_only_while_a_task_has_work(eager_app):
    assert not _refreshes(eager_app)  # nothing yet: an email can be typed
    eager_app.post("/orders", {"email": "ann@example.com"}, status=302)
    assert not _refreshes(eager_app)  # confirmed at once (eager)
    engine = eager_app.app.registry["dbsession_factory"].kw["bind"]
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO orders (email, status) VALUES ('bo@x.org', 'new')")
        )
    assert _refreshes(eager_app)  # a new order waits for its worker
    refused = eager_app.post("/orders", {"email": ""}, status=400)
    assert refused.html.select("meta[http-equiv=refresh]") == []
    assert "refreshes" not in refused.text  # it says so only when it does
    with engine.begin() as connection:
        connection.execute(text("UPDATE orders SET status = 'confirmed'"))
        connection.execute(text("INSERT INTO reports (state) VALUES ('running')"))
    assert _refreshes(eager_app)  # a report is being built


def test_a_report_counts_the_orders(eager_app):
    eager_app.post("/orders", {"email": "ann@example.com"})
    eager_app.post("/reports", status=302)
    row = eager_app.get("/").html.select("table")[1].select("tr")[1]
    cells = [cell.text.strip() for cell in row.select("td")]
    assert cells[1:3] == ["done", "succeeded"]  # the report, its job
    assert cells[5:8] == ["1", "1", "0"]


def test_a_shipment_is_a_workflow_of_three_steps(eager_app):
    """Pick, pack, ship: one job, its three steps its children, their
    workspace on the page; the confirmed orders shipped."""
    for email in ("ann@example.com", "bo@example.com"):
        eager_app.post("/orders", {"email": email})
    eager_app.post("/shipments", status=302)
    page = eager_app.get("/")
    row = page.html.select("table")[2].select("tr")[1]
    cells = [" ".join(cell.text.split()) for cell in row.select("td")]
    assert cells[1] == "succeeded"
    assert cells[2] == "100 % 3 steps done"
    assert cells[3:5] == ["2", "2"]
    assert eager_app.get("/orders/2").json["status"] == "shipped"
    assert "No shipments yet." not in page.text


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


def _local_ini(tmp_path, settings=None):
    """A copy of ``conf/local.ini`` whose ``var/`` is under ``tmp_path``;
    ``settings`` replace those of ``[app:main]`` it names."""
    (tmp_path / "conf").mkdir()
    text = (ROOT / "conf" / "local.ini").read_text()
    for key, value in (settings or {}).items():
        line = re.search(f"^{re.escape(key)} = .*$", text, re.MULTILINE)
        assert line, f"conf/local.ini has no {key}"
        text = text.replace(line.group(), f"{key} = {value}")
    path = tmp_path / "conf" / "local.ini"
    path.write_text(text)
    return str(path)


def _job_rows(tmp_path):
    """(name, state, attempts, progress) of the web's jobs in the demo's job
    table, read straight from its SQLite file (beat's are left out)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/var/local.sqlite")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT name, state, attempts, progress FROM pyramid_tasks_job"
                    " WHERE id IN (SELECT job_id FROM orders"
                    " UNION SELECT job_id FROM reports) ORDER BY name"
                )
            )
            return [tuple(row) for row in rows]
    finally:
        engine.dispose()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    config = _local_ini(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        demo = subprocess.run(
            [sys.executable, "-m", "demo_app", config, "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert demo.returncode == 2
    assert demo.stderr.splitlines()[-1] == (
        f"python -m demo_app: error: cannot serve on http://127.0.0.1:{port}/: "
        "Address already in use (see --host and --port)"
    )
    assert demo.stdout == ""  # no URL, no worker started
    assert not (tmp_path / "var").exists()


def test_the_web_server_alone_stops_on_sigint_even_if_it_was_ignored(tmp_path):
    config, port = _local_ini(tmp_path), free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "demo_app.web", config, "--port", str(port)],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:

        def answers():
            with contextlib.suppress(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                return True

        wait_for(answers, timeout=30, message="the demo's web server")
        web.send_signal(signal.SIGINT)
        assert web.wait(timeout=30) == 0
    finally:
        web.kill()  # nothing if it stopped
        web.wait()


class _Proc(NamedTuple):
    ppid: int
    pgid: int
    start: str  # clock ticks after boot: with the PID, names one process
    state: str
    command: str


def _process_table():
    """Every process, from one pass over ``/proc``."""
    table = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            stat = stat_path.read_text()
            command = (stat_path.parent / "cmdline").read_bytes()
            # After "pid (comm) ": state ppid pgrp ... and the 20th, starttime.
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(stat_path.parent.name)] = _Proc(
                ppid=int(fields[1]),
                pgid=int(fields[2]),
                start=fields[19],
                state=fields[0],
                command=command.replace(b"\0", b" ").decode(errors="replace"),
            )
    return table


class _Demo:
    """``python -m demo_app`` run by a test, and every process seen below it.

    The supervisor leads a session of its own and each of its children
    another, so no signal to the test's group reaches them.  Each process is
    remembered with its start time: a PID since given to some other process
    is never signalled.
    """

    def __init__(
        self,
        tmp_path,
        *arguments,
        ignore_sigint=False,
        terminal=False,
        python=("-m", "demo_app"),
        settings=None,
    ):
        config = _local_ini(tmp_path, settings)
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = tmp_path / "demo.log"
        self.log_path.touch()
        self._closing = contextlib.ExitStack()
        self._drain = lambda: None
        # What a shell's ``cmd &`` does to a background job: SIGINT ignored,
        # a disposition exec keeps.
        ignore = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
        in_child = [functools.partial(signal.signal, signal.SIGINT, ignore)]
        if terminal:
            # A terminal window of its own: the pseudo-terminal is the
            # supervisor's controlling terminal, stdin, stdout and stderr
            # (the children inherit the last three); closing the master side
            # hangs it up, as closing the window does.
            master, output = os.openpty()
            self._closing.callback(os.close, master)
            self._drain = lambda: self._read_terminal(master)
            # After setsid (start_new_session), with the terminal as fd 0.
            in_child.append(functools.partial(fcntl.ioctl, 0, termios.TIOCSCTTY, 0))
        else:
            output = os.open(self.log_path, os.O_WRONLY)
        try:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, *python, config),
                    *("--port", str(self.port), *arguments),
                ],
                cwd=tmp_path,
                stdin=output if terminal else subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,
                preexec_fn=lambda: [call() for call in in_child],
            )
        finally:
            os.close(output)
        self.seen = {self.process.pid: _process_table()[self.process.pid].start}
        self.killed = None

    def _read_terminal(self, master):
        # Read as it comes: a terminal nobody reads fills up and blocks
        # the processes writing to it.
        # EIO once no process has the terminal open any more.
        with open(self.log_path, "ab") as log, contextlib.suppress(OSError):
            while select.select([master], [], [], 0)[0]:
                log.write(os.read(master, 65536))

    def hang_up(self):
        """Close the terminal, as closing its window does: SIGHUP, then EIO."""
        self.log()
        self._drain = lambda: None
        self._closing.close()

    def log(self):
        self._drain()
        return self.log_path.read_text()

    def record(self):
        """Remember every process now below those seen; return those running."""
        table = _process_table()
        below = {}
        for pid, proc in table.items():
            below.setdefault(proc.ppid, []).append(pid)
        todo = self._alive(table)
        while todo:
            pid = todo.pop()
            self.seen[pid] = table[pid].start
            todo.extend(child for child in below.get(pid, []) if child not in self.seen)
        return {pid: table[pid] for pid in self._alive(table)}

    def _alive(self, table):
        # A zombie runs nothing: it is gone, only not yet reaped.
        return [
            pid
            for pid, start in self.seen.items()
            if pid in table and table[pid].start == start and table[pid].state != "Z"
        ]

    def alive(self):
        """PIDs seen whose processes still run."""
        return sorted(self._alive(_process_table()))

    def page(self, path=""):
        """The text at ``path``; None if it does not answer it (yet)."""
        assert self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.read().decode()
        except OSError:  # refused, an HTTP error, a read timed out
            return None

    def wait_started(self):
        """Until the supervisor has started its children, and armed."""
        wait_for(lambda: "(Ctrl+C stops" in self.log(), message="the demo's start")

    def wait_ready(self):
        """Until the web server answers and the worker (with beat) is ready."""
        wait_for(self.page, timeout=60, message="the demo's web server")
        wait_for(
            lambda: " ready." in self.log(), timeout=60, message="the demo's worker"
        )

    def kill(self):
        """SIGKILL whatever of this demo still runs; return the PIDs it had.

        The groups led by those processes go too, so a child forked since the
        last record is not missed.
        """
        self.record()
        table = _process_table()
        left = self._alive(table)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                if table[pid].pgid == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        # Reaped; the others are reaped by their new parent, if ever (this
        # machine's init may leave them zombies: alive() counts those gone).
        self.process.wait(timeout=10)
        wait_for(lambda: not self.alive(), timeout=10, message="killed processes")
        return sorted(left)


@contextlib.contextmanager
def _running_demo(tmp_path, *arguments, **options):
    """A :class:`_Demo` that outlives the test in no case: what runs is killed."""
    demo = _Demo(tmp_path, *arguments, **options)
    try:
        yield demo
    finally:
        demo.killed = demo.kill()
        demo._closing.close()  # its terminal, if it has one


def _tree(demo, processes):
    """The web server's PID, the worker's, and those of the worker's children."""
    below = {}
    for pid, proc in processes.items():
        below.setdefault(proc.ppid, []).append(pid)
    children = below[demo.process.pid]
    (web,) = [pid for pid in children if "-m demo_app.web" in processes[pid].command]
    (worker,) = [pid for pid in children if "tasks-celery" in processes[pid].command]
    return web, worker, below.get(worker, [])


def _confirmed_order(demo):
    """Order 1 once it is confirmed; None before, or if the page did not answer."""
    page = demo.page("orders/1")
    order = json.loads(page) if page else {}
    return order if order.get("status") == "confirmed" else None


def _order(demo, email):
    data = urllib.parse.urlencode({"email": email}).encode()
    urllib.request.urlopen(demo.url + "orders", data=data, timeout=5).close()


def _first_row(demo, table):
    """The cells of the newest row of the home page's ``table`` (0: orders,
    1: reports), as the page shows them; None if it did not answer."""
    page = demo.page()
    return None if page is None else _newest_cells(page, table)


def _newest_cells(page, table):
    html = bs4.BeautifulSoup(page, "html.parser")
    row = html.select("table")[table].select("tr")[1]
    return row.select("td")


def _report_progress(demo):
    """``(percent, message)`` of the running report's job, as its bar shows
    it; None while no bar is shown, or before the task's first progress
    report (the bar at 0, no message)."""
    cells = _first_row(demo, 1)
    bar = cells and cells[2].find("progress")
    message = cells and cells[2].find("small")
    if not bar or not message:
        return None
    return int(bar["value"]), message.text


def _done_report(demo):
    """The cells of the newest report once it is done; None before."""
    cells = _first_row(demo, 1)
    return cells if cells and cells[1].text == "done" else None


def test_the_one_command_demo_runs_and_stops_cleanly(tmp_path):
    """Started as ``cmd &`` leaves it (SIGINT ignored), ``kill -INT`` stops it all.

    Meanwhile the page shows each order's job and the report's progress bar
    moving, read from the job table (durable mode on SQLite)."""
    settings = {"demo.report_seconds": "4"}  # ten parts: a write each 0.4 s
    with _running_demo(tmp_path, ignore_sigint=True, settings=settings) as demo:
        demo.wait_ready()
        assert demo.url in demo.log()
        _order(demo, "ann@example.com")
        order = wait_for(
            lambda: _confirmed_order(demo),
            timeout=30,
            message="the demo's worker to confirm the order",
        )
        # The link follows --port (the INI's tasks.site_url says 6543).
        assert order["url"] == f"{demo.url}orders/1"
        page = bs4.BeautifulSoup(demo.page(), "html.parser")
        assert page.find("a", href=order["url"]).text == order["url"]
        # The order's job: committed with it, run once (status, then job).
        cells = _first_row(demo, 0)
        assert [cell.text for cell in cells[2:4]] == ["confirmed", "succeeded"]

        urllib.request.urlopen(demo.url + "reports", data=b"", timeout=5).close()
        seen = []  # the bar's (percent, message) while the report runs

        def moved():
            progress = _report_progress(demo)
            if progress is not None and progress not in seen:
                seen.append(progress)
            return len([p for p, _ in seen if 0 < p < 100]) >= 2

        wait_for(moved, timeout=30, message=f"the report's bar to move: {seen}")

        def done_and_marked():
            # The report commits first; its job's mark follows (its own write).
            cells = _done_report(demo)
            finished = ("succeeded", "failed", "cancelled", "dead")
            if cells and cells[2].text.strip() in finished:
                return cells
            return None

        cells = wait_for(
            done_and_marked, timeout=30, message="the report and its job to be done"
        )
        print(f"report progress seen on the page: {seen}")
        assert cells[2].text.strip() == "succeeded"
        assert cells[2].find("progress") is None  # the bar only while it runs
        assert seen == sorted(seen)  # it only moves forward
        for percent, message in seen:  # set_progress(step, 10, "... step + 1 ...")
            assert message == f"working on part {percent // 10 + 1} of 10"
        jobs = _job_rows(tmp_path)
        print(f"job rows: {jobs}")
        assert jobs == [
            ("demo_app.tasks.build_report", "succeeded", 1, 100),
            ("demo_app.tasks.confirm_order", "succeeded", 1, 100),
        ]

        processes = demo.record()
        web, worker, below_worker = _tree(demo, processes)
        assert len(below_worker) == 3  # its pool of two and beat
        assert sorted(processes) == sorted(
            [demo.process.pid, web, worker, *below_worker]
        )

        demo.process.send_signal(signal.SIGINT)
        assert demo.process.wait(timeout=45) == 0, demo.log()
        assert demo.alive() == []
    assert demo.killed == []
    log = demo.log()
    assert "demo: SIGINT: stopping" in log
    assert "killed" not in log  # stopped, not killed
    assert (tmp_path / "var" / "local.sqlite").exists()


# Sent by the supervisor to itself at its port check, a point of its start-up
# before any child: the signal a user sends just after starting it.
_SIGINT_AT_PORT_CHECK = """
import os, signal, sys

def hook(event, args):
    if event == "socket.bind":
        os.kill(os.getpid(), signal.SIGINT)

sys.addaudithook(hook)
from demo_app.__main__ import main
sys.exit(main())
"""


def test_a_stop_signal_while_the_demo_starts_is_not_lost(tmp_path):
    """Even as ``cmd &`` leaves it (SIGINT ignored): nothing is started."""
    options = {"ignore_sigint": True, "python": ("-c", _SIGINT_AT_PORT_CHECK)}
    with _running_demo(tmp_path, **options) as demo:
        assert demo.process.wait(timeout=20) == 0, demo.log()
    assert demo.killed == []
    assert demo.log() == "demo: SIGINT: nothing started\ndemo: stopped\n"
    assert not (tmp_path / "var").exists()


def test_a_closed_terminal_stops_the_demo_too(tmp_path):
    """Its terminal closed (SIGHUP, then EIO on every write to it), the
    supervisor stops the children: none of them is left orphaned."""
    with _running_demo(tmp_path, terminal=True) as demo:
        demo.wait_ready()
        processes = demo.record()
        assert len(processes) == 6  # the supervisor, web, worker, its pool, beat
        demo.hang_up()
        assert demo.process.wait(timeout=45) == 0
        assert demo.alive() == []
    assert demo.killed == []


def test_a_worker_that_dies_stops_the_demo_at_once(tmp_path):
    """Its main process killed, the worker's pool and beat are orphans: they
    get SIGTERM too, and the demo stops well within --stop-timeout (30 s)."""
    with _running_demo(tmp_path) as demo:
        demo.wait_ready()
        _, worker, below_worker = _tree(demo, demo.record())
        assert len(below_worker) == 3  # its pool of two and beat
        os.kill(worker, signal.SIGKILL)
        assert demo.process.wait(timeout=15) == 1, demo.log()  # a child failed
        assert demo.alive() == []
    assert demo.killed == []
    log = demo.log()
    assert (
        "demo: the worker and beat was killed by SIGKILL; stopping the web server"
        in log
    )
    assert "killed its" not in log and "killed them" not in log  # none lingered
    assert log.endswith("demo: stopped\n")


def _catches(pid, signum):
    """Whether process ``pid`` has a handler for ``signum``."""
    status = Path(f"/proc/{pid}/status").read_text()
    (caught,) = [line.split()[1] for line in status.splitlines() if "SigCgt" in line]
    return bool(int(caught, 16) & 1 << (signum - 1))


def _deaf_leader(demo):
    """The worker's main process stopped (SIGSTOP): SIGTERM stays pending.

    Only once it handles SIGTERM: with the default action the signal kills
    even a stopped process.
    """
    demo.wait_started()
    _, worker, _ = _tree(demo, demo.record())
    wait_for(lambda: _catches(worker, signal.SIGTERM), message="a SIGTERM handler")
    os.kill(worker, signal.SIGSTOP)


def _stop_by_sigterm(demo):
    demo.process.send_signal(signal.SIGTERM)


def _deaf_orphan(demo):
    """The worker's pool and beat stopped, then its main process killed.

    The pool dies with it (Celery's PR_SET_PDEATHSIG: SIGKILL); beat is left
    behind, deaf to SIGTERM.
    """
    demo.wait_ready()

    def handling_sigterm():  # as in _deaf_leader
        _, worker, below_worker = _tree(demo, demo.record())
        ready = [pid for pid in below_worker if _catches(pid, signal.SIGTERM)]
        return len(ready) == 3 and (worker, ready)  # its pool of two and beat

    worker, below_worker = wait_for(handling_sigterm, message="SIGTERM handlers")
    for pid in below_worker:
        os.kill(pid, signal.SIGSTOP)
    os.kill(worker, signal.SIGKILL)


# --stop-timeout 3: all children share it, the web server too, which stopped
# 0.15 s after SIGTERM here: room for a busy machine.
_DEAF = {
    "leader": (
        _deaf_leader,
        _stop_by_sigterm,
        "demo: SIGTERM: stopping",
        "demo: the worker and beat did not stop within 3 s of SIGTERM; "
        "killed its process group",
    ),
    "orphan": (
        _deaf_orphan,
        lambda demo: None,  # the leader's death stops the demo
        "demo: the worker and beat was killed by SIGKILL; stopping the web server",
        "demo: processes the worker and beat left behind still ran 3 s after "
        "the stop began; killed them",
    ),
}


@pytest.mark.parametrize("deaf", sorted(_DEAF))
def test_a_child_deaf_to_sigterm_is_killed_and_reported(tmp_path, deaf):
    make_deaf, stop, stopping, killed = _DEAF[deaf]
    with _running_demo(tmp_path, "--stop-timeout", "3") as demo:
        make_deaf(demo)
        stop(demo)
        assert demo.process.wait(timeout=45) == 1, demo.log()  # killing: a failure
        assert demo.alive() == []
    assert demo.killed == []  # the supervisor killed them, not the test
    log = demo.log()
    assert stopping in log
    assert killed in log
    assert log.count("killed its process group") + log.count("killed them") == 1
    assert log.endswith("demo: stopped\n")


def test_a_child_deaf_to_sigterm_is_killed_though_the_terminal_closed(tmp_path):
    """Nothing can be printed any more: what has to be killed is killed."""
    with _running_demo(tmp_path, "--stop-timeout", "3", terminal=True) as demo:
        _deaf_leader(demo)
        demo.hang_up()
        assert demo.process.wait(timeout=45) == 1
        assert demo.alive() == []
    assert demo.killed == []  # the supervisor killed them, not the test


def test_a_stuck_demo_is_killed_whole_when_the_test_ends(tmp_path):
    """The tests' fallback: a supervisor that cannot stop is killed, with all it
    started (its children lead groups of their own, out of its group's reach)."""
    with _running_demo(tmp_path) as demo:
        demo.wait_ready()
        processes = demo.record()
        assert len(processes) == 6
        os.kill(demo.process.pid, signal.SIGSTOP)  # hung: deaf to SIGINT
        demo.process.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            demo.process.wait(timeout=1)
    assert demo.killed == sorted(processes)
    assert demo.alive() == []
    assert demo.process.returncode == -signal.SIGKILL


def _create_tables_at_once(url, barrier):
    from demo_app.models import create_tables, get_engine

    engine = get_engine({"sqlalchemy.url": url})
    barrier.wait()
    try:
        create_tables(engine)
    finally:
        engine.dispose()


def test_processes_starting_together_all_find_the_tables(tmp_path):
    # The web server, the worker and beat each create what is missing at
    # start; losing the race to CREATE a table must not stop any of them
    # (with a single attempt, 18 of these 30 starts failed).
    import multiprocessing

    url = f"sqlite:///{tmp_path}/var/race.sqlite"
    context = multiprocessing.get_context("fork")
    failed = 0
    for _ in range(5):
        (tmp_path / "var" / "race.sqlite").unlink(missing_ok=True)
        barrier = context.Barrier(6)
        children = [
            context.Process(target=_create_tables_at_once, args=(url, barrier))
            for _ in range(6)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        failed += sum(child.exitcode != 0 for child in children)
        engine = sqlalchemy.create_engine(url)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        engine.dispose()
        assert {"orders", "reports", "pyramid_tasks_job"} <= tables
    print(f"30 starts in 5 rounds of 6 at once: {failed} failed")
    assert failed == 0
