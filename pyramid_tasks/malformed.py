"""A malformed message costs only itself: it is set aside, logged, and the
worker goes on with the next one.

Celery's worker stops with "Unrecoverable error" on a message it cannot
read: kombu's Redis transport raises while parsing what it popped (an item
that is not JSON, not an envelope, or a body that is not base64) and Celery
raises while unpacking a protocol 2 body that is not ``[args, kwargs,
embed]``.  Celery's own ``on_decode_error`` is reached only for a body its
serializer rejects.  The worker's consumer (``worker_consumer``, installed
by :class:`pyramid_tasks.loader.PyramidLoader`) checks each message before
Celery reads it, and the Redis channel it opens checks each item before
kombu parses it.

A bad message is logged once at ERROR (queue, delivery tag, task name and id
when they can be read, and the cause), then kept aside: on Redis (and Redis
Sentinel) its raw item is pushed onto the list ``<queue>.malformed``; on
other brokers it is rejected without requeue, which RabbitMQ dead-letters
when the queue has a dead-letter exchange and other brokers delete.

A broadcast (fanout) message on Redis, such as a remote control command on
``celery.pidbox``, has no queue to keep it in: a malformed one is logged at
ERROR and dropped.
"""

import functools
import logging

from celery import signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

__all__ = ["MALFORMED_SUFFIX", "Consumer", "RedisTransport", "SentinelTransport"]

log = logging.getLogger(__name__)

#: The Redis list ``<queue>`` + this keeps the queue's malformed messages.
MALFORMED_SUFFIX = ".malformed"


def _describe(cause):
    text = " ".join(str(cause).split())
    if isinstance(cause, Exception):
        return f"{type(cause).__name__}: {text}"
    return text


def _log_set_aside(queue, tag, headers, cause, kept):
    headers = headers if isinstance(headers, dict) else {}
    log.error(
        "Malformed message set aside: queue %s, delivery tag %s, task %s, id %s: "
        "%s; %s.",
        queue,
        tag,
        headers.get("task", "?"),
        headers.get("id", "?"),
        _describe(cause),
        kept,
    )


def _log_dropped(exchange, tag, headers, cause):
    headers = headers if isinstance(headers, dict) else {}
    log.error(
        "Malformed broadcast message dropped: exchange %s, delivery tag %s, "
        "id %s: %s; a broadcast has no queue to keep it in.",
        exchange,
        tag,
        headers.get("id", "?"),
        _describe(cause),
    )


