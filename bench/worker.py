"""Scenarios 1, 2, 6 and 7: real workers, plain Celery against pyramid_tasks."""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy
from celery import Celery

from pyramid_tasks.jobs import metadata as jobs_metadata

from .dispatch import REDIS_URL
from .harness import CPUMeter, Scenario, alternate
from .schema import metadata

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get(
    "PYRAMID_TASKS_BENCH_DATABASE_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
)
FLAGS = ["-P", "solo", "--without-mingle", "--without-gossip", "--without-heartbeat"]
PEER_VENV = ROOT / "bench" / ".peer-venv"
PEER_PACKAGES = [
    "pyramid_celery>=4,<5",
    "celery[redis]",
    "SQLAlchemy>=2",
    "psycopg[binary]",
]


def ensure_peer_venv():
    """``bench/.peer-venv`` with pyramid_celery 4 (it cannot share our venv)."""
    celery = PEER_VENV / "bin" / "celery"
    if not celery.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(PEER_VENV / "bin" / "pip"), "install", "-q", *PEER_PACKAGES]
        print(f"installing {' '.join(PEER_PACKAGES)} in {PEER_VENV}", flush=True)
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"installing the peer virtualenv failed:\n{done.stderr}")
    return celery


def _peer_ini(queue, schema):
    path = Path(tempfile.mkdtemp(prefix="bench-peer-")) / "peer.ini"
    path.write_text(
        "[app:main]\n"
        "use = call:bench.peer_app:main\n"
        f"bench.database_url = {DATABASE_URL}\n"
        f"bench.schema = {schema}\n\n"
        "[celery]\n"
        f"broker_url = {REDIS_URL}\n"
        f"task_default_queue = {queue}\n"
    )
    return path


