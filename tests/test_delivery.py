"""What a killed worker costs: real workers SIGKILLed mid-task, on Redis.

One task is sent; its run is killed (the whole worker, main process and
prefork children, or only the child running it), a fresh worker is started
where a rerun is due, and the runs are counted: how many started, how many
completed, and how many copies of the message are left (queued, or in kombu's
unacked hash) that could still run it.  A run that completed nowhere is a lost
task; a second run started is a duplicate.  docs/worker.rst carries the table.
"""

import configparser
import os
import signal
import subprocess
import uuid

import pytest
import redis

from pyramid_tasks.settings import parse_celery_settings

from .conftest import ROOT, wait_for

ACKS_LATE = {"celery.task_acks_late": "true"}
REJECT = {**ACKS_LATE, "celery.task_reject_on_worker_lost": "true"}


def visibility(seconds):
    """kombu's Redis visibility_timeout, swept for once a second.

    kombu restores the unacked messages older than visibility_timeout when a
    worker starts and every unacked_restore_interval * unacked_restore_throttle
    seconds (10 x 10 by default).
    """
    options = "celery.broker_transport_options"
    return {
        f"{options}.visibility_timeout": str(seconds),
        f"{options}.unacked_restore_interval": "1",
        f"{options}.unacked_restore_throttle": "1",
    }


# How long the main process waits for a dead child's result before it calls
# the run lost (10 s by default): only the test's duration depends on it.
QUICK_LOSS = {"celery.worker_lost_wait": "0.2"}


@pytest.fixture
def ini_vars(ini_vars, private_redis):
    # kombu keeps one unacked hash per Redis database, shared by every queue:
    # a sweep with a short visibility_timeout would restore other tests' tasks.
    return {**ini_vars, "redis_url": private_redis}


def _children(pid):
    """The process ids whose parent is ``pid``."""
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in listed.stdout.split()]


def _dead(pid):
    """Gone, or a zombie waiting for whoever inherited it to reap it."""
    command = ["ps", "-o", "stat=", "-p", str(pid)]
    state = subprocess.run(command, capture_output=True, text=True).stdout.strip()
    return state[:1] in ("", "Z")


def _kill_worker(worker):
    """SIGKILL the worker's main process, then its prefork children."""
    worker.process.send_signal(signal.SIGSTOP)  # it starts no child from here on
    children = _children(worker.process.pid)
    worker.process.kill()
    worker.process.wait()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(map(_dead, children)), timeout=10, message="the children")


# conf/production.ini's settings, scaled down: a visibility_timeout longer
# than the task takes to start here (3 s seen on a loaded machine), short
# enough for the test.
RECOMMENDED = {**REJECT, **visibility(5)}


class Run:
    """One ``hold`` task sent to ``worker``, and its runs counted in Redis."""

    def __init__(self, worker, client, queue):
        self.client, self.queue = client, queue
        self.key = f"hold:{uuid.uuid4().hex}"
        self.result = worker.celery_app.tasks["tests.probe_app.hold"].delay(self.key)

    def started(self):
        """The process ids of the runs started so far."""
        return [int(pid) for pid in self.client.lrange(f"{self.key}:started", 0, -1)]

    def completed(self):
        return int(self.client.get(f"{self.key}:completed") or 0)

    def go(self):
        self.client.rpush(f"{self.key}:go", "go")

    def copies(self):
        """Copies of the message at the broker: queued, and delivered unacked."""
        return self.client.llen(self.queue), self.client.hlen("unacked")

    def settle(self, completed, left, decided):
        """Wait until ``completed`` runs completed and ``left`` copies remain,
        and the worker has ``decided`` what to do with a lost run."""

        def settled():
            if self.copies() != left or self.completed() != completed:
                return False
            return not decided or self.result.state == decided

        wait_for(settled, timeout=30, message=f"{completed} runs and {left} copies")
        return len(self.started()), self.completed(), self.copies()


# Per configuration: the child running the task killed, then the whole worker
# killed and a fresh one started.  Each: (runs started, runs completed, copies
# left at the broker as (queued, unacked)).
CASES = [
    pytest.param({}, (1, 0, (0, 0)), (1, 0, (0, 0)), id="celery-defaults"),
    # The unacked copy is redelivered once visibility_timeout (one hour by
    # default) has passed, by whichever worker sweeps first.
    pytest.param(ACKS_LATE, (1, 0, (0, 0)), (1, 0, (0, 1)), id="acks_late"),
    pytest.param(RECOMMENDED, (2, 1, (0, 0)), (2, 1, (0, 0)), id="recommended"),
]


@pytest.mark.parametrize("settings, child_killed, worker_killed", CASES)
def test_what_a_killed_worker_costs(
    start_worker, ini_vars, settings, child_killed, worker_killed
):
    client = redis.Redis.from_url(ini_vars["redis_url"])
    settings = {**QUICK_LOSS, **settings}
    worker = start_worker("-P", "prefork", "-c", "1", settings=settings)

    run = Run(worker, client, ini_vars["queue"])
    [child] = wait_for(run.started, timeout=30, message="the task to start")
    os.kill(child, signal.SIGKILL)
    run.go()
    # FAILURE: the lost run was not requeued; SUCCESS: its rerun completed.
    decided = "SUCCESS" if child_killed[1] else "FAILURE"
    assert run.settle(child_killed[1], child_killed[2], decided) == child_killed

    run = Run(worker, client, ini_vars["queue"])
    wait_for(run.started, timeout=30, message="the task to start")
    _kill_worker(worker)
    # A fresh worker where a rerun is due.  Without a copy nothing can run it;
    # acks_late's unacked copy waits for visibility_timeout (an hour).
    if worker_killed[1]:
        start_worker("-P", "threads", settings=settings)
    run.go()
    assert run.settle(worker_killed[1], worker_killed[2], None) == worker_killed
    client.close()


def test_a_task_outliving_visibility_timeout_runs_again_meanwhile(
    start_worker, ini_vars
):
    """acks_late on Redis: the copy starts while the first run still runs."""
    client = redis.Redis.from_url(ini_vars["redis_url"])
    settings = {**ACKS_LATE, **visibility(2)}
    worker = start_worker("-P", "threads", "-c", "2", settings=settings)
    run = Run(worker, client, ini_vars["queue"])
    wait_for(lambda: len(run.started()) == 2, timeout=30, message="a second run")
    run.go()
    assert run.settle(2, (0, 0), "SUCCESS") == (2, 2, (0, 0))
    client.close()


def test_production_ini_sets_the_recommended_delivery_settings():
    """docs/worker.rst recommends them; conf/production.ini is the example."""
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "conf" / "production.ini")
    conf = parse_celery_settings(dict(parser.items("app:main")))
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["broker_transport_options"] == {"visibility_timeout": 3600}
    assert conf["worker_prefetch_multiplier"] == 1
