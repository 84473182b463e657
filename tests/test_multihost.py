"""Several hosts, one broker, one database: Linux network namespaces.

The module builds its hosts once (tests/netns.py): "web", "worker1" and
"worker2", each a network namespace on a bridge of a private subnet.  The
bridge's address, in the root namespace, is where the hosts find the broker
(a ``redis-server`` of each test's own, or RabbitMQ through a forwarder) and
PostgreSQL (through a forwarder).  Workers are real ``tasks-celery``
processes started in their host's namespace; the web host is a process
making requests to the app (tests/multihost_web.py); tasks say which host
ran them by the address they have there (tests/multihost_app.py).
"""

import configparser
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import redis
from pyramid.paster import get_app
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from demo_app.models import Order, create_tables
from pyramid_tasks.jobs import Job

from . import conftest, netns
from .conftest import _LOGGING_SECTIONS, ROOT, TEST_INI, Worker, tasks_celery, wait_for
from .netns import IP, Forwarder, network, redis_server

pytestmark = pytest.mark.counts

HOSTS = ("web", "worker1", "worker2")


@pytest.fixture(scope="module")
def hosts():
    with network(HOSTS) as built:
        yield built


@pytest.fixture(scope="module")
def database(hosts, database_url):
    """The test database's URL as the hosts reach it (a forwarder)."""
    url = make_url(database_url)
    forwarder = Forwarder(hosts.address, (url.host, url.port or 5432))
    yield url.set(host=hosts.address, port=forwarder.port).render_as_string(False)
    forwarder.close()


@pytest.fixture(scope="module")
def rabbitmq(hosts, amqp_url):
    """RabbitMQ's URL as the hosts reach it (a forwarder)."""
    parts = urlsplit(amqp_url)
    forwarder = Forwarder(hosts.address, (parts.hostname, parts.port or 5672))
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{hosts.address}:{forwarder.port}"
    yield parts._replace(netloc=netloc).geturl()
    forwarder.close()


@pytest.fixture
def own_redis(hosts, tmp_path):
    """A Redis of this test's own on the bridge: the runs' counters, and the
    broker unless the test takes RabbitMQ."""
    with redis_server(hosts.address, tmp_path) as url:
        yield url


@pytest.fixture
def broker(request, own_redis):
    if request.param == "rabbitmq":
        return request.getfixturevalue("rabbitmq")
    return own_redis


@pytest.fixture
def start_on(hosts, tmp_path):
    """Start a worker of ``ini`` in ``host``'s namespace; stopped at
    teardown (SIGTERM, which saves its coverage)."""
    started = []

    def start(host, ini, app, *celery_args):
        node = f"{host.name}.{uuid.uuid4().hex[:6]}@{hosts.token}"
        command = host.command(tasks_celery(), ini, "--", "worker", "-n", node)
        command += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        log_path = tmp_path / f"{node}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*command, *celery_args],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(Worker(process, node, log_path, app, ini, session=True))
        return started[-1]

    yield start
    for worker in started:  # all at once: each warm shutdown takes a while
        if worker.process.poll() is None:
            worker.process.terminate()
    for worker in started:
        worker.stop()


def ready(*workers):
    """Wait until each worker says it is ready (connected, consuming)."""

    def up(worker):
        assert worker.process.poll() is None, f"{worker.node} exited:\n{worker.log}"
        return f"{worker.node} ready." in worker.log

    wait_for(lambda: all(map(up, workers)), timeout=60, message="the workers")


