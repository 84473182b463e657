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
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import transaction
from celery import chain, group
from celery.signals import after_task_publish, before_task_publish
from kombu.compression import decompress
from pyramid.config import Configurator

from pyramid_tasks import ScheduleOnCommitTask

# The Redis keys of a queue: kombu's priority steps.
_PRIORITY_KEYS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def add(self, *args, **kwargs):
    return args


def other(self, *args, **kwargs):
    return args


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
    if name == "t.add":
        return {"queue": "odd" if args[0] % 2 else "even"}
    return None


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
