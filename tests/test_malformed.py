"""A malformed message costs only itself: real workers, garbage in real queues.

Each test interleaves good tasks with bad messages pushed raw into the queue,
then counts: good tasks run, bad messages logged, kept aside, redelivered.
"""

import base64
import json
import logging
import re
import uuid

import kombu
import pytest
import redis
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis

from pyramid_tasks.malformed import (
    SentinelTransport,
    _CheckingChannel,
    _CheckingConnection,
    checking_transport,
    set_aside,
)

from .conftest import wait_for

TOCK = "tests.probe_app.tock"


def envelope(queue, body, **changes):
    """A kombu Redis item for ``TOCK`` whose body is ``body`` (bytes or str,
    base64-encoded unless it is a str), with ``changes`` to its headers."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": TOCK, "id": task_id, "retries": 0}
    headers.update(changes)
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode()
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {key: value for key, value in headers.items() if value is not None},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def set_aside_lines(log):
    return [
        line
        for line in log.splitlines()
        if " ERROR " in line and "Malformed message set aside" in line
    ]


def test_bad_messages_on_redis_are_kept_aside_and_the_worker_goes_on(
    start_worker, redis_client, ini_vars
):
    worker = start_worker("-P", "solo")
    queue, key = ini_vars["queue"], ini_vars["probe_key"] + ":tock"
    aside = queue + ".malformed"
    tock = worker.celery_app.tasks[TOCK]
    no_properties = envelope(queue, b"[[], {}, {}]")
    del no_properties["properties"]
    no_delivery_info = envelope(queue, b"[[], {}, {}]")
    del no_delivery_info["properties"]["delivery_info"]
    # What kombu's Redis QoS cannot index: the worker would stop there.
    odd = []
    for tag in (None, {"a": 1}, [1]):
        odd.append(envelope(queue, b"[[], {}, {}]"))
        odd[-1]["properties"]["delivery_tag"] = tag
    odd.append(envelope(queue, b"[[], {}, {}]"))
    odd[-1]["properties"]["delivery_info"]["exchange"] = {"name": ""}
    # What kombu's Redis transport cannot turn into a message.
    unreadable = [
        b"\x00 not JSON {",
        b"[1, 2, 3]",
        json.dumps(no_properties).encode(),
        json.dumps(no_delivery_info).encode(),
        *(json.dumps(item).encode() for item in odd),
    ]
    # What Celery cannot turn into a task.
    envelopes = [
        envelope(queue, "!!! not base64 *"),
        envelope(queue, b"not JSON either"),
        envelope(queue, b"[1, 2]"),
        envelope(queue, b"[[], {}, {}]", eta="not a date"),
        envelope(queue, b'{"no": "task"}', task=None),
    ]
    bad = [*unreadable, *(json.dumps(item).encode() for item in envelopes)]
    # Celery's hybrid protocol (a protocol 1 body) is good, not malformed.
    hybrid = envelope(queue, json.dumps({"task": TOCK, "args": []}).encode())
    try:
        for item in bad:
            tock.delay()
            redis_client.lpush(queue, item)
        redis_client.lpush(queue, json.dumps(hybrid))
        sent = len(bad) + 1

        def done():
            assert worker.process.poll() is None, f"worker exited:\n{worker.log}"
            ran = int(redis_client.get(key) or 0)
            return redis_client.llen(aside) == len(bad) and ran == sent

        wait_for(done, timeout=30, message="good tasks run, bad ones set aside")
        assert worker.ping(), "the worker is alive"
        worker.stop()

        assert int(redis_client.get(key)) == sent, "every good task ran once"
        assert redis_client.llen(queue) == 0, "nothing went back to the queue"
        kept = redis_client.lrange(aside, 0, -1)
        unacked = redis_client.hmget(
            "unacked", [item["properties"]["delivery_tag"] for item in envelopes]
        )
    finally:
        redis_client.delete(aside, key, queue)
    # In the order they came; unreadable items byte for byte, envelopes as
    # the same JSON.
    kept.reverse()
    assert kept[: len(unreadable)] == unreadable
    assert [json.loads(item) for item in kept[len(unreadable) :]] == envelopes
    assert unacked == [None] * len(envelopes), "none left unacknowledged"

    log = worker.log
    lines = set_aside_lines(log)
    assert len(lines) == len(bad), lines
    for item in [no_delivery_info, *envelopes]:
        tag, task_id = item["properties"]["delivery_tag"], item["headers"]["id"]
        (line,) = [line for line in lines if f"delivery tag {tag}," in line]
        assert f"queue {queue}," in line
        assert f"id {task_id}:" in line
        assert line.endswith(f"kept in the Redis list {aside}.")
    no_tag = [line for line in lines if "delivery tag ?" in line]
    assert [re.search(r"delivery tag (.*), id ", line)[1] for line in no_tag] == [
        "? (not JSON), task ?",
        "? (not a JSON object), task ?",
        f"?, task {TOCK}",
        f"?, task {TOCK}",
    ]
    for item, cause in zip(
        odd,
        [
            "properties.delivery_tag is not a string: None",
            "properties.delivery_tag is not a string: {'a': 1}",
            "properties.delivery_tag is not a string: [1]",
            "delivery_info.exchange is not a string: {'name': ''}",
        ],
        strict=True,
    ):
        (line,) = [line for line in lines if f"id {item['headers']['id']}:" in line]
        assert f": {cause}; kept in the Redis list {aside}." in line
    assert "Unrecoverable error" not in log
    assert "Traceback" not in log


def test_bad_messages_on_rabbitmq_are_rejected_without_requeue(
    start_worker, redis_client, ini_vars, amqp_url
):
    ini_vars["broker_url"] = amqp_url
    worker = start_worker("-P", "solo")
    queue, key = ini_vars["queue"], ini_vars["probe_key"] + ":tock"
    tock = worker.celery_app.tasks[TOCK]
    ids = [str(uuid.uuid4()) for _ in range(3)]
    bad = [
        (b"not JSON", {"id": ids[0], "task": TOCK}),
        (b"[1, 2]", {"id": ids[1], "task": TOCK}),
        (b'{"no": "task"}', {"id": ids[2]}),
    ]
    connection = kombu.Connection(amqp_url)
    try:
        with connection.Producer() as producer:
            for body, headers in bad:
                tock.delay()
                producer.publish(
                    body,
                    routing_key=queue,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                )
        tock.delay()
        sent = len(bad) + 1

        wait_for(
            lambda: (
                len(set_aside_lines(worker.log)) == len(bad)
                and int(redis_client.get(key) or 0) == sent
            ),
            timeout=30,
            message="the good tasks to run and the bad ones to be rejected",
        )
        assert worker.ping(), "the worker is alive"
        worker.stop()
        channel = connection.channel()
        _, depth, _ = channel.queue_declare(queue, passive=True)
        assert int(redis_client.get(key)) == sent, "every good task ran once"
        assert depth == 0, "nothing went back to the queue"
    finally:
        redis_client.delete(key)
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
        connection.release()
    lines = set_aside_lines(worker.log)
    assert len(lines) == len(bad), lines
    for task_id in ids:
        (line,) = [line for line in lines if f"id {task_id}:" in line]
        assert re.search(rf"queue {queue}, delivery tag \d+, ", line), line
        assert line.endswith(
            "rejected without requeue (dead-lettered if the queue has a DLX)."
        )
    assert "Unrecoverable error" not in worker.log


def test_an_unreadable_item_that_cannot_be_kept_is_logged_with_its_content(
    private_redis, caplog
):
    """The item is already popped: if Redis refuses the push, the log has it
    and the worker goes on."""
    connection = _CheckingConnection(private_redis)
    channel = connection.default_channel
    client = redis.Redis.from_url(private_redis)
    client.config_set("maxmemory", 1)  # noeviction: writes are refused
    caplog.set_level(logging.ERROR, logger="pyramid_tasks.malformed")
    try:
        channel._keep_unreadable(b"mail", b"\x00 not JSON", ValueError("bad"))
    finally:
        connection.release()
        client.close()

    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith(
        "Malformed message set aside: queue mail, delivery tag ? (not JSON), "
        "task ?, id ?: ValueError: bad; LOST, it could not be kept (OutOfMemoryError: "
        "command not allowed when used memory"
    )
    assert message.endswith("): '\\x00 not JSON'.")


def test_a_bad_body_that_cannot_be_kept_stays_unacknowledged_and_comes_back(
    private_redis, caplog
):
    """Redis refuses the push onto ``<queue>.malformed``: the message is not
    acknowledged, so kombu restores it to its queue; nothing is lost."""
    connection = _CheckingConnection(private_redis)
    client = redis.Redis.from_url(private_redis)
    caplog.set_level(logging.ERROR, logger="pyramid_tasks.malformed")
    try:
        queue = connection.SimpleQueue("mail")
        queue.put([1, 2], serializer="json")
        message = queue.get(timeout=5)
        client.config_set("maxmemory", 1)  # noeviction: writes are refused
        set_aside(message, "the body is not [args, kwargs, embed]: [1, 2]")
        client.config_set("maxmemory", 0)
        unacked = client.hkeys("unacked")
        message.channel.close()  # restores what it left unacknowledged
        depth, aside = client.llen("mail"), client.llen("mail.malformed")
    finally:
        connection.release()
        client.close()

    assert unacked == [message.delivery_tag.encode()]
    assert (depth, aside) == (1, 0), "back in its queue, not lost"
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"Malformed message set aside: queue mail, delivery tag {message.delivery_tag}"
        ", task ?, id ?: the body is not [args, kwargs, embed]: [1, 2]; NOT kept "
        "(OutOfMemoryError: command not allowed when used memory"
    )
    assert record.getMessage().endswith(
        "left unacknowledged, so kombu restores it to the queue (when the worker "
        "stops, or after the visibility timeout)."
    )


def test_a_broker_that_deletes_rejected_messages_is_not_said_to_dead_letter(caplog):
    caplog.set_level(logging.ERROR, logger="pyramid_tasks.malformed")
    with kombu.Connection("memory://") as connection:
        queue = connection.SimpleQueue(f"mail_{uuid.uuid4().hex}")
        queue.put([1, 2], serializer="json")
        message = queue.get(timeout=5)
        set_aside(message, "bad")
        left = queue.qsize()
        queue.close()

    assert left == 0
    [record] = caplog.records
    assert record.getMessage().endswith(
        "bad; rejected without requeue (deleted, unless the broker dead-letters "
        "rejected messages)."
    )


def test_sentinel_and_other_redis_transports_get_checking_channels():
    class MyTransport(kombu_redis.Transport):
        pass

    sentinel = _CheckingConnection(
        "sentinel://127.0.0.1:26379", transport_options={"master_name": "m"}
    ).get_transport_cls()
    mine = checking_transport(MyTransport)

    assert sentinel is SentinelTransport
    assert issubclass(SentinelTransport.Channel, kombu_redis.SentinelChannel)
    assert issubclass(SentinelTransport.Channel, _CheckingChannel)
    assert issubclass(mine, MyTransport)
    assert issubclass(mine.Channel, kombu_redis.Channel)
    assert issubclass(mine.Channel, _CheckingChannel)
    assert checking_transport(MyTransport) is mine, "made once"
    assert checking_transport(pyamqp.Transport) is pyamqp.Transport
    assert checking_transport(mine) is mine, "checking already"


def test_a_broken_connection_during_a_broadcast_is_not_taken_for_malformed(
    private_redis,
):
    """Connection errors go on to kombu (which reconnects), not to the log."""
    connection = _CheckingConnection(private_redis)
    channel = connection.default_channel

    def delivered(message):
        raise redis.ConnectionError("gone")

    channel._fanout_to_queue["bcast"] = "bcast.q"
    connection.transport._callbacks["bcast.q"] = delivered
    good = envelope("bcast.q", b"{}")
    try:
        with pytest.raises(redis.ConnectionError, match="gone"):
            channel._deliver_fanout_message(good, "bcast")
    finally:
        connection.release()


def test_malformed_broadcasts_are_dropped_and_the_worker_still_answers(
    start_worker, private_redis, redis_client, ini_vars
):
    """Remote control (``inspect ping``) is a broadcast on Redis pub/sub: a
    private broker, as every worker on a broker hears its broadcasts."""
    ini_vars["broker_url"] = private_redis
    worker = start_worker("-P", "solo")
    key = ini_vars["probe_key"] + ":tock"
    broker = redis.Redis.from_url(private_redis)
    pidbox = envelope("x", b"{}")
    no_properties = dict(pidbox, properties=None)
    not_json_body = envelope("x", b"\x00 not JSON")
    tag_object = envelope("x", b"{}")
    tag_object["properties"]["delivery_tag"] = {"a": 1}
    bad = [b"[1, 2]", json.dumps(no_properties), json.dumps(not_json_body)]
    bad.append(json.dumps(tag_object))
    try:
        heard = [broker.publish("/0.celery.pidbox", item) for item in bad]
        wait_for(
            lambda: len(broadcast_lines(worker.log)) == len(bad),
            message="the bad broadcasts to be dropped",
        )
        assert worker.ping(), "the worker still answers inspect ping"
        worker.celery_app.tasks[TOCK].delay().get(timeout=30)
        ran = int(redis_client.get(key))
        worker.stop()
    finally:
        broker.close()
        redis_client.delete(key)

    assert heard == [1, 1, 1, 1], "one subscriber: the worker"
    assert ran == 1
    lines = broadcast_lines(worker.log)
    assert len(lines) == len(bad), lines
    assert lines[0].endswith(
        "exchange celery.pidbox, delivery tag ? (not a JSON object), id ?: "
        "TypeError: list indices must be integers or slices, not str; "
        "a broadcast has no queue to keep it in."
    )
    assert f"id {no_properties['headers']['id']}: AttributeError" in lines[1]
    assert f"id {not_json_body['headers']['id']}: DecodeError" in lines[2]
    assert lines[3].endswith(
        f"delivery tag {{'a': 1}}, id {tag_object['headers']['id']}: "
        "properties.delivery_tag is not a string: {'a': 1}; a broadcast has no "
        "queue to keep it in."
    )
    assert "Unrecoverable error" not in worker.log
    assert "Malformed message set aside" not in worker.log


def broadcast_lines(log):
    return [
        line
        for line in log.splitlines()
        if " ERROR " in line and "Malformed broadcast message dropped" in line
    ]
