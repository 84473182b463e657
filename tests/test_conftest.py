"""The suite's own helpers: missing services and worker processes."""

import subprocess
import sys

import pytest

from . import conftest
from .conftest import (
    NullDataManager,
    Worker,
    check_amqp,
    check_postgres,
    check_redis,
    free_port,
    wait_for,
)


@pytest.mark.parametrize("in_ci, outcome", [(False, "skip"), (True, "fail")])
def test_an_unreachable_service_skips_locally_and_fails_in_ci(
    monkeypatch, in_ci, outcome
):
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    expected = pytest.skip.Exception if outcome == "skip" else pytest.fail.Exception
    port = free_port()
    with pytest.raises(expected, match="Redis is unreachable"):
        check_redis(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(expected, match="PostgreSQL is unreachable"):
        check_postgres(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    with pytest.raises(expected, match="RabbitMQ is unreachable"):
        check_amqp(f"amqp://guest:guest@127.0.0.1:{port}//")


def test_a_worker_that_exits_is_reported_with_its_log(tmp_path):
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
            stdout=log,
        )
    process.wait()
    worker = Worker(process, "w@localhost", log_path, celery_app=None)
    with pytest.raises(pytest.fail.Exception, match="exited with 3:\nbad config"):
        worker.ping()
    worker.stop()  # already gone: nothing to do


def test_a_worker_ignoring_sigterm_is_killed():
    script = (
        "import signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "signal.pause()  # until SIGKILL\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "ready\n"
    Worker(process, "w@localhost", None, celery_app=None).stop(timeout=0.5)
    assert process.returncode == -9
    process.stdout.close()


def test_what_a_worker_left_in_its_session_is_killed():
    # The main process exits at once; its child (an embedded beat, say) would
    # live on, ignoring SIGTERM, were it not for the session's SIGKILL.
    script = (
        "import os, signal\n"
        "if os.fork() == 0:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    print(os.getpid(), flush=True)\n"
        "    signal.pause()  # until SIGKILL\n"
        "    os._exit(0)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    orphan = int(process.stdout.readline())
    process.wait()
    Worker(process, "w@localhost", None, celery_app=None, session=True).stop()
    process.stdout.close()
    wait_for(lambda: _gone(orphan), timeout=10, message=f"process {orphan} to end")
    with open("/proc/sys/kernel/pid_max") as pid_max:
        assert _gone(int(pid_max.read()) + 1)  # no such process, ever


def _gone(pid):
    """Whether ``pid`` has ended (a zombie counts: PID 1 may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_wait_for_fails_at_its_deadline():
    with pytest.raises(pytest.fail.Exception, match="waiting for the impossible"):
        wait_for(lambda: False, timeout=0.05, message="the impossible")


def test_the_null_data_manager_takes_part_in_a_commit():
    import transaction

    tm = transaction.TransactionManager(explicit=True)
    with tm as txn:
        txn.join(NullDataManager())
    assert txn.status == "Committed"


def test_a_broker_resetting_the_ping_is_a_miss_not_a_failure():
    # A broker that takes a connection and resets it at the first bytes:
    # the worker's start is waited for with pings, and one reset (seen on
    # RabbitMQ under load) must only mean "not yet".
    import socket
    import struct
    import threading

    from celery import Celery

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def reset_one():
        client, _ = server.accept()
        accepted.append(client)
        client.recv(1024)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    thread = threading.Thread(target=reset_one, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    app = Celery(broker=f"redis://127.0.0.1:{port}/0")
    app.conf.broker_transport_options = {"max_retries": 0}  # one try a ping
    # A live stand-in for the worker process, until stop() ends it.
    process = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    worker = Worker(process, "w@localhost", None, celery_app=app)
    try:
        assert worker.ping() is None
        assert len(accepted) == 1
    finally:
        thread.join(10)
        server.close()
        worker.stop()