class Consumer(CeleryConsumer):
    """Celery's consumer, but a message it cannot read costs only itself.

    Set as ``worker_consumer`` by the loader unless the app chose another
    consumer; subclass this one to keep the behaviour.
    """

    def connection_for_read(self, heartbeat=None):
        connection = self.app.connection_for_read(heartbeat=heartbeat)
        if issubclass(connection.get_transport_cls(), kombu_redis.Transport):
            # The same URL and options; its Redis channels check each item
            # (Redis and Sentinel, and subclasses of their transports).
            connection = _CheckingConnection(**connection.info())
        return self.ensure_connected(connection)

    def create_task_handler(self, *args, **kwargs):
        on_task_received = super().create_task_handler(*args, **kwargs)

        def checked(message):
            problem = _body_problem(message)
            if problem is not None:
                return self.set_aside(message, problem)
            return on_task_received(message)

        return checked

    def on_decode_error(self, message, exc):
        self.set_aside(message, exc)

    def on_invalid_task(self, body, message, exc):
        self.set_aside(message, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_message(self, body, message):
        self.set_aside(message, "no task name in its headers or body")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def set_aside(self, message, cause):
        """Log ``message`` at ERROR and keep it where an operator finds it."""
        set_aside(message, cause)


def set_aside(message, cause):
    """Log ``message`` at ERROR and keep it where an operator finds it
    (a broadcast on Redis is dropped)."""
    queue = getattr(message, "pyramid_tasks_queue", None)
    exchange = getattr(message, "pyramid_tasks_exchange", None)
    if exchange is not None:
        message.ack()
        _log_dropped(exchange, message.delivery_tag, message.headers, cause)
        return
    if queue is not None:
        # It came through our Redis channel: it knows the queue.  Until
        # it is acknowledged it stays in kombu's unacked set, which
        # restores it to the queue: acknowledged only once kept.
        try:
            kept = message.channel.keep_aside(queue, dumps(message._raw))
        except Exception as exc:
            kept = (
                f"NOT kept ({_describe(exc)}): left unacknowledged, so kombu "
                "restores it to the queue (when the worker stops, or after "
                "the visibility timeout)"
            )
        else:
            message.ack()
    else:
        queue = (message.delivery_info or {}).get("routing_key")
        kept = _REJECTED.get(
            message.channel.connection.client.transport.driver_type,
            "rejected without requeue (deleted, unless the broker dead-letters "
            "rejected messages)",
        )
        message.reject(requeue=False)
    _log_set_aside(queue, message.delivery_tag, message.headers, cause, kept)


_REJECTED = {
    "amqp": "rejected without requeue (dead-lettered if the queue has a DLX)",
}


def _body_problem(message):
    """Why Celery could not unpack this protocol 2 body, or None.

    A body that does not decode is left to Celery, which calls
    ``on_decode_error`` or ``on_invalid_task``; the decoded body is kept on
    the message, so it is decoded once.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # protocol 1 or no task: Celery's own checks apply
    try:
        body = message.decode()
    except Exception:
        return None
    if isinstance(body, dict) and "args" in body:
        return None  # Celery's hybrid protocol 1 body
    if (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict | None)
    ):
        return None
    return f"the body is not [args, kwargs, embed]: {body!r:.80}"


class _CheckingChannel:
    """Over kombu's Redis channel: each popped item is checked before kombu
    parses it, and each broadcast message before it is delivered.

    An item kombu could not turn into a message (its error would stop the
    worker) is pushed onto ``<queue>.malformed`` instead of delivered; a
    malformed broadcast message is logged and dropped.  Messages it
    delivers from a queue know their queue, for :meth:`Consumer.set_aside`.
    """

    def __init__(self, *args, **kwargs):
        self._unreadable = []
        super().__init__(*args, **kwargs)

    def _create_client(self, asynchronous=False):
        client = super()._create_client(asynchronous=asynchronous)
        if asynchronous:  # the client that runs BRPOP
            parse = client.response_callbacks["BRPOP"]
            client.set_response_callback("BRPOP", self._checked_brpop(parse))
        return client

    def _checked_brpop(self, parse):
        def checked(response, **options):
            reply = parse(response, **options)
            if reply and (cause := self._unreadable_cause(reply[1])) is not None:
                # Not delivered: kombu sees an empty BRPOP, as on a timeout,
                # and the item is kept aside once the read is over.
                self._unreadable.append((*reply, cause))
                return None
            return reply

        return checked

    def _unreadable_cause(self, item):
        """What kombu would raise on ``item`` (then the worker stops), or None."""
        try:
            return self._payload_problem(loads(item))
        except Exception as exc:
            return exc

    def _payload_problem(self, payload):
        """Why kombu's delivery of the parsed ``payload`` would raise, or None.

        kombu builds a message from it, then its Redis QoS indexes the
        message by delivery tag (a sorted set member and a hash field) with
        ``delivery_info["exchange"]`` and ``["routing_key"]``.
        """
        message = self.Message(payload, channel=self)
        tag, info = message.delivery_tag, message.delivery_info
        if not isinstance(tag, str):
            return f"properties.delivery_tag is not a string: {tag!r:.80}"
        for key in ("exchange", "routing_key"):
            value = info[key]
            if not isinstance(value, str | None):
                return f"delivery_info.{key} is not a string: {value!r:.80}"
        return None

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        finally:
            while self._unreadable:
                self._keep_unreadable(*self._unreadable.pop(0))

    def _keep_unreadable(self, key, item, cause):
        key = bytes_to_str(key).removeprefix(self.global_keyprefix)
        queue = key.rsplit(self.sep, 1)[0]  # without the priority suffix
        tag, headers = _envelope_fields(item)
        try:
            kept = self.keep_aside(queue, item)
        except Exception as exc:
            # Popped already: the log line is all that is left of it, and
            # the worker goes on.
            item = bytes_to_str(item)
            kept = f"LOST, it could not be kept ({_describe(exc)}): {item!r:.1000}"
        _log_set_aside(queue, tag, headers, cause, kept)

    def keep_aside(self, queue, item):
        """Push ``item`` as it was received onto ``<queue>.malformed``;
        return what became of it, for the log (raises if Redis refuses)."""
        with self.conn_or_acquire() as client:
            client.lpush(queue + MALFORMED_SUFFIX, item)
        return f"kept in the Redis list {queue}{MALFORMED_SUFFIX}"

    def _deliver_fanout_message(self, message, exchange):
        # A broadcast has no queue of its own to keep it in, and no
        # acknowledgement: what cannot be delivered is dropped.  kombu's
        # consumers of broadcasts (Celery's remote control) raise on a body
        # they cannot decode: that, too, costs only this message.
        try:
            cause = self._payload_problem(message)
            if cause is None:
                return super()._deliver_fanout_message(message, exchange)
        except self.connection_errors:
            raise
        except Exception as exc:
            cause = exc
        tag, headers = _envelope_fields(dumps(message))
        _log_dropped(exchange, tag, headers, cause)
        return False

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        def receive(message):
            if queue in self._fanout_queues:  # a broadcast's own queue
                message.pyramid_tasks_exchange = self._fanout_queues[queue][0]
            else:
                message.pyramid_tasks_queue = queue
            return callback(message)

        return super().basic_consume(queue, no_ack, receive, consumer_tag, **kwargs)


class _RedisChannel(_CheckingChannel, kombu_redis.Channel):
    """kombu's Redis channel, checking what it receives."""


class _SentinelChannel(_CheckingChannel, kombu_redis.SentinelChannel):
    """kombu's Redis Sentinel channel, checking what it receives."""


def _envelope_fields(item):
    """``(delivery tag, headers)`` of a raw Redis item, as far as they read."""
    try:
        envelope = loads(item)
    except ValueError:
        return "? (not JSON)", None
    if not isinstance(envelope, dict):
        return "? (not a JSON object)", None
    properties = envelope.get("properties")
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return ("?" if tag is None else tag), envelope.get("headers")


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`_RedisChannel`."""

    Channel = _RedisChannel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`_SentinelChannel`."""

    Channel = _SentinelChannel


_CHECKING = {
    kombu_redis.Transport: RedisTransport,
    kombu_redis.SentinelTransport: SentinelTransport,
}


@functools.cache
def checking_transport(transport_cls):
    """The transport for ``transport_cls`` whose channels check what they
    receive: ours for kombu's Redis and Sentinel transports, a subclass
    with a checking channel for a subclass of them, else ``transport_cls``
    (not Redis, or checking already)."""
    if transport_cls in _CHECKING:
        return _CHECKING[transport_cls]
    if not issubclass(transport_cls, kombu_redis.Transport) or issubclass(
        transport_cls.Channel, _CheckingChannel
    ):
        return transport_cls
    channel = type(
        transport_cls.Channel.__name__, (_CheckingChannel, transport_cls.Channel), {}
    )
    return type(transport_cls.__name__, (transport_cls,), {"Channel": channel})


class _CheckingConnection(Connection):
    """A connection whose Redis-family transport checks what it receives.

    Its URL keeps kombu's scheme (``redis://`` in logs and reconnections);
    clones and failover switches keep the class.
    """

    def get_transport_cls(self):
        return checking_transport(super().get_transport_cls())
