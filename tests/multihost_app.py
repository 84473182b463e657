"""The app of the multi-host tests (tests/test_multihost.py): the demo's
models, ``pyramid_tasks`` (and its job table with ``multihost.jobs =
true``), a view that schedules a transactional task, and tasks that say
where they ran.

A task's host is the address its process reaches the broker's host from:
the address of the network namespace it runs in, not a name it was told.
Runs are counted in Redis (``multihost.redis_url``), outside any
transaction; effects are ``orders`` rows, committed or not with the task.
"""

import json
import socket
from urllib.parse import urlsplit

import redis
from pyramid.config import Configurator
from pyramid.settings import asbool
from pyramid.view import view_config

from demo_app.models import Order
from pyramid_tasks import PyramidTask, RetryableTransactionTask, task


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include("demo_app.models")
        config.include("pyramid_tasks")
        if asbool(settings.get("multihost.jobs", "false")):
            config.include("pyramid_tasks.jobs")
        config.add_route("effect", "/effect/{key}")
        config.scan("tests.multihost_app")
    return config.make_wsgi_app()


@view_config(route_name="effect", request_method="POST", renderer="json")
def schedule_effect(request):
    """A request that commits a row of its own and schedules ``effect``:
    both, or neither."""
    key = request.matchdict["key"]
    request.dbsession.add(Order(email=f"{key}:web"))
    return {"id": effect.apply_async((key,), tm=request.tm).id}


def _redis(settings):
    # No socket timeout (redis-py's default is 5 s): a held run waits on
    # BLMOVE for as long as the test takes to let it go.
    return redis.Redis.from_url(settings["multihost.redis_url"], socket_timeout=None)


def host_address(settings):
    """The address this process has on the broker's network."""
    broker = urlsplit(settings["multihost.redis_url"]).hostname
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((broker, 9))  # a UDP socket sends nothing to connect
        return probe.getsockname()[0]


@task(bind=True, base=RetryableTransactionTask)
def effect(self, key):
    """The effect of ``key`` in this task's transaction.  The run numbered
    ``multihost.hold`` on each host waits for the test's ``go`` before it
    commits (``<token>:held`` names it): a run in flight for the test to
    break."""
    request = self.get_request()
    settings = request.registry.settings
    address = host_address(settings)
    client = _redis(settings)
    client.rpush(f"{key}:runs", address)
    request.dbsession.add(Order(email=key))
    request.dbsession.flush()
    token = key.split(":")[0]
    if client.incr(f"{token}:runs:{address}") == int(settings["multihost.hold"]):
        client.rpush(f"{token}:held", json.dumps([address, key, self.request.id]))
        go = f"{token}:go:{address}"
        client.blmove(go, go, timeout=60)
    client.close()


def _where(task, key):
    """Say where this run of ``key`` is: host, site and queue."""
    settings = task.get_request().registry.settings
    client = _redis(settings)
    where = {
        "host": host_address(settings),
        "site": settings["tasks.queue_prefix"],
        "queue": task.request.delivery_info["routing_key"],
    }
    client.rpush(f"{key}:ran", json.dumps(where))
    client.close()


@task(bind=True, base=PyramidTask)
def report(self, key):
    """Routed by the INI's ``celery.task_routes``."""
    _where(self, key)


@task(bind=True, base=PyramidTask, queue="b")
def mail(self, key):
    """Routed by its own ``queue=``."""
    _where(self, key)
