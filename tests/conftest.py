"""Shared fixtures: service URLs, a private PostgreSQL schema, real workers.

Services come from environment variables with the local defaults.  When a
service is unreachable the tests that need it are skipped, except with
``CI=true``, where that is a failure.
"""

import configparser
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import kombu
import pytest
import redis
import sqlalchemy
from celery import signals
from celery.app.log import Logging
from kombu.exceptions import OperationalError
from pyramid.config import Configurator
from pyramid.paster import get_app

from pyramid_tasks.jobs.web import _marker
from pyramid_tasks.loader import _keep_ini_logging

ROOT = Path(__file__).resolve().parent.parent
TEST_INI = ROOT / "conf" / "test.ini"
REDIS_URL = os.environ.get("PYRAMID_TASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "PYRAMID_TASKS_TEST_DATABASE_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
)
AMQP_URL = os.environ.get(
    "PYRAMID_TASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


_counts = {}  # the terminal, where a test marked ``counts`` shows what it printed


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "counts: a fault test whose printed counts the run's output shows, "
        "passed or failed (so CI's log carries them)",
    )


def pytest_sessionstart(session):
    # xdist's workers report to the controller, which writes the lines.
    config = session.config
    worker = hasattr(config, "workerinput")
    _counts["terminal"] = (
        None if worker else config.pluginmanager.get_plugin("terminalreporter")
    )


def pytest_runtest_logreport(report):
    terminal = _counts["terminal"]
    if terminal is None or report.when != "call" or "counts" not in report.keywords:
        return
    terminal.write_line("")
    terminal.write_line(f"{report.nodeid}:")
    for line in report.capstdout.splitlines():
        terminal.write_line(f"    {line}")


def unavailable(service, error):
    message = f"{service} is unreachable: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


def wait_for(predicate, timeout=30.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns a true value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def check_redis(url):
    """``url`` if Redis answers there; else skip (fail under CI=true)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    finally:
        client.close()
    return url


def check_amqp(url):
    """``url`` if an AMQP broker (RabbitMQ) accepts a connection; else skip
    (fail under CI=true)."""
    try:
        with kombu.Connection(url, connect_timeout=2) as connection:
            connection.connect()
    except OSError as exc:
        unavailable("RabbitMQ", exc)
    return url


def check_postgres(url):
    """``url`` if PostgreSQL accepts a connection; else skip (fail under CI)."""
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def amqp_url():
    return check_amqp(AMQP_URL)


@pytest.fixture(scope="session")
def redis_url():
    return check_redis(REDIS_URL)


@pytest.fixture(scope="session")
def database_url():
    return check_postgres(DATABASE_URL)


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def pg_schema(database_url):
    """A schema of its own for this test; dropped afterwards."""
    name = f"pt_{uuid.uuid4().hex[:12]}"
    yield name
    # Jobs this test sent and durable mode's marker thread has yet to mark
    # queued are marked before their table goes: else the mark fails later,
    # its warning logged during another test.
    _marker.flush(10)
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def ini_vars(redis_url, database_url, pg_schema):
    """Values giving this test its own queue, schema and Redis key."""
    token = uuid.uuid4().hex[:12]
    return {
        "redis_url": redis_url,
        "database_url": database_url,
        "schema": pg_schema,
        "queue": f"pyramid_tasks_test_{token}",
        "probe_key": f"pyramid_tasks:probe:{token}",
    }


_LOGGING_SECTIONS = (
    "loggers",
    "handlers",
    "formatters",
    "logger_",
    "handler_",
    "formatter_",
)


def overlay_ini(path, section, values, settings=None):
    """An INI whose ``[app:main]`` is ``conf/test.ini#<section>`` with this
    test's values (``values["broker_url"]``, if any, instead of Redis as the
    broker), and ``settings`` (more ``[app:main]`` keys) on top.

    PasteDeploy never lets ``--var`` override a ``[DEFAULT]`` value, but the
    settings of a section that ``use = config:`` another one do override.
    """
    parser = configparser.RawConfigParser()
    parser.read(TEST_INI)
    ours = {
        "sqlalchemy.url": values["database_url"],
        "demo.schema": values["schema"],
        "celery.broker_url": values.get("broker_url", values["redis_url"]),
        "celery.result_backend": values["redis_url"],
        "celery.task_default_queue": values["queue"],
    }
    if section == "probe":
        ours["probe.redis_url"] = values["redis_url"]
        ours["probe.key"] = values["probe_key"]
    ours.update(settings or {})
    lines = ["[app:main]", f"use = config:{TEST_INI}#{section}"]
    lines += [f"{key} = {value}" for key, value in ours.items()]
    for name in parser.sections():
        if name.startswith(_LOGGING_SECTIONS):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {v}" for k, v in parser.items(name, raw=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Worker:
    """A ``tasks-celery conf/test.ini -- worker`` subprocess."""

    def __init__(
        self, process, node, log_path, celery_app, ini_path=None, session=False
    ):
        self.ini_path = ini_path
        self.process = process
        self.node = node
        self.log_path = log_path
        self.celery_app = celery_app
        self.session = session  # leads a session (and process group) of its own

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def ping(self):
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log}")
        # A connection of its own each time: one the broker reset while the
        # worker started (seen once on RabbitMQ under load) is only a miss.
        with self.celery_app.connection_for_write() as connection:
            try:
                return self.celery_app.control.ping(
                    destination=[self.node], timeout=0.5, connection=connection
                )
            except (OperationalError, *connection.connection_errors):
                return None

    def stop(self, timeout=30):
        """SIGTERM (a warm shutdown that saves coverage), SIGKILL if it hangs;
        then SIGKILL whatever of its session is left (an embedded beat or a
        pool child whose main process a test killed)."""
        if self.process.poll() is None:
            self.process.terminate()
            self._wake()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.session:  # its process group holds only what it started
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def _wake(self):
        """On AMQP, a ping: the worker's event loop (kombu's hub) waits on
        its sockets up to 10 s when no timer is due, and sees the SIGTERM
        only as it wakes (measured: a stop took 10.5 s, 2 s with the ping).
        On Redis its BRPOP returns each second.  Nothing for a bare process
        (no app)."""
        if self.celery_app is None:
            return
        with self.celery_app.connection_for_write() as connection:
            amqp = connection.transport.driver_type == "amqp"
        if amqp:
            self.celery_app.control.ping(destination=[self.node], timeout=0.1)


def tasks_celery():
    return shutil.which("tasks-celery", path=str(Path(sys.executable).parent))


@pytest.fixture
def start_worker(ini_vars, tmp_path):
    """Start a real worker on ``conf/test.ini#<section>`` (plus ``settings``);
    stopped at teardown."""
    workers = []

    def start(*celery_args, section="probe", settings=None):
        node = f"w{uuid.uuid4().hex[:10]}@localhost"
        ini = overlay_ini(tmp_path / f"{node}.ini", section, ini_vars, settings)
        app = get_app(str(ini))
        command = [tasks_celery(), str(ini), "--", "worker", "-n", node]
        command += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        command += list(celery_args)
        log_path = tmp_path / f"{node}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(
            process, node, log_path, app.registry.celery_app, ini, session=True
        )
        workers.append(worker)
        wait_for(worker.ping, timeout=60, message=f"worker {node} to answer ping")
        return worker

    yield start
    for worker in workers:
        worker.stop()


def free_port(address="127.0.0.1"):
    """A TCP port nothing listens on at ``address`` (for an unreachable
    service, or a server of the test's own)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(folder, address="127.0.0.1"):
    """``(url, process)`` of a ``redis-server`` of the caller's own on a free
    port of ``address``, ended by its PID on the way out (woken first, if it
    was frozen)."""
    port = free_port(address)
    arguments = ["redis-server", "--port", str(port), "--bind", address]
    arguments += ["--protected-mode", "no", "--save", "", "--appendonly", "no"]
    arguments += ["--dir", str(folder)]
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL)
    url = f"redis://{address}:{port}/0"
    client = redis.Redis.from_url(url)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=10, message=f"redis-server on port {port}")
        yield url, process
    finally:
        client.close()
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path):
    """The URL of a ``redis-server`` of this test's own, free to reconfigure."""
    with redis_server(tmp_path) as (url, _process):
        yield url