class Worker:
    def __init__(
        self, variant, queue, schema, redis_url=REDIS_URL, database_url=DATABASE_URL
    ):
        self.node = f"bench-{variant}-{uuid.uuid4().hex[:6]}@localhost"
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BENCH_REDIS_URL": redis_url,
            "BENCH_DATABASE_URL": database_url,
            "BENCH_SCHEMA": schema,
            "BENCH_QUEUE": queue,
        }
        # "ours" and "durable" (pyramid_tasks.jobs included): tasks-celery.
        if variant == "plain":
            command = [str(bin_dir / "celery"), "-A", "bench.apps:plain", "worker"]
        elif variant == "peer":
            command = [str(ensure_peer_venv()), "-A", "pyramid_celery.celery_app"]
            command += ["worker", "--ini", str(_peer_ini(queue, schema))]
        else:
            variables = {
                "redis_url": redis_url,
                "database_url": database_url,
                "schema": schema,
                "queue": queue,
                "durable": str(variant == "durable").lower(),
            }
            command = [str(bin_dir / "tasks-celery"), str(ROOT / "bench" / "bench.ini")]
            for name, value in variables.items():
                command += ["--var", f"{name}={value}"]
            command += ["--", "worker"]
        command += [*FLAGS, "-Q", queue, "-n", self.node, "-l", "warning"]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def rss_kb(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        time.sleep(0.001)


class Bench:
    def __init__(self, redis_url=REDIS_URL, database_url=DATABASE_URL):
        self.redis_url, self.database_url = redis_url, database_url
        self.redis = redis.Redis.from_url(redis_url)
        self.sender = Celery("bench_sender", broker=redis_url, set_as_current=False)
        self.schema = f"bench_{uuid.uuid4().hex[:8]}"
        self.engine = sqlalchemy.create_engine(database_url)
        with self.engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{self.schema}"'))
            connection.execute(sqlalchemy.text(f'SET search_path TO "{self.schema}"'))
            metadata.create_all(connection)
            jobs_metadata.create_all(connection)  # durable mode's table

    def close(self):
        with self.engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        self.engine.dispose()
        self.redis.close()

    def fill(self, queue, task, count):
        """``count`` messages of ``task`` then a marker; returns the marker key."""
        key = f"bench:done:{uuid.uuid4().hex}"
        with self.sender.producer_or_acquire() as producer:
            for n in range(count):
                self.sender.send_task(
                    task,
                    (n,) if task == "bench.insert" else (),
                    queue=queue,
                    producer=producer,
                )
            self.sender.send_task("bench.done", (key,), queue=queue, producer=producer)
        return key

    def done(self, key):
        return self.redis.exists(key)

    def ping(self, worker):
        assert worker.process.poll() is None, "worker died"
        return self.sender.control.ping(destination=[worker.node], timeout=0.2)

    def drain(self, worker, task, count, fill=None, cpu=None):
        """Milliseconds per task to drain a queue of ``count`` tasks, sent by
        ``fill(queue, task, count)`` (returns the marker key; default
        :meth:`fill`).  ``cpu``: a list to append the CPU milliseconds per
        task of the worker and the services to (:class:`CPUMeter`)."""
        queue = f"bench_q_{uuid.uuid4().hex[:8]}"
        key = (fill or self.fill)(queue, task, count)
        if cpu is not None:
            meter = CPUMeter(worker.process.pid)
            meter.start()
        start = time.perf_counter()
        self.sender.control.add_consumer(queue, destination=[worker.node], reply=True)
        wait_for(lambda: self.done(key))
        elapsed = time.perf_counter() - start
        if cpu is not None:
            cpu.append(meter.stop(count))
        self.sender.control.cancel_consumer(
            queue, destination=[worker.node], reply=True
        )
        self.redis.delete(queue, key)
        return elapsed * 1000 / count

    def worker(self, variant, queue):
        return Worker(variant, queue, self.schema, self.redis_url, self.database_url)

    def start_workers(self, *variants):
        """Workers of ``variants`` on an idle queue, once each answers ping."""
        idle = f"bench_idle_{uuid.uuid4().hex[:8]}"
        workers = {v: self.worker(v, idle) for v in variants}
        for worker in workers.values():
            wait_for(lambda w=worker: self.ping(w))
        return workers

    def compare_drains(self, workers, baseline, task, title, target, rounds, count):
        """A throughput scenario: ``workers[baseline]`` against ``workers["ours"]``."""
        scenario = Scenario(title, target, unit="ms/task", higher_is_better=True)
        for worker in workers.values():  # warm-up
            self.drain(worker, task, 20)
        scenario.baseline, scenario.ours = alternate(
            rounds,
            lambda: self.drain(workers[baseline], task, count),
            lambda: self.drain(workers["ours"], task, count),
        )
        return scenario

    def startup(self, variant):
        """Seconds from launching a worker to its first task done."""
        queue = f"bench_q_{uuid.uuid4().hex[:8]}"
        key = self.fill(queue, "bench.noop", 0)
        worker = self.worker(variant, queue)
        wait_for(lambda: self.done(key))
        elapsed = time.perf_counter() - worker.started
        worker.stop()
        self.redis.delete(queue, key)
        return elapsed


def run(quick):
    rounds, count, memory_count = (3, 300, 2000) if quick else (7, 2000, 10000)
    bench = Bench()
    workers = bench.start_workers("plain", "ours")
    try:
        scenarios = [
            bench.compare_drains(workers, "plain", task, title, target, rounds, count)
            for task, title, target in (
                ("bench.noop", "1. worker drain, no-op task (ms/task)", ">= 0.95"),
                ("bench.insert", "2. worker drain, one INSERT (ms/task)", ">= 0.90"),
            )
        ]

        memory = Scenario(
            f"7. worker RSS growth over {memory_count} tasks (MB)",
            "< 5 MB growth",
            unit="MB",
            absolute=True,
        )
        for variant in ("plain", "ours"):
            worker = workers[variant]
            before = worker.rss_kb()
            bench.drain(worker, "bench.noop", memory_count)
            growth = (worker.rss_kb() - before) / 1024
            (memory.baseline if variant == "plain" else memory.ours).append(growth)
        memory.note = (
            f"ours grew {memory.ours[0]:.2f} MB, "
            f"plain Celery {memory.baseline[0]:.2f} MB"
        )
        scenarios.append(memory)
    finally:
        for worker in workers.values():
            worker.stop()

    startup = Scenario("6. worker start-up to first task done (s)", "<= 1.2", unit="s")
    startup.baseline, startup.ours = alternate(
        max(3, rounds // 2),
        lambda: bench.startup("plain"),
        lambda: bench.startup("ours"),
    )
    scenarios.append(startup)
    bench.close()
    return scenarios


def run_peer(quick):
    """Scenario 8: the same drains against pyramid_celery 4 (its own venv)."""
    rounds, count = (3, 300) if quick else (7, 2000)
    ensure_peer_venv()
    bench = Bench()
    workers = bench.start_workers("peer", "ours")
    try:
        scenarios = [
            bench.compare_drains(
                workers,
                "peer",
                task,
                f"8. vs pyramid_celery 4.0: drain, {title}",
                "report",
                rounds,
                count,
            )
            for task, title in (("bench.noop", "no-op"), ("bench.insert", "one INSERT"))
        ]
    finally:
        for worker in workers.values():
            worker.stop()
        bench.close()
    return scenarios
