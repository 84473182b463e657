"""Task messages built as Celery's ``apply_async`` builds them, for a batch.

Celery's ``apply_async`` redoes for each message what is the same for a whole
batch: it merges the task's options, routes through the app's router, binds a
copy of the queue to declare it, looks up the current worker task, the
backend and the signals, and wraps the publish in a retry closure.  A
:class:`Wire` does that once per batch; a message then costs its headers, its
serialization and kombu's own ``Producer._publish``, which puts it on the
transport (into the pipeline, on Redis) as ``apply_async`` would.

The messages are those ``apply_async`` sends, field for field
(``tests/test_wire.py`` compares them on the broker).  What is not built here
goes through Celery's ``apply_async``: chains and chords, stamping, task-sent
events, the deprecated ``task_sent`` signal, pydantic arguments, a custom
``shadow_name``, an ``expires`` already past (Celery warns), a countdown or
eta off Redis (Celery reroutes it on RabbitMQ's quorum queues), an exchange or
routing key of the message's own, and options it does not know.
"""

import numbers
import os
from json.encoder import encode_basestring_ascii

from celery import Task, signals
from celery.app.routes import MapRoute
from celery.backends.base import Backend
from celery.utils.collections import lpmerge
from celery.utils.functional import maybe_list
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import (
    add_seconds_to_datetime,
    maybe_make_aware,
    subtract_datetimes,
)
from dateutil.parser import isoparse
from kombu import Queue
from kombu.transport.redis import PublishBatch
from kombu.utils.json import JSONEncoder, dumps

from .ids import uuid4

__all__ = ["Wire", "routes_by_name"]

# The apply_async options built here; a send with another goes to Celery (an
# exchange or routing key of its own among them: only a queue's is built).
_OPTIONS = frozenset(
    {
        "add_to_parent",
        "compression",
        "countdown",
        "delivery_mode",
        "eta",
        "expires",
        "group_id",
        "group_index",
        "headers",
        "ignore_result",
        "link",
        "link_error",
        "parent_id",
        "priority",
        "queue",
        "retry",
        "retry_policy",
        "root_id",
        "serializer",
        "shadow",
        "soft_time_limit",
        "time_limit",
    }
)

# What a message's options may hold once routed, for this module to build it.
_ROUTED = _OPTIONS | {"exchange", "routing_key", "immediate", "mandatory"}

# kombu's JSON serializer (kombu.utils.json.dumps), its encoder made once.
_JSON = JSONEncoder()
_quote = encode_basestring_ascii  # a str as JSON, quotes included

# Values whose repr() is what Celery's saferepr() makes of them.
_PLAIN = frozenset({int, float, bool, type(None)})


def _by_name(router):
    """Whether ``router`` routes by the task's name alone: a ``task_routes``
    mapping, or one of this package's that says so."""
    return isinstance(router, MapRoute) or getattr(router, "by_name", False)


class _Defaults:
    """What the messages of an app share in a process: its configuration as
    Celery reads it when it first sends (``amqp.send_task_message`` keeps the
    defaults it was made with), and this process's ``origin``."""

    def __init__(self, app):
        conf = app.conf
        amqp = app.amqp
        self.usable = conf.task_protocol == 2
        self.router = amqp.router
        self.by_name = all(map(_by_name, self.router.routes))
        self.queues = amqp.queues
        self.default_queue = amqp.default_queue
        self.default_serializer = conf.task_serializer
        self.default_compression = conf.task_compression
        self.default_delivery_mode = conf.task_default_delivery_mode
        self.default_retry = conf.task_publish_retry
        self.default_policy = conf.task_publish_retry_policy
        self.inherit_priority = conf.task_inherit_parent_priority
        self.repr_levels = conf.task_repr_maxlevels
        self.argsrepr_size = amqp.argsrepr_maxsize
        self.kwargsrepr_size = amqp.kwargsrepr_maxsize
        self.origin = anon_nodename()


def _defaults(app):
    """The app's :class:`_Defaults` in this process (a fork has its own
    ``origin``)."""
    pid, defaults = getattr(app, "pyramid_wire_defaults", (None, None))
    if pid != os.getpid():
        defaults = _Defaults(app)
        app.pyramid_wire_defaults = (os.getpid(), defaults)
    return defaults


def routes_by_name(app):
    """Whether every route of ``app`` depends on the task's name alone."""
    return _defaults(app).by_name


