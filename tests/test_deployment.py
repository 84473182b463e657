"""The deployment guide's units, tried as written (docs/deployment.rst).

There is no systemd and no supervisord on the test machines, so each unit of
``deploy/systemd`` and each program of ``deploy/supervisor`` is run the way
they would run it: its file parsed, the documented paths mapped into the
test's folder (``/srv/myapp/venv/bin/`` is this virtualenv's ``bin``,
``/etc/myapp/production.ini`` an INI of the test's own on ``conf/test.ini``),
the specifiers (``%i``, ``%H``, ``%S``) or supervisor's ``%(name)s``
expansions filled in, its environment and working directory applied, and its
command line started.  It is stopped as the manager stops it: the stop
signal to the main process alone (``KillMode=mixed``,
``stopasgroup=false``), then SIGKILL to the whole group if it outlives its
stop timeout.  ``User=`` and ``user=`` are not applied (the suite may run as
any user); ``PYTHONPATH`` stands for the app installed in the virtualenv.
"""

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import redis
import sqlalchemy

from .conftest import ROOT, free_port, overlay_ini, wait_for

SYSTEMD = ROOT / "deploy" / "systemd"
SUPERVISOR = ROOT / "deploy" / "supervisor" / "pyramid-tasks.conf"
# What systemd gives a system service: no variables but these and the unit's.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mapped(text, folder):
    """The documented paths moved into ``folder`` (longest first)."""
    paths = {
        "/srv/myapp/venv/bin/": f"{Path(sys.executable).parent}/",
        "/srv/myapp": str(folder / "srv"),
        "/etc/myapp/": f"{folder / 'etc'}/",
        "/var/log/myapp/": f"{folder / 'log'}/",
        "/var/lib/myapp/": f"{folder / 'state' / 'myapp'}/",
    }
    for documented, ours in paths.items():
        text = text.replace(documented, ours)
    return text


def read_unit(text):
    """A unit file's sections, each key with the list of its values (a key
    such as ``Environment=`` may repeat).  Only what deploy/systemd uses:
    comments, sections, ``key=value``; no line continuations."""
    unit = {}
    for line in text.splitlines():
        line = line.strip()
        assert not line.endswith("\\"), line
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return unit


def timespan(value):
    """Seconds of a systemd time span as written in deploy/systemd."""
    number, unit = re.fullmatch(r"(\d+)(s|min)", value).groups()
    return int(number) * {"s": 1, "min": 60}[unit]


