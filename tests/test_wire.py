"""The messages sent on commit are those Celery's ``apply_async`` sends.

Each case sends the same calls twice on real Redis: once through Celery's own
``apply_async`` (no ``tm``: sent at once), once on a commit (built by
``pyramid_tasks.wire``, four of each call: the first goes through kombu's
publish, which declares the queue, the next two are built in full into the
pipeline, the fourth comes from the shape's template). The raw messages are
read back from the broker and compared field by field: headers, properties, the
decoded body, the Redis key (priority). Ids and delivery tags differ by nature
and are compared by position (the same id in the same places); times derived
from the clock are compared to within seconds.
"""

import base64
import json
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import transaction
from celery import chain, group
from celery.signals import after_task_publish, before_task_publish
from kombu import Connection
from kombu.compression import decompress
from kombu.utils.encoding import str_to_bytes
from pyramid.config import Configurator

from pyramid_tasks import ScheduleOnCommitTask

# The Redis keys of a queue: kombu's priority steps.
_PRIORITY_KEYS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def add(self, *args, **kwargs):
    """A task whose messages are looked at; no worker runs it here."""


def other(self, *args, **kwargs):
    """The same, under another name (links, chains)."""


def shadow(task, args, kwargs, options):
    """A ``shadow_name``: the name workers log for the message."""
    return f"shadowed.{len(args)}"


@pytest.fixture
def queue():
    return f"pyramid_tasks_wire_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queues(queue):
    return [queue, f"{queue}_b", f"{queue}_routed"]


@pytest.fixture
def app(redis_url, redis_client, queues):
    config = Configurator(
        settings={
            "celery.broker_url": redis_url,
            "celery.task_default_queue": queues[0],
            "celery.task_routes": json.dumps({"t.routed": {"queue": queues[2]}}),
        }
    )
    config.include("pyramid_tasks")
    for name, func in (("t.add", add), ("t.other", other), ("t.routed", add)):
        config.add_task(func, bind=True, base=ScheduleOnCommitTask, name=name)
    config.add_task(
        add, bind=True, base=ScheduleOnCommitTask, name="t.shadowed", shadow_name=shadow
    )
    config.commit()
    app = config.registry.celery_app
    yield app
    redis_client.delete(*[q + suffix for q in queues for suffix in _PRIORITY_KEYS])
    app.close()


def take_messages(redis_client, queues):
    """``[(key, message)]`` of every message on the queues, oldest first,
    removed from Redis; the body decoded."""
    found = []
    for name in queues:
        for suffix in _PRIORITY_KEYS:
            key = name + suffix
            for raw in reversed(redis_client.lrange(key, 0, -1)):
                found.append((key, raw))
            redis_client.delete(key)
    return found


def normalized(key, raw):
    """The message with ids by position, clock-made times set apart:
    ``(comparable, times)``."""
    message = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    headers, properties = message["headers"], message["properties"]
    body = base64.b64decode(message["body"])
    if "compression" in headers:
        body = decompress(body, headers["compression"])
    message["body"] = json.loads(body)
    times = {}
    for name in ("eta", "expires"):
        if headers.get(name):
            times[name] = datetime.fromisoformat(headers[name]).timestamp()
            headers[name] = "<time>"
    if "expiration" in properties:
        times["expiration"] = int(properties["expiration"]) / 1000
        properties["expiration"] = "<ms>"
    text = json.dumps([key, message], sort_keys=True)
    ids = {}
    text = _UUID.sub(lambda m: ids.setdefault(m.group(), f"<id{len(ids)}>"), text)
    return json.loads(text), times


def assert_same(celery_sent, ours_sent):
    assert len(ours_sent) == len(celery_sent) > 0
    for (key, raw), (our_key, our_raw) in zip(celery_sent, ours_sent, strict=True):
        expected, times = normalized(key, raw)
        got, our_times = normalized(our_key, our_raw)
        assert got == expected
        assert our_times.keys() == times.keys()
        for name, value in times.items():
            assert abs(our_times[name] - value) < 10, name


def in_five_minutes():
    return datetime.now(UTC) + timedelta(minutes=5)