def write_ini(path, settings):
    """An INI of tests/multihost_app.py with ``settings``, and the logging
    sections of conf/test.ini."""
    parser = configparser.RawConfigParser(default_section="none")  # no [DEFAULT]
    parser.read(TEST_INI)
    lines = ["[app:main]", "use = call:tests.multihost_app:main"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    for name in parser.sections():
        if name.startswith(_LOGGING_SECTIONS):
            lines.append(f"\n[{name}]")
            lines += [f"{key} = {value}" for key, value in parser[name].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def app_settings(database, schema, broker, own_redis, queue, **settings):
    return {
        "sqlalchemy.url": database,
        "demo.schema": schema,
        "celery.broker_url": broker,
        "celery.task_default_queue": queue,
        "celery.broker_connection_retry_on_startup": "false",
        "celery.worker_hijack_root_logger": "false",
        "celery.worker_prefetch_multiplier": "1",
        "multihost.redis_url": own_redis,
        **settings,
    }


# -- web, two workers, a kill and a cut ---------------------------------------

N = 20
# The job table re-queues a started job whose worker sent no heartbeat for
# its lease (a minute by default): a second, for the test to see it act.
LEASE = 1
JOB_TABLE = {
    "multihost.jobs": "true",
    "tasks.jobs.lease": f"{LEASE}s",
    "tasks.jobs.relay_interval": "200ms",
    "tasks.jobs.relay_grace": "1s",
}
# Celery alone: the message acknowledged after the run and given back when
# the worker dies (the job table's defaults for transactional tasks), and on
# Redis given to another worker once unacknowledged for visibility_timeout
# (an hour by default; kombu sweeps for them every 100 s): two seconds,
# swept for every second, for the test to see it act.
CELERY_ALONE = {
    "celery.task_acks_late": "true",
    "celery.task_reject_on_worker_lost": "true",
    "celery.broker_transport_options.visibility_timeout": "2",
    "celery.broker_transport_options.unacked_restore_interval": "1",
    "celery.broker_transport_options.unacked_restore_throttle": "1",
}


def depth(app, queue):
    """Messages waiting in ``queue`` (not those delivered, unacknowledged)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:  # Redis: an empty queue is no key
            return 0


def fenced(worker, job_id):
    """The deliveries of ``job_id`` that found the job done in ``worker``
    (before the body, or waiting for its lock) and changed nothing."""
    done = f"[{job_id}] is succeeded: "
    return worker.log.count(f"{done}not run.") + worker.log.count(
        f"{done}this delivery changes nothing."
    )


@pytest.mark.parametrize(
    "broker, jobs",
    [
        pytest.param("redis", True, id="redis-job-table"),
        pytest.param("redis", False, id="redis-celery-alone"),
        pytest.param("rabbitmq", True, id="rabbitmq-job-table"),
    ],
    indirect=["broker"],
)
def test_web_and_two_workers_one_cut_off_one_killed(
    hosts, database, broker, own_redis, jobs, pg_schema, tmp_path, start_on
):
    """Web commits N requests, each scheduling a transactional task; both
    workers consume (worker1 with two threads, worker2 with one), and each
    holds its third run open.  worker2's link goes down, its run in flight;
    worker1 is SIGKILLed, its own held run in flight; worker2's link comes
    back up, and worker2 finishes what is left.

    With the job table every effect lands exactly once.  The cut-off job's
    lease runs out, but its transaction still holds the job's lock (the
    database sees a live connection), so no relay re-queues it: worker2
    commits it once back.  The killed worker's job lost its lock with its
    connection: worker2's relay re-queues it, and every other copy of it
    waits for its lock, then changes nothing.  Celery alone (``acks_late``,
    a short ``visibility_timeout`` on Redis) loses nothing either, but Redis
    gives both held messages to worker1's other thread while their first
    runs are still open: the cut-off worker's job commits twice.
    """
    token = uuid.uuid4().hex[:8]
    queue = f"multihost_{token}"
    settings = app_settings(database, pg_schema, broker, own_redis, queue)
    settings.update({"multihost.hold": "3", **(JOB_TABLE if jobs else CELERY_ALONE)})
    ini = write_ini(tmp_path / "app.ini", settings)
    registry = get_app(str(ini)).registry
    app = registry.celery_app
    engine = registry["dbsession_factory"].kw["bind"]
    create_tables(engine, pg_schema)  # once, before the hosts start
    client = redis.Redis.from_url(own_redis)
    one, two = hosts["worker1"], hosts["worker2"]

    first = start_on(one, ini, app, "-P", "threads", "-c", "2")
    second = start_on(two, ini, app, "-P", "threads", "-c", "1")
    web = subprocess.Popen(
        hosts["web"].command(
            sys.executable, "-m", "tests.multihost_web", ini, token, N
        ),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready(first, second)
    client.rpush(f"{token}:start", "go")  # the web host's requests
    out, err = web.communicate(timeout=120)
    assert web.returncode == 0, err
    assert len(out.split()) == N  # a task id a request
    keys = [f"{token}:{index}" for index in range(N)]

    def runs(key):
        addresses = client.lrange(f"{key}:runs", 0, -1)
        return [hosts.by_address(address.decode()) for address in addresses]

    def held():
        return [json.loads(h) for h in client.lrange(f"{token}:held", 0, -1)]

    wait_for(lambda: len(held()) == 2, message="a run held open on each worker")
    holds = {hosts.by_address(address): (key, id_) for address, key, id_ in held()}
    (key1, id1), (key2, id2) = holds["worker1"], holds["worker2"]
    runs_before = Counter(host for key in keys for host in runs(key))

    def effects():
        with engine.connect() as connection:
            query = select(Order.email, func.count()).group_by(Order.email)
            return dict(connection.execute(query).all())

    def state(job_id):
        with engine.connect() as connection:
            return connection.scalar(select(Job.state).where(Job.id == job_id))

    def silent(job_id):
        """Seconds since the job's last heartbeat, by the database's clock."""
        with engine.connect() as connection:
            age = func.extract("epoch", func.now() - Job.heartbeat_at)
            return connection.scalar(select(age).where(Job.id == job_id))

    # The job table marks a run started once it has gone on for half a
    # second (a shorter run's mark lands with its outcome): a job that is not
    # marked has no lease to run out.
    wait_for(lambda: not jobs or state(id2) == "started", message="the mark")
    with two.cut():
        client.rpush(f"{token}:go:{two.address}", "go")  # heard once it is back
        # The queue drained first: kombu's Redis transport pops a message,
        # then files it as unacknowledged, and a worker killed in between
        # loses it, acks_late or not (celery/celery#7950).
        if jobs:  # no heartbeat: its lease runs out, and rounds of both relays
            wait_for(
                lambda: silent(id2) > LEASE + 0.6 and depth(app, queue) == 0,
                message="the lease to end",
            )
            # ... left it alone: its transaction holds its lock, so it is alive
            assert state(id2) == "started"
        else:  # Redis gave both held messages to worker1's other thread
            wait_for(
                lambda: (
                    [effects().get(key) for key in (key1, key2)] == [1, 1]
                    and depth(app, queue) == 0
                ),
                message="worker1's commits",
            )
        first.process.kill()  # SIGKILL, its own held run in flight
        first.process.wait()

    def states():
        with engine.connect() as connection:
            query = select(Job.state, func.count()).group_by(Job.state)
            return dict(connection.execute(query).all())

    def quiet():
        """Nothing queued, nothing running or reserved in worker2."""
        inspect = app.control.inspect([second.node], timeout=1)
        busy = [
            *(inspect.active() or {}).values(),
            *(inspect.reserved() or {}).values(),
        ]
        return depth(app, queue) == 0 and busy == [[], []]

    def settled():
        return (
            all(effects().get(key) for key in keys)
            and (not jobs or states() == {"succeeded": N})
            and (jobs or client.hlen("unacked") == 0)  # Redis's own redelivery
            and quiet()
        )

    # Twice in a row: a message taken from the queue is in none of the
    # places looked at until the worker files it (a moment).
    polls = []
    wait_for(
        lambda: polls.append(settled()) or polls[-2:] == [True, True],
        timeout=60,
        interval=0.2,
        message="every effect",
    )
    # What the killed worker held is left unacknowledged at Redis (never at
    # RabbitMQ, which gave it back when its connection closed), for Redis to
    # deliver again after visibility_timeout: given back now, by hand.
    left = client.hkeys("unacked")

    def done_copies():
        return fenced(second, id1) + fenced(second, id2)

    before = done_copies()
    with app.connection_for_write() as connection:
        for tag in left:
            connection.default_channel.qos.restore_by_tag(tag)
    wait_for(
        lambda: done_copies() == before + len(left) and quiet(),
        message="each copy given back to find its job done",
    )

    rows = effects()
    per_key = [rows.get(key, 0) for key in keys]
    counts = {
        "scheduled": sum(rows.get(f"{key}:web", 0) for key in keys),
        "run": sum(len(runs(key)) for key in keys),
        "effects": sum(per_key),
        "duplicates": sum(n - 1 for n in per_key if n > 1),
        "lost": per_key.count(0),
    }
    print(" ".join(f"{name}={value}" for name, value in counts.items()))
    print(f"runs before the faults, by host: {dict(sorted(runs_before.items()))}")
    print(f"held on worker1 (killed): runs on {runs(key1)}, effects {rows[key1]}")
    print(f"held on worker2 (cut off): runs on {runs(key2)}, effects {rows[key2]}")
    print(f"copies the killed worker left unacknowledged at Redis: {len(left)}")
    assert runs_before["worker1"] >= 3 and runs_before["worker2"] >= 3
    assert counts["scheduled"] == N and counts["lost"] == 0
    assert runs(key1)[0] == "worker1" and rows[key1] == 1  # the kill rolled back
    if jobs:
        copies = {key: fenced(second, job_id) for key, job_id in holds.values()}
        print(f"job rows: {states()}; copies that changed nothing on worker2: {copies}")
        assert counts == {
            "scheduled": N,
            "run": N + 1,
            "effects": N,
            "duplicates": 0,
            "lost": 0,
        }
        assert runs(key1) == ["worker1", "worker2"]
        assert runs(key2) == ["worker2"]
        # Redis kept the killed worker's message (given back, it found its
        # job done); RabbitMQ gave it back at once.
        assert len(left) == (1 if broker == own_redis else 0)
    else:
        assert counts["effects"] == N + counts["duplicates"]
        assert runs(key2)[:2] == ["worker2", "worker1"] and rows[key2] >= 2
        assert states() == {}  # no job table
    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)
    client.close()


# -- routing across two hosts --------------------------------------------------


def test_routes_queues_and_sites_across_two_hosts(
    hosts, database, own_redis, pg_schema, tmp_path, start_on
):
    """``celery.task_routes`` from the INI sends ``report`` to queue a,
    ``@task(queue="b")`` sends ``mail`` to b, ``apply_async(queue=...)``
    overrides both; worker1 consumes a (``-Q a``), worker2 consumes b.  A
    second site with another ``tasks.queue_prefix`` on the same broker has
    one worker on worker2's host consuming its own a and b: no task crosses
    from one site to the other, and neither does a remote control command."""
    token = uuid.uuid4().hex[:6]
    routes = json.dumps({"tests.multihost_app.report": {"queue": "a"}})

    def site(name):
        prefix = f"{name}{token}"
        settings = app_settings(
            database,
            pg_schema,
            own_redis,
            own_redis,
            "default",
            **{
                "tasks.queue_prefix": prefix,
                "celery.task_routes": routes,
                # Celery's remote control (ping, inspect, shutdown, rate_limit
                # by task name) is not in a queue: without an exchange of its
                # own, a site's commands reach the other site's workers too.
                "celery.control_exchange": prefix,
            },
        )
        ini = write_ini(tmp_path / f"{name}.ini", settings)
        return prefix, ini, get_app(str(ini)).registry.celery_app

    (one, ini1, app1), (two, ini2, app2) = site("one"), site("two")
    workers = [
        start_on(hosts["worker1"], ini1, app1, "-P", "threads", "-Q", "a"),
        start_on(hosts["worker2"], ini1, app1, "-P", "threads", "-Q", "b"),
        start_on(hosts["worker2"], ini2, app2, "-P", "threads", "-Q", "a,b"),
    ]
    ready(*workers)
    for app, nodes in ((app1, workers[:2]), (app2, workers[2:])):
        answers = app.control.ping(timeout=1)
        assert sorted(n for a in answers for n in a) == sorted(w.node for w in nodes)

    sent = {}  # key -> where it must run: host, site, queue

    def send(app, prefix, task, host, routed, **options):
        key = f"{token}:{len(sent)}"
        app.tasks[f"tests.multihost_app.{task}"].apply_async((key,), **options)
        sent[key] = {"host": host, "site": prefix, "queue": f"{prefix}.{routed}"}

    for _ in range(3):
        send(app1, one, "report", "worker1", "a")
        send(app1, one, "mail", "worker2", "b")
        send(app1, one, "report", "worker2", "b", queue="b")
        send(app2, two, "report", "worker2", "a")
        send(app2, two, "mail", "worker2", "b")
    client = redis.Redis.from_url(own_redis)

    def ran():
        return {key: client.lrange(f"{key}:ran", 0, -1) for key in sent}

    wait_for(lambda: all(ran().values()), message="every task to run")
    where = {}
    for key, records in ran().items():
        where[key] = [json.loads(record) for record in records]
        for record in where[key]:
            record["host"] = hosts.by_address(record["host"])
    assert where == {key: [expected] for key, expected in sent.items()}
    table = Counter(
        f"{r['site'][:3]} {r['queue'].split('.')[-1]} on {r['host']}"
        for records in where.values()
        for r in records
    )
    print(f"runs by site, queue and host: {dict(sorted(table.items()))}")
    client.close()


# -- where namespaces cannot be made -------------------------------------------


@pytest.mark.parametrize("in_ci, outcome", [(False, "skip"), (True, "fail")])
def test_where_namespaces_cannot_be_made_the_tests_skip_or_fail_in_ci(
    monkeypatch, in_ci, outcome
):
    """Here the second host's name is refused, after the bridge and the
    first host were made: those are removed again."""
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    expected = pytest.skip.Exception if outcome == "skip" else pytest.fail.Exception
    # A token of this test's own: other tests' hosts may come and go meanwhile.
    token = uuid.uuid4()
    monkeypatch.setattr(netns, "uuid", SimpleNamespace(uuid4=lambda: token))
    with pytest.raises(expected, match="network namespaces cannot be made here"):
        network(["fine", "bad/name"]).__enter__()
    links = subprocess.run([IP, "-o", "link"], capture_output=True, text=True)
    namespaces = subprocess.run([IP, "netns"], capture_output=True, text=True)
    assert f"pt-{token.hex[:6]}-fine" not in namespaces.stdout
    assert token.hex[:6] not in links.stdout