class Service:
    """One command line, run as its manager would run it."""

    def __init__(self, argv, cwd, env, log_path, stop_signal, stop_timeout):
        self.argv, self.cwd, self.env = argv, cwd, env
        self.log_path, self.stop_signal = log_path, stop_signal
        self.stop_timeout = stop_timeout
        self.process = None

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """The stop signal to the main process; its exit status once it ends
        (within the stop timeout, or ``TimeoutExpired``)."""
        self.process.send_signal(self.stop_signal)
        return self.process.wait(timeout=self.stop_timeout)

    def kill_group(self):
        """What the manager does after the stop timeout, and the test's
        clean-up: SIGKILL to whatever of the group is left."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def systemd_service(name, folder, instance=""):
    """The unit ``deploy/systemd/<name>`` as systemd would start it."""
    unit = read_unit(mapped((SYSTEMD / name).read_text(), folder))
    service = unit["Service"]
    specifiers = {
        "i": instance,
        "H": socket.gethostname(),
        "S": str(folder / "state"),
        "%": "%",
    }

    def expand(value):
        return re.sub(r"%(.)", lambda match: specifiers[match.group(1)], value)

    env = {"PATH": SERVICE_PATH, "PYTHONPATH": str(ROOT)}
    env.update(value.split("=", 1) for value in service.get("Environment", []))
    for path in service.get("EnvironmentFile", []):
        path = Path(expand(path.removeprefix("-")))  # "-": may be missing
        lines = path.read_text().splitlines() if path.exists() else []
        env.update(line.split("=", 1) for line in lines)
    for directory in service.get("StateDirectory", []):
        (folder / "state" / directory).mkdir(parents=True)
    [command] = service["ExecStart"]
    argv = []
    for word in shlex.split(expand(command)):
        # "$NAME" alone: the variable's value split at whitespace.
        argv += env[word[1:]].split() if word.startswith("$") else [word]
    assert service["KillMode"] == ["mixed"] or "KillMode" not in service
    [stop_signal] = service["KillSignal"]
    [stop_timeout] = service["TimeoutStopSec"]
    [cwd] = service["WorkingDirectory"]
    Path(cwd).mkdir(parents=True, exist_ok=True)
    log_path = folder / "log" / f"{name}{instance}.log"
    return Service(
        argv,
        cwd,
        env,
        log_path,
        signal.Signals[stop_signal],
        timespan(stop_timeout),
    )


def supervisor_program(name, folder, process_num=0):
    """``[program:<name>]`` of deploy/supervisor as supervisord would start
    it (its ``%(name)s`` expansions are supervisor's own)."""
    parser = configparser.RawConfigParser()
    parser.read_string(mapped(SUPERVISOR.read_text(), folder))
    program = dict(parser.items(f"program:{name}"))
    expansions = {
        "program_name": name,
        "process_num": process_num,
        "host_node_name": socket.gethostname(),
        "here": str(SUPERVISOR.parent),
    }
    env = {"PATH": SERVICE_PATH, "PYTHONPATH": str(ROOT)}
    # KEY="value",KEY2="value2": no comma inside a value here.
    env.update(pair.split("=", 1) for pair in shlex.split(program["environment"]))
    assert program.get("stopasgroup", "false") == "false"
    assert program["killasgroup"] == "true"
    assert program["redirect_stderr"] == "true"
    # The install step supervisor leaves to the admin (docs/deployment.rst).
    (folder / "state" / "myapp").mkdir(parents=True, exist_ok=True)
    Path(program["directory"]).mkdir(parents=True, exist_ok=True)
    return Service(
        shlex.split(program["command"] % expansions),
        program["directory"],
        env,
        Path(program["stdout_logfile"] % expansions),
        signal.Signals[f"SIG{program['stopsignal']}"],
        int(program["stopwaitsecs"]),
    )


@pytest.fixture
def services():
    started = []

    def start(service):
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.kill_group()


def production_ini(folder, section, ini_vars, settings=None):
    """``/etc/myapp/production.ini``: conf/test.ini's ``section`` on this
    test's queue, schema and Redis."""
    (folder / "etc").mkdir(exist_ok=True)
    return overlay_ini(folder / "etc" / "production.ini", section, ini_vars, settings)


def test_systemd_accepts_the_units(tmp_path):
    """systemd's own parser (``systemd-analyze verify``, which needs no
    running systemd) finds nothing to say, paths mapped to existing files."""
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze is not installed (the systemd package)"
    for path in SYSTEMD.iterdir():
        (tmp_path / path.name).write_text(mapped(path.read_text(), tmp_path))
    names = ["pyramid-tasks-worker@1.service", "pyramid-tasks-beat.service"]
    names += ["pyramid-tasks-web.service", "pyramid-tasks.target"]
    for name in names:
        checked = subprocess.run(
            [verify, "verify", "--man=no", str(tmp_path / name)],
            capture_output=True,
            text=True,
        )
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, ""), name


def test_the_guide_shows_every_file_of_deploy():
    """docs/deployment.rst includes the files themselves, each of them."""
    guide = (ROOT / "docs" / "deployment.rst").read_text()
    shown = re.findall(r"^\.\. literalinclude:: \.\./(deploy/\S+)$", guide, re.M)
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    assert sorted(shown) == sorted(str(p.relative_to(ROOT)) for p in files)


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _post(url, **form):
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return response.status  # after the redirect to the home page


SIDES = {
    "systemd": lambda folder, token: [
        systemd_service("pyramid-tasks-web.service", folder),
        systemd_service("pyramid-tasks-worker@.service", folder, instance=token),
        systemd_service("pyramid-tasks-beat.service", folder),
    ],
    "supervisor": lambda folder, token: [
        supervisor_program("pyramid-tasks-web", folder),
        supervisor_program("pyramid-tasks-worker", folder),
        supervisor_program("pyramid-tasks-beat", folder),
    ],
}
REPORT_SECONDS = 2