CASES = {
    "args": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1, "two", 3.5, None, True), **tm
    ),
    "kwargs": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (), {"a": 1, "b": [1, {"c": "d"}], "e": None, "ü": "ñ"}, **tm
    ),
    "long and unicode args": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        ("x" * 3000, "tab\there", "ü", 10**40), **tm
    ),
    "many plain args": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        tuple(range(300)), **tm
    ),
    "a shadow name": lambda app, queues, **tm: app.tasks["t.shadowed"].apply_async(
        (1, 2), **tm
    ),
    "delivery_mode": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), delivery_mode=1, **tm
    ),
    "countdown": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), countdown=30, **tm
    ),
    "eta": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), eta=in_five_minutes(), **tm
    ),
    "expires in seconds": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), expires=600, **tm
    ),
    "expires at": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), expires=in_five_minutes(), **tm
    ),
    "expires as ISO text": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), expires=in_five_minutes().isoformat()[:19] + "Z", **tm
    ),
    "expires already past": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), expires=datetime.now(UTC) - timedelta(minutes=1), **tm
    ),
    "eta as ISO text": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), eta=in_five_minutes().isoformat(), **tm
    ),
    "priority": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), priority=5, **tm
    ),
    "queue": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,), queue=queues[1], **tm
    ),
    "route from task_routes": lambda app, queues, **tm: app.tasks[
        "t.routed"
    ].apply_async((1,), **tm),
    "link and link_error": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1,),
        link=app.tasks["t.other"].s(),
        link_error=app.tasks["t.other"].si("failed"),
        **tm,
    ),
    "headers, limits, ignore_result": lambda app, queues, **tm: app.tasks[
        "t.add"
    ].apply_async(
        (1,),
        headers={"x-trace": "abc"},
        time_limit=60,
        soft_time_limit=30,
        ignore_result=True,
        **tm,
    ),
    "compression": lambda app, queues, **tm: app.tasks["t.add"].apply_async(
        (1, "x" * 100), compression="zlib", **tm
    ),
    "chain": lambda app, queues, **tm: chain(
        app.tasks["t.add"].s(1), app.tasks["t.other"].s(2)
    ).apply_async(**tm),
    "group": lambda app, queues, **tm: group(
        app.tasks["t.add"].s(1), app.tasks["t.add"].s(2)
    ).apply_async(**tm),
}


@pytest.mark.parametrize("case", CASES)
def test_a_message_sent_on_commit_is_the_one_apply_async_sends(
    app, redis_client, queues, case
):
    send = CASES[case]
    for _ in range(4):
        send(app, queues)  # Celery's apply_async, sent at once
    celery_sent = take_messages(redis_client, queues)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        for _ in range(4):  # the fourth of a shape: from its template
            send(app, queues, tm=tm)
    assert_same(celery_sent, take_messages(redis_client, queues))


def test_a_template_makes_the_bytes_a_full_build_makes(app, redis_client, queues):
    """Of four equal calls on one commit, the first goes through kombu's
    publish (it declares the queue), the second and third are built in full
    into the pipeline, the fourth comes from their template: apart from ids
    and delivery tags, all four are the same bytes."""
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        ids = [
            app.tasks["t.add"].apply_async((1, "a"), {"k": [1]}, tm=tm).id
            for _ in range(4)
        ]
    raws = [raw.decode() for _, raw in take_messages(redis_client, queues)]
    tags = [json.loads(raw)["properties"]["delivery_tag"] for raw in raws]
    for task_id, tag, raw in zip(ids, tags, raws, strict=True):
        assert raw.count(task_id) == 3  # id, root_id, correlation_id
        assert raw.replace(task_id, ids[0]).replace(tag, tags[0]) == raws[0]


def test_publish_signals_fire_for_each_message_with_what_is_sent(
    app, redis_client, queues
):
    """Connected receivers see every message, before and after it is sent,
    with the headers and body the broker gets."""
    seen = []

    def before(sender=None, headers=None, body=None, routing_key=None, **kwargs):
        seen.append(("before", sender, headers["id"], routing_key, list(body[0])))

    def after(sender=None, headers=None, body=None, routing_key=None, **kwargs):
        seen.append(("after", sender, headers["id"], routing_key, list(body[0])))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    tm = transaction.TransactionManager(explicit=True)
    try:
        with tm:
            ids = [app.tasks["t.add"].apply_async((n,), tm=tm).id for n in range(5)]
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    assert seen == [
        (when, "t.add", task_id, queues[0], [n])
        for n, task_id in enumerate(ids)
        for when in ("before", "after")
    ]
    sent = take_messages(redis_client, queues)
    assert [json.loads(raw)["headers"]["id"] for _, raw in sent] == ids


def route_by_argument(name, args, kwargs, options, task=None, **kw):
    """A router function that reads the arguments: no two messages of it
    share a route by name."""
    assert name == "t.add"
    return "odd" if args[0] % 2 else {"queue": "even"}  # both forms


def test_a_router_reading_the_arguments_and_the_queue_prefix_route_as_celery(
    redis_url, redis_client, queue
):
    """``tasks.queue_prefix`` over a router function that reads the
    arguments: each message goes where Celery's own sends it, unchanged."""
    config = Configurator(
        settings={
            "celery.broker_url": redis_url,
            "celery.task_default_queue": "default",
            "celery.task_routes": "tests.test_wire.route_by_argument",
            "tasks.queue_prefix": queue,
        }
    )
    config.include("pyramid_tasks")
    config.add_task(add, bind=True, base=ScheduleOnCommitTask, name="t.add")
    config.commit()
    app = config.registry.celery_app
    queues = [f"{queue}.{name}" for name in ("odd", "even", "default")]
    try:
        for n in range(8):
            app.tasks["t.add"].apply_async((n,))
        celery_sent = take_messages(redis_client, queues)
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            for n in range(8):
                app.tasks["t.add"].apply_async((n,), tm=tm)
        ours = take_messages(redis_client, queues)
        assert [key for key, _ in ours].count(f"{queue}.odd") == 4
        assert_same(celery_sent, ours)
    finally:
        redis_client.delete(*[q + suffix for q in queues for suffix in _PRIORITY_KEYS])
        app.close()