class Wire:
    """What the messages of one batch share: made once, on the thread that
    publishes it.  :meth:`publish` sends one message, or returns False for
    Celery's ``apply_async`` to send it."""

    def __init__(self, app, producer):
        self.app = app
        self.producer = producer
        defaults = _defaults(app)
        self.__dict__.update(vars(defaults))
        self.usable = (
            defaults.usable
            and not app.conf.task_send_sent_event
            and not signals.task_sent.receivers
            # kombu declares a producer's own exchange at each publish.
            and not (producer.auto_declare and producer.exchange.name)
        )
        self.on_redis = producer.connection.transport.driver_type == "redis"
        self.reply_to = app.thread_oid
        self.parent = app.current_worker_task
        backend = app.backend
        self.on_task_call = (
            None
            if type(backend).on_task_call is Backend.on_task_call
            else backend.on_task_call
        )
        self.before = signals.before_task_publish
        self.after = signals.after_task_publish
        self._routes = {}  # task name -> its route
        self._tasks = {}  # task -> its execution options, or None
        self._policies = {}  # id(policy) -> (policy, merged)
        self._seen = {}  # shape -> its first message, captured
        self._templates = {}  # shape -> _Template
        self._captured = None  # (message, embed, key) last pipelined
        self._calls = None  # (ignore_result, add_to_parent) of the last message
        self._batch = self._batch_session = None  # kombu's publish batch

    def publish(self, send, options, policy):
        """Publish ``send`` with ``options`` (final: queue prefixed) and the
        retry ``policy``; False, having done nothing, if Celery must."""
        if not self.usable or not options.keys() <= _OPTIONS:
            return False
        task = send.task
        exec_options = self._task(task)
        if exec_options is None:
            return False
        shape = self._shape(task, options, policy)
        template = self._templates.get(shape)
        session = template and self._session()  # a template pipelines only
        if session:
            template.put(self, session, send)
            return True
        opts = {**exec_options, **options, "retry_policy": policy}
        opts.setdefault("ignore_result", task.ignore_result)
        now = None
        expires = opts.pop("expires", None)
        countdown = opts.pop("countdown", None)
        eta = opts.pop("eta", None)
        if countdown or eta or expires is not None:
            shape = None  # its eta or expiry is of its own
            if (countdown or eta) and not self.on_redis:
                return False  # Celery's own: RabbitMQ's quorum queues delay it
        expiration = None  # seconds left, the message's own property
        if expires is not None:
            if isinstance(expires, numbers.Real):
                expiration = expires
            else:
                now = self.app.now()
                at = isoparse(expires) if isinstance(expires, str) else expires
                expiration = subtract_datetimes(at, now).total_seconds()
            if expiration < 0:
                return False  # Celery warns, and sends it at once expired
        self._captured = None
        sent = self._publish(send, task, opts, countdown, eta, expires, expiration, now)
        if not sent:
            return False
        if shape is not None and self._captured is not None:
            self._learn(shape, send)
        return True

    def _shape(self, task, options, policy):
        """What the messages sharing one serialized form share: the task,
        its options and retry policy; None where each message must be built
        (options that cannot be compared cheaply, publish signals that may
        change each message, routes that read the arguments)."""
        if self.before.receivers or self.after.receivers:
            return None
        if not self.by_name:
            return None
        try:
            shape = (task, tuple(options.items()), id(policy))
            hash(shape)
        except TypeError:  # a link, headers: not worth comparing
            return None
        return shape

    def _learn(self, shape, send):
        """The second message of a shape makes its template from the first."""
        seen = self._seen.get(shape)
        if seen is None:
            self._seen[shape] = (send.task_id, self._captured)
        else:
            task_id, captured = seen
            self._templates[shape] = _Template(task_id, *captured, self._calls)

    def _publish(self, send, task, opts, countdown, eta, expires, expiration, now):
        # Celery's send_task, as_task_v2, send_task_message and
        # Producer.publish, in their order, for the options of _OPTIONS.
        name = task.name
        task_id = send.task_id
        args, kwargs = send.args or (), send.kwargs or {}
        link = opts.pop("link", None)
        link_error = opts.pop("link_error", None)
        add_to_parent = opts.pop("add_to_parent", True)
        group_id = opts.pop("group_id", None)
        group_index = opts.pop("group_index", None)
        root_id = opts.pop("root_id", None)
        parent_id = opts.pop("parent_id", None)
        shadow = opts.pop("shadow", None)
        time_limit = opts.pop("time_limit", None)
        soft_time_limit = opts.pop("soft_time_limit", None)
        ignore_result = opts.pop("ignore_result", None)
        opts = self._route(opts, name, args, kwargs, task)
        if opts is None:
            return False
        if expiration is not None:
            opts["expiration"] = expiration
        parent = self.parent
        if parent and (not root_id or not parent_id):
            root_id = root_id or parent.request.root_id or parent.request.id
            parent_id = parent_id or parent.request.id
            if self.inherit_priority:
                priority = parent.request.delivery_info.get("priority")
                opts.setdefault("priority", priority)
        if countdown:
            now = now or self.app.now()
            eta = maybe_make_aware(
                add_seconds_to_datetime(now, countdown), tz=self.app.timezone
            )
        if isinstance(expires, numbers.Real):
            now = now or self.app.now()
            expires = maybe_make_aware(
                add_seconds_to_datetime(now, expires), tz=self.app.timezone
            )
        if not isinstance(eta, str):
            eta = eta and eta.isoformat()
        if not isinstance(expires, str):
            expires = expires and expires.isoformat()
        argsrepr = self._repr(args, self.argsrepr_size)
        kwargsrepr = self._repr(kwargs, self.kwargsrepr_size)
        headers = {
            "lang": "py",
            "task": name,
            "id": task_id,
            "shadow": shadow,
            "eta": eta,
            "expires": expires,
            "group": group_id,
            "group_index": group_index,
            "retries": 0,
            "timelimit": [time_limit, soft_time_limit],
            "root_id": root_id or task_id,
            "parent_id": parent_id,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "origin": self.origin,
            "ignore_result": ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {"correlation_id": task_id, "reply_to": self.reply_to}
        body = (
            args,
            kwargs,
            {
                "callbacks": maybe_list(link),
                "errbacks": maybe_list(link_error),
                "chain": None,
                "chord": None,
            },
        )
        self._calls = (ignore_result, add_to_parent)
        self._call(task_id, ignore_result)
        self._send(name, headers, properties, body, opts)
        self._trail(task, task_id, ignore_result, add_to_parent)
        return True

    def _call(self, task_id, ignore_result):
        # The result backend's on_task_call (Redis subscribes to the result).
        if not ignore_result and self.on_task_call is not None:
            self.on_task_call(self.producer, task_id)

    def _trail(self, task, task_id, ignore_result, add_to_parent):
        # Sent from a running task: its result joins the task's children.
        parent = self.parent
        if add_to_parent and parent:
            result = task.AsyncResult(task_id)
            result.ignored = ignore_result
            parent.add_trail(result)

    def _send(self, name, headers, properties, body, opts):
        # Celery's send_task_message, then kombu's Producer.publish: to a
        # queue on a direct exchange (_route), so by the anonymous exchange.
        extra = opts.pop("headers", None)
        if extra:
            headers.update(extra)
        queue = opts.pop("queue")
        retry = opts.pop("retry", None)
        policy = opts.pop("retry_policy", None)
        serializer = opts.pop("serializer", None)
        delivery_mode = opts.pop("delivery_mode", None)
        compression = opts.pop("compression", None)
        opts.pop("exchange", None)  # both None: _route made sure
        opts.pop("routing_key", None)
        properties.update(opts)
        if delivery_mode is None:
            delivery_mode = queue.exchange.delivery_mode or self.default_delivery_mode
        exchange, routing_key, declare = "", queue.name, [queue]
        retry = self.default_retry if retry is None else retry
        policy = self._policy(policy)
        if self.before.receivers:
            self.before.send(
                sender=name,
                body=body,
                exchange=exchange,
                routing_key=routing_key,
                declare=declare,
                headers=headers,
                properties=properties,
                retry_policy=policy,
            )
        self._put(
            body,
            exchange,
            routing_key,
            serializer or self.default_serializer,
            compression or self.default_compression,
            retry,
            policy,
            delivery_mode,
            declare,
            headers,
            properties,
        )
        if self.after.receivers:
            self.after.send(
                sender=name,
                body=body,
                headers=headers,
                exchange=exchange,
                routing_key=routing_key,
            )

    def _put(
        self,
        body,
        exchange,
        routing_key,
        serializer,
        compression,
        retry,
        policy,
        delivery_mode,
        declare,
        headers,
        properties,
    ):
        # kombu's Producer.publish, with each queue declared once a batch.
        producer = self.producer
        embed = body[2]
        mandatory = properties.pop("mandatory", False)
        immediate = properties.pop("immediate", False)
        priority = properties.pop("priority", 0)
        content_type = properties.pop("content_type", None)
        content_encoding = properties.pop("content_encoding", None)
        expiration = properties.pop("expiration", None)
        if compression is None:
            compression = producer.compression
        exchange_name, properties["delivery_mode"] = producer._delivery_details(
            exchange or producer.exchange, delivery_mode
        )
        if expiration is not None:
            properties["expiration"] = str(int(expiration * 1000))
        body, content_type, content_encoding = producer._prepare(
            body, serializer, content_type, content_encoding, compression, headers
        )
        declare = self._undeclared(declare)
        if not declare and self._pipelined(
            (embed if serializer == "json" and not compression else None),
            body,
            priority,
            content_type,
            content_encoding,
            headers,
            properties,
            routing_key,
        ):
            return
        publish = producer._publish
        if retry:
            connection = producer.connection
            connection.transport_options.update(policy)
            publish = connection.ensure(producer, publish, **policy)
        publish(
            body,
            priority,
            content_type,
            content_encoding,
            headers,
            properties,
            routing_key,
            mandatory,
            immediate,
            exchange_name,
            declare,
            None,  # timeout
            None,  # confirm_timeout
            retry,
            policy,
        )

    def _pipelined(
        self,
        embed,
        body,
        priority,
        content_type,
        content_encoding,
        headers,
        properties,
        routing_key,
    ):
        """Put the message in the Redis pipeline of kombu's publish batch, as
        kombu's Redis channel would for the anonymous exchange; False where
        kombu must (no batch, another transport, a queue with ``x-expires``).
        ``embed`` is the body's third part where the body is kombu's JSON
        of it, uncompressed: the message may be a template's model."""
        session = self._session()
        if session is None or routing_key in (session.channel._expires or ()):
            return False  # a queue with x-expires: kombu refreshes its expiry
        channel = session.channel
        # Channel.prepare_message, then basic_publish's augmentation.
        properties.setdefault("delivery_info", {})
        properties.setdefault("priority", priority or channel.default_priority)
        message = {
            "body": body,
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers or {},
            "properties": properties,
        }
        message["body"], body_encoding = channel.encode_body(
            body, channel.body_encoding
        )
        properties["body_encoding"] = body_encoding
        properties["delivery_tag"] = uuid4()
        properties["delivery_info"].update(exchange="", routing_key=routing_key)
        # Channel._put
        key = channel._q_for_pri(routing_key, channel._get_message_priority(message))
        session.pipeline.lpush(key, dumps(message))
        session._buffered += 1
        if embed is not None and content_type == "application/json":
            self._captured = (message, embed, key)
        return True

    def _session(self):
        """kombu's Redis publish batch the producer is in, or None (no batch,
        or its channel not open: kombu opens or revives it, under the retry
        policy)."""
        state = getattr(self.producer._batch_local, "current", None)
        channel = self.producer._channel
        if state is None or getattr(channel, "connection", None) is None:
            return None
        if state is not self._batch:  # a batch of its own, a session of its own
            session = state._get_session(channel)
            self._batch = state
            self._batch_session = session if isinstance(session, PublishBatch) else None
        return self._batch_session

    def _undeclared(self, entities):
        """Those of ``entities`` kombu's ``maybe_declare`` would declare: not
        yet declared on this connection (kombu remembers them, but binds a
        copy of each to find out, on every call)."""
        # Not opened yet (kombu opens it under the retry policy), or closed
        # (kombu revives it): kombu declares.
        connection = getattr(self.producer._channel, "connection", None)
        if connection is None:
            return entities
        declared = connection.client.declared_entities
        return [
            entity
            for entity in entities
            if not (entity.can_cache_declaration and hash(entity) in declared)
        ]

    def _task(self, task):
        try:
            return self._tasks[task]
        except KeyError:
            pass
        options = task._get_exec_options()
        if (
            type(task).shadow_name is not Task.shadow_name
            or task.__v2_compat__
            or getattr(task, "_dump_pydantic_arguments", None) is not None
            or (
                task.soft_time_limit
                and task.time_limit
                and task.soft_time_limit > task.time_limit
            )
        ):
            options = None
        self._tasks[task] = options
        return options

    def _route(self, options, name, args, kwargs, task):
        """Celery's ``Router.route`` (the routes' answer kept per task name
        when every router answers by the name alone); None, for Celery to
        send it, unless the message goes to a queue on a direct exchange."""
        router = self.router
        queue = options.pop("queue", None)
        if queue:
            if isinstance(queue, str):
                try:
                    queue = router.queues[queue]
                except KeyError:
                    return None  # Celery's QueueNotFound, from Celery
            options["queue"] = queue
        route = self._lookup(name, args, kwargs, options, task)
        if route:
            if isinstance(route, dict):
                route = dict(route)  # expand_destination pops its queue
            options = lpmerge(router.expand_destination(route), options)
        elif "queue" not in options:
            options = lpmerge({"queue": self.default_queue}, options)
        queue = options.get("queue")
        direct = (
            isinstance(queue, Queue)
            and queue.exchange.type == "direct"
            and options.get("exchange") is None
            and options.get("routing_key") is None
            and options.keys() <= _ROUTED
        )
        return options if direct else None

    def _lookup(self, name, args, kwargs, options, task):
        if not self.by_name:
            return self.router.lookup_route(name, args, kwargs, options, task)
        try:
            return self._routes[name]
        except KeyError:
            route = self.router.lookup_route(name, args, kwargs, options, task)
            self._routes[name] = route
            return route

    def _policy(self, policy):
        key = id(policy)
        try:
            return self._policies[key][1]
        except KeyError:
            merged = (
                dict(self.default_policy, **policy)
                if policy
                else dict(self.default_policy)
            )
            self._policies[key] = (policy, merged)  # holds policy: id stays its
            return merged

    def _repr(self, value, size):
        """Celery's ``saferepr`` of ``value``: ``repr`` for flat arguments of
        plain values and printable ASCII text, short enough that saferepr
        truncates nothing (the same text, 1/20 of the time)."""
        values = value.values() if isinstance(value, dict) else value
        for item in values:
            kind = type(item)
            if kind is str:
                if len(item) > 200 or not (item.isascii() and item.isprintable()):
                    break
            elif kind not in _PLAIN or (kind is int and not -(2**63) < item < 2**63):
                break
        else:
            text = repr(value)
            if len(text) <= size // 2:
                return text
        return saferepr(value, size, maxlevels=self.repr_levels)


class _Template:
    """The serialized form of one shape of message (one task, the same
    options and policy, on Redis, as JSON): its copies differ only in the
    task id, the arguments and the delivery tag, which each message puts in
    their places (``str.format`` over the model's JSON).  The model is a
    message built in full, so the copies are what that build would make of
    them (tests/test_wire.py compares them byte for byte)."""

    def __init__(self, task_id, message, embed, key, calls):
        self.embed, self.key = embed, key
        self.ignore_result, self.add_to_parent = calls
        nonce = uuid4()
        marks = {name: f"{nonce}:{name}" for name in ("B", "I", "A", "K", "D")}
        headers = dict(message["headers"])
        properties = dict(message["properties"])
        headers["id"] = properties["correlation_id"] = marks["I"]
        if headers["root_id"] == task_id:  # not sent from a running task
            headers["root_id"] = marks["I"]
        headers["argsrepr"], headers["kwargsrepr"] = marks["A"], marks["K"]
        properties["delivery_tag"] = marks["D"]
        model = {
            **message,
            "body": marks["B"],
            "headers": headers,
            "properties": properties,
        }
        text = dumps(model).replace("{", "{{").replace("}", "}}")
        for name, mark in marks.items():
            text = text.replace(f'"{mark}"', f"{{{name}}}")
        self.format = text.format

    def put(self, wire, session, send):
        args, kwargs = send.args or (), send.kwargs or {}
        task_id = send.task_id
        wire._call(task_id, self.ignore_result)
        body = _JSON.encode((args, kwargs, self.embed))
        channel = session.channel
        body = channel.encode_body(body, channel.body_encoding)[0]
        session.pipeline.lpush(
            self.key,
            self.format(
                B=_quote(body),
                I=_quote(task_id),
                A=_quote(wire._repr(args, wire.argsrepr_size)),
                K=_quote(wire._repr(kwargs, wire.kwargsrepr_size)),
                D=_quote(uuid4()),
            ),
        )
        session._buffered += 1
        wire._trail(send.task, task_id, self.ignore_result, self.add_to_parent)