@pytest.mark.parametrize("manager", sorted(SIDES))
def test_web_worker_and_beat_as_written(manager, ini_vars, tmp_path, services):
    """The demo's web server, a worker and beat, each from its unit or
    program, on one INI.  An order placed on the web is confirmed by the
    worker; beat's entry runs on the worker.  Then a report of known length
    (``demo.report_seconds``) is asked for, and the worker stopped as its
    manager stops it (the stop signal, SIGTERM, to its main process) while the
    report is built: the worker takes no new message, finishes the report,
    and exits 0 within the stop timeout."""
    port = free_port()
    settings = {
        "tasks.beat.expire.task": "demo_app.tasks.expire_stale_orders",
        "tasks.beat.expire.schedule": "1",
        "demo.report_seconds": str(REPORT_SECONDS),
    }
    ini = production_ini(tmp_path, "main", ini_vars, settings)
    with open(ini, "a") as file:
        file.write(
            f"\n[server:main]\nuse = egg:waitress#main\nlisten = 127.0.0.1:{port}\n"
        )
    token = uuid.uuid4().hex[:8]
    # The worker instance's environment file: it consumes the test's queue.
    (tmp_path / "etc" / f"worker-{token}.env").write_text(
        f"WORKER_ARGS=-Q {ini_vars['queue']}\n"
    )
    web, worker, beat = map(services, SIDES[manager](tmp_path, token))
    base = f"http://127.0.0.1:{port}"
    engine = sqlalchemy.create_engine(ini_vars["database_url"])
    client = redis.Redis.from_url(ini_vars["redis_url"])

    def answers():
        with suppress(OSError):
            return _get(f"{base}/")

    def report():
        sql = f'SELECT state, seconds FROM "{ini_vars["schema"]}".reports'
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(sql)).one()

    wait_for(answers, timeout=60, message="the web server")
    assert _post(f"{base}/orders", email="ann@example.com") == 200
    wait_for(
        lambda: '"status": "confirmed"' in _get(f"{base}/orders/1"),
        timeout=60,
        message="the order to be confirmed by the worker",
    )
    wait_for(
        lambda: re.search(r"expire_stale_orders\[[-0-9a-f]+\] succeeded", worker.log),
        timeout=60,
        message="beat's entry to run on the worker",
    )

    assert _post(f"{base}/reports") == 200
    wait_for(lambda: report().state == "running", message="the report to start")
    stopped = time.monotonic()
    worker.process.send_signal(worker.stop_signal)
    # Celery's line on stdout, there at once: PYTHONUNBUFFERED=1 was applied.
    wait_for(lambda: "Warm shutdown" in worker.log, message="warm shutdown")
    assert _post(f"{base}/orders", email="bob@example.com") == 200  # not taken
    assert (worker.process.poll(), report().state) == (None, "running")
    code = worker.process.wait(timeout=worker.stop_timeout)
    drain = time.monotonic() - stopped
    state, seconds = report()
    queued = [
        json.loads(message)["headers"]["task"]
        for message in client.lrange(ini_vars["queue"], 0, -1)
    ]
    confirmations = queued.count("demo_app.tasks.confirm_order")
    second_order = _get(f"{base}/orders/2")
    codes = [code] + [service.stop() for service in (beat, web)]
    schedule = sorted(p.name for p in (tmp_path / "state" / "myapp").iterdir())
    print(
        f"{manager}: stop signal {worker.stop_signal.name}, stop timeout "
        f"{worker.stop_timeout} s; the worker exited {drain:.2f} s after it, "
        f"the report ({seconds} s) {state}; confirmations left queued "
        f"{confirmations} (and {len(queued) - confirmations} of beat's); exit "
        f"statuses worker, beat, web {codes}; beat's state {schedule}"
    )
    assert (state, confirmations) == ("done", 1)
    assert '"status": "new"' in second_order
    assert drain < worker.stop_timeout
    # pserve has no SIGTERM handler: it ends by the signal, which systemd
    # counts as a clean stop (as supervisor does any exit on its stopsignal).
    assert codes == [0, 0, -signal.SIGTERM]
    assert "celerybeat-schedule.dat" in schedule
    client.delete(ini_vars["queue"])
    client.close()
    engine.dispose()