def parent(self, child_count):
    """Sends ``child_count`` children through Celery's apply_async, then as
    many on a commit: from a running task, both carry its ids."""
    child = self.app.tasks["t.add"]
    for _ in range(child_count):
        child.apply_async((1,))
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        for _ in range(child_count):
            child.apply_async((1,), tm=tm)
    return len(self.request.children)


@pytest.mark.parametrize("inherit", ["true", "false"])
def test_a_running_tasks_children_carry_its_ids_as_with_apply_async(
    redis_url, redis_client, queue, inherit
):
    """Sent from a running task (here applied in this process), a message
    has the task's root and parent ids, inherits its priority where the app
    says so, and joins its children, on commit as with apply_async."""
    config = Configurator(
        settings={
            "celery.broker_url": redis_url,
            "celery.task_default_queue": queue,
            "celery.task_inherit_parent_priority": inherit,
        }
    )
    config.include("pyramid_tasks")
    config.add_task(add, bind=True, base=ScheduleOnCommitTask, name="t.add")
    config.add_task(parent, bind=True, base=ScheduleOnCommitTask, name="t.parent")
    config.commit()
    app = config.registry.celery_app
    try:
        result = app.tasks["t.parent"].apply((4,), task_id="the-parent")
        assert result.get() == 8
        sent = take_messages(redis_client, [queue])
        assert [json.loads(raw)["headers"]["parent_id"] for _, raw in sent] == [
            "the-parent"
        ] * 8
        assert_same(sent[:4], sent[4:])
    finally:
        redis_client.delete(*[queue + suffix for suffix in _PRIORITY_KEYS])
        app.close()


def test_a_queue_celery_does_not_know_costs_only_its_own_task(
    redis_url, redis_client, queue, caplog
):
    """Without ``task_create_missing_queues`` an unknown queue is Celery's
    ``QueueNotFound`` at the publish: that task is reported, the others of
    the commit are sent."""
    config = Configurator(
        settings={
            "celery.broker_url": redis_url,
            "celery.task_default_queue": queue,
            "celery.task_queues": json.dumps({queue: {}}),
            "celery.task_create_missing_queues": "false",
        }
    )
    config.include("pyramid_tasks")
    config.add_task(add, bind=True, base=ScheduleOnCommitTask, name="t.add")
    config.commit()
    app = config.registry.celery_app
    tm = transaction.TransactionManager(explicit=True)
    try:
        with caplog.at_level(logging.ERROR, logger="pyramid_tasks"), tm:
            first = app.tasks["t.add"].apply_async((1,), tm=tm).id
            lost = app.tasks["t.add"].apply_async((2,), tm=tm, queue="nowhere").id
            last = app.tasks["t.add"].apply_async((3,), tm=tm).id
        sent = take_messages(redis_client, [queue])
        assert [json.loads(raw)["headers"]["id"] for _, raw in sent] == [first, last]
        [record] = caplog.records
        assert record.args[1] == lost
        assert "QueueNotFound" in record.getMessage()
    finally:
        redis_client.delete(*[queue + suffix for suffix in _PRIORITY_KEYS])
        app.close()


def take_amqp_messages(amqp_url, queue):
    """``[(queue, message)]`` of every message on a RabbitMQ queue, as JSON
    text shaped like Redis's (headers, properties, body), consumed."""
    found = []
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            properties = dict(message.properties)
            headers = properties.pop("application_headers")
            properties.pop("delivery_tag", None)
            properties["body_encoding"] = "base64"
            text = json.dumps(
                {
                    "body": base64.b64encode(str_to_bytes(message.body)).decode(),
                    "headers": headers,
                    "properties": properties,
                },
                default=str,
            )
            found.append((queue, text))
        channel.queue_delete(queue)
    return found


def test_on_rabbitmq_the_messages_are_apply_asyncs_too(amqp_url, queue):
    """RabbitMQ, confirms on: plain sends built here, a countdown through
    Celery's own (it reroutes delays on quorum queues); on commit as with
    apply_async."""
    config = Configurator(
        settings={"celery.broker_url": amqp_url, "celery.task_default_queue": queue}
    )
    config.include("pyramid_tasks")
    config.add_task(add, bind=True, base=ScheduleOnCommitTask, name="t.add")
    config.commit()
    app = config.registry.celery_app
    task = app.tasks["t.add"]
    try:
        for n in range(3):
            task.apply_async((n,), priority=n)
        task.apply_async((9,), countdown=60)
        celery_sent = take_amqp_messages(amqp_url, queue)
        tm = transaction.TransactionManager(explicit=True)
        with tm:
            for n in range(3):
                task.apply_async((n,), priority=n, tm=tm)
            task.apply_async((9,), countdown=60, tm=tm)
        assert_same(celery_sent, take_amqp_messages(amqp_url, queue))
    finally:
        app.close()
