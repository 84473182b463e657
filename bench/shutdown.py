"""What stopping and killing a worker costs: the figures of docs/deployment.rst.

Real ``tasks-celery`` workers on a ``redis-server`` of the bench's own (so
kombu's ``unacked`` hash holds only the bench's messages) and on RabbitMQ,
running ``bench.nap`` tasks of known length.  Run from the repository root::

    .venv/bin/python -m bench.shutdown                # about 4 minutes
    .venv/bin/python -m bench.shutdown --only drain   # or cold, prefetch, redelivery

1. ``drain``: warm shutdown (SIGTERM to the main process, as systemd's
   ``KillMode=mixed`` and supervisor's ``stopasgroup=false`` send it) while
   every process runs a task of known length: the time from the signal to the
   worker's exit, against the time the tasks had left; the same with no task
   running; and SIGTERM to the whole process group (systemd's default
   ``KillMode=control-group``, supervisor's ``stopasgroup=true``).
2. ``cold``: SIGQUIT while a task runs, with ``acks_late``: time to exit,
   and where the message is afterwards (queued again, or unacknowledged).
3. ``prefetch``: 20 long tasks queued, a ``-c 2`` prefork worker SIGKILLed
   once two run: how many messages it held (``concurrency x
   worker_prefetch_multiplier``), and how many of those were lost outright
   (acknowledged already) or wait in the unacked hash for
   ``visibility_timeout``.
4. ``redelivery``: two workers, the one running an ``acks_late`` task
   SIGKILLed: how long until the other starts it, on Redis (a given
   ``visibility_timeout``, kombu's sweep every 100 s by default or every
   second) and on RabbitMQ.

``PYRAMID_TASKS_BENCH_AMQP_URL`` points at another RabbitMQ.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

import kombu
import redis
from celery import Celery
from pyramid.config import Configurator

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get(
    "PYRAMID_TASKS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)


# -- the app the workers run: ``use = call:bench.shutdown:main`` ----------------
def nap(key, seconds, redis_url):
    """A task of known length: ``seconds``, or until ``<key>:go`` is pushed.

    Records its start (``<key>:started``: pid and time) and its end
    (``<key>:done``).
    """
    client = redis.Redis.from_url(redis_url)
    client.rpush(f"{key}:started", f"{os.getpid()} {time.time()}")
    # Polled, not a blocking read: redis-py's socket timeout would end it.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not client.exists(f"{key}:go"):
        time.sleep(0.05)
    client.rpush(f"{key}:done", os.getpid())
    client.close()


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_tasks")
        config.add_task(nap, name="bench.nap")
    return config.make_wsgi_app()


INI = """\
[app:main]
use = call:bench.shutdown:main
celery.broker_url = {broker_url}
celery.task_default_queue = {queue}
celery.task_ignore_result = true
celery.broker_connection_retry_on_startup = false
celery.worker_hijack_root_logger = false
{settings}

[loggers]
keys = root, celery

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console

[logger_celery]
level = INFO
handlers =
qualname = celery

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)-5.5s [%(name)s] %(message)s
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=60.0, message="condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)
    return value