class NullDataManager:
    """A data manager that does nothing: subclass it to see a transaction's
    phases (the way repoze.sendmail's tests use dummy data managers)."""

    transaction_manager = None

    def abort(self, txn):
        pass

    tpc_abort = abort

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def sortKey(self):
        return f"{type(self).__name__}:{id(self)}"


def db_app(settings, *tasks, **extra):
    """A committed configuration: demo models, pyramid_tasks and ``tasks``,
    each ``(function, base class)``, registered under the function's name."""
    config = Configurator(settings={**settings, **extra})
    config.include("demo_app.models")
    config.include("pyramid_tasks")
    config.add_route("order", "/orders/{id}")
    for body, base in tasks:
        config.add_task(body, bind=True, base=base, name=body.__name__)
    config.commit()
    return config


@pytest.fixture
def restore_logging(monkeypatch):
    """Undo what ``fileConfig`` and Celery's logging set-up do to this process."""
    manager = logging.Logger.manager
    root = logging.getLogger()

    def snapshot(logger):
        return logger.level, list(logger.handlers), logger.propagate, logger.disabled

    saved = {
        name: snapshot(logger)
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    saved_root = snapshot(root)
    signals.setup_logging.disconnect(_keep_ini_logging)
    was_setup = Logging._setup
    for name in ("_MP_FORK_LOGLEVEL_", "_MP_FORK_LOGFILE_", "_MP_FORK_LOGFORMAT_"):
        monkeypatch.setenv(name, "")  # records absence: undone afterwards
    yield
    Logging._setup = was_setup
    signals.setup_logging.disconnect(_keep_ini_logging)
    loggers = [(name, logger) for name, logger in manager.loggerDict.items()]
    for name, logger in [("", root), *loggers]:
        if not isinstance(logger, logging.Logger):
            continue
        before = saved_root if name == "" else saved.get(name)
        level, handlers, propagate, disabled = before or (0, [], True, False)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.handlers = handlers
        logger.propagate = propagate
        logger.disabled = disabled