@contextmanager
def redis_server(folder):
    """The URL of a ``redis-server`` of the bench's own, on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, 10, "redis-server")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait()


class Worker:
    """``tasks-celery INI -- worker``, a session of its own."""

    def __init__(self, folder, broker_url, queue, args, settings):
        self.name = f"b{uuid.uuid4().hex[:8]}"
        ini = Path(folder) / f"{self.name}.ini"
        lines = "\n".join(f"{key} = {value}" for key, value in settings.items())
        ini.write_text(INI.format(broker_url=broker_url, queue=queue, settings=lines))
        self.log_path = Path(folder) / f"{self.name}.log"
        command = [str(Path(sys.executable).parent / "tasks-celery"), str(ini)]
        command += ["--", "worker", "-n", f"{self.name}@bench", *args]
        command += ["--without-mingle", "--without-gossip"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: "ready." in self.log, 60, f"worker {self.name}")

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def signal(self, number, group=False):
        if group:
            os.killpg(self.process.pid, number)
        else:
            self.process.send_signal(number)

    def kill(self):
        """SIGKILL the main process and its children, as systemd and
        supervisor do at the end of their stop timeout."""
        self.process.send_signal(signal.SIGSTOP)  # starts no child from here on
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait(self, timeout=120):
        return self.process.wait(timeout=timeout)

    def close(self):
        if self.process.poll() is None:
            self.kill()
        else:  # what its group left (a pool child)
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


class Naps:
    """Sends ``bench.nap`` tasks on ``queue`` and reads what they recorded."""

    def __init__(self, broker_url, redis_url, queue):
        self.app = Celery("bench_shutdown", set_as_current=False)
        self.app.conf.broker_url = broker_url
        self.app.conf.task_default_queue = queue
        self.redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url)
        self.key = f"nap:{uuid.uuid4().hex[:10]}"

    def send(self, count, seconds):
        with self.app.producer_or_acquire() as producer:
            for _ in range(count):
                self.app.send_task(
                    "bench.nap",
                    (self.key, seconds, self.redis_url),
                    producer=producer,
                )

    def started(self):
        """``(pid, time)`` of every run started."""
        runs = self.client.lrange(f"{self.key}:started", 0, -1)
        return [(int(p), float(t)) for p, t in (run.split() for run in runs)]

    def done(self):
        return self.client.llen(f"{self.key}:done")

    def release(self):
        self.client.rpush(f"{self.key}:go", "go")

    def close(self):
        self.client.close()


def queue_name():
    return f"bench_shutdown_{uuid.uuid4().hex[:8]}"


# -- 1. warm shutdown ---------------------------------------------------------------
def drain(folder, redis_url, pool, concurrency, seconds, group=False):
    """Seconds from SIGTERM to exit, seconds the tasks had left, tasks done."""
    queue = queue_name()
    naps = Naps(redis_url, redis_url, queue)
    worker = Worker(folder, redis_url, queue, ["-P", pool, "-c", str(concurrency)], {})
    try:
        if seconds:
            naps.send(concurrency, seconds)
            wait_for(lambda: len(naps.started()) == concurrency, 60, "the naps")
        started = [at for _, at in naps.started()]
        sent = time.time()
        worker.signal(signal.SIGTERM, group=group)
        code = worker.wait()
        exited = time.time()
        left = max((at + seconds - sent for at in started), default=0.0)
        return {
            "drain": exited - sent,
            "left": left,
            "done": naps.done(),
            "of": len(started),
            "code": code,
        }
    finally:
        worker.close()
        naps.close()


def run_drain(folder, redis_url, rounds):
    rows = []
    cases = [
        ("prefork", 2, 0, False, "idle"),
        ("prefork", 2, 3, False, "2 tasks of 3 s"),
        ("prefork", 2, 6, False, "2 tasks of 6 s"),
        ("threads", 4, 3, False, "4 tasks of 3 s"),
        ("prefork", 2, 3, True, "2 tasks of 3 s, TERM to the group"),
    ]
    for pool, concurrency, seconds, group, title in cases:
        runs = [
            drain(folder, redis_url, pool, concurrency, seconds, group)
            for _ in range(rounds)
        ]
        over = [run["drain"] - run["left"] for run in runs]
        row = (
            f"drain  -P {pool} -c {concurrency}, {title}: "
            f"exit {statistics.median(r['drain'] for r in runs):.2f} s after "
            f"SIGTERM (median of {rounds}), tasks had "
            f"{statistics.median(r['left'] for r in runs):.2f} s left; exit "
            f"{min(over):.2f}-{max(over):.2f} s after the last task; done "
            f"{[r['done'] for r in runs]} of {[r['of'] for r in runs]}; exit "
            f"status {sorted({r['code'] for r in runs})}"
        )
        print(row, flush=True)
        rows.append(row)
    return rows


# -- 2. cold shutdown ----------------------------------------------------------------
def run_cold(folder, redis_url):
    rows = []
    for pool in ("prefork", "threads"):
        queue = queue_name()
        naps = Naps(redis_url, redis_url, queue)
        settings = {"celery.task_acks_late": "true"}
        worker = Worker(folder, redis_url, queue, ["-P", pool, "-c", "1"], settings)
        try:
            naps.send(1, 30)
            wait_for(naps.started, 60, "the nap")
            sent = time.time()
            worker.signal(signal.SIGQUIT)
            code = worker.wait()
            took = time.time() - sent
            queued, unacked = naps.client.llen(queue), naps.client.hlen("unacked")
            row = (
                f"cold   -P {pool}, acks_late, SIGQUIT while a 30 s task runs: "
                f"exit after {took:.2f} s, status {code}, task done "
                f"{naps.done()}; message queued again {queued}, unacked {unacked}"
            )
        finally:
            worker.close()
            naps.client.delete(queue, "unacked", "unacked_index")
            naps.close()
        print(row, flush=True)
        rows.append(row)
    return rows


# -- 3. what a SIGKILLed worker holds ----------------------------------------------
def run_prefetch(folder, redis_url):
    rows = []
    total = 20
    for multiplier in (1, 4):
        for acks_late in ("false", "true"):
            queue = queue_name()
            naps = Naps(redis_url, redis_url, queue)
            settings = {
                "celery.worker_prefetch_multiplier": str(multiplier),
                "celery.task_acks_late": acks_late,
            }
            args = ["-P", "prefork", "-c", "2"]
            worker = Worker(folder, redis_url, queue, args, settings)
            try:
                naps.send(total, 60)
                wait_for(lambda n=naps: len(n.started()) == 2, 60, "two naps")
                # Settled: the queue's length unchanged for half a second.
                previous, still = None, 0
                while still < 25:
                    length = naps.client.llen(queue)
                    still = still + 1 if length == previous else 0
                    previous = length
                    time.sleep(0.02)
                worker.kill()
                queued = naps.client.llen(queue)
                unacked = naps.client.hlen("unacked")
                held = total - queued
                row = (
                    f"held   -c 2, prefetch_multiplier {multiplier}, acks_late "
                    f"{acks_late}: held {held} (2 running), unacked (back after "
                    f"visibility_timeout) {unacked}, lost outright {held - unacked}"
                )
            finally:
                worker.close()
                for _ in range(total):
                    naps.release()
                naps.client.delete(queue, "unacked", "unacked_index")
                naps.close()
            print(row, flush=True)
            rows.append(row)
    return rows


# -- 4. redelivery after SIGKILL -----------------------------------------------------
def redelivery(folder, broker_url, redis_url, settings):
    """Seconds from the SIGKILL of the worker running an acks_late task to
    its start on the other worker."""
    queue = queue_name()
    naps = Naps(broker_url, redis_url, queue)
    settings = {
        "celery.task_acks_late": "true",
        "celery.worker_prefetch_multiplier": "1",
        **settings,
    }
    args = ["-P", "threads", "-c", "1"]
    workers = [Worker(folder, broker_url, queue, args, settings) for _ in range(2)]
    try:
        naps.send(1, 300)
        [(pid, _at)] = wait_for(naps.started, 60, "the nap")
        [victim] = [w for w in workers if w.process.pid == pid]
        killed = time.time()
        victim.kill()
        runs = wait_for(lambda: naps.started()[1:], 300, "the second run")
        return runs[0][1] - killed
    finally:
        naps.release()
        for worker in workers:
            worker.close()
        if broker_url.startswith("amqp"):
            with kombu.Connection(broker_url) as connection:
                connection.default_channel.queue_delete(queue)
        else:
            naps.client.delete(queue, "unacked", "unacked_index")
        naps.close()


def run_redelivery(folder, redis_url, rounds):
    visibility = "celery.broker_transport_options.visibility_timeout"
    sweep = {
        "celery.broker_transport_options.unacked_restore_interval": "1",
        "celery.broker_transport_options.unacked_restore_throttle": "1",
    }
    cases = [
        ("RabbitMQ", AMQP_URL, {}, rounds),
        (
            "Redis, visibility_timeout 5, sweep every 1 s",
            redis_url,
            {visibility: "5", **sweep},
            rounds,
        ),
        (
            "Redis, visibility_timeout 10, kombu's sweep (every 100 s)",
            redis_url,
            {visibility: "10"},
            1,
        ),
    ]
    rows = []
    for title, broker_url, settings, count in cases:
        delays = [
            redelivery(folder, broker_url, redis_url, settings) for _ in range(count)
        ]
        row = (
            f"redeliver after SIGKILL, {title}: "
            + ", ".join(f"{delay:.2f}" for delay in delays)
            + " s"
        )
        print(row, flush=True)
        rows.append(row)
    return rows


GROUPS = ("drain", "cold", "prefetch", "redelivery")


def run(only=GROUPS, rounds=3):
    rows = []
    with tempfile.TemporaryDirectory() as folder, redis_server(folder) as redis_url:
        if "drain" in only:
            rows += run_drain(folder, redis_url, rounds)
        if "cold" in only:
            rows += run_cold(folder, redis_url)
        if "prefetch" in only:
            rows += run_prefetch(folder, redis_url)
        if "redelivery" in only:
            rows += run_redelivery(folder, redis_url, rounds)
    return rows


def cli(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.shutdown", description=__doc__
    )
    parser.add_argument("--only", action="append", choices=GROUPS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.only or GROUPS, args.rounds)


if __name__ == "__main__":
    cli()
