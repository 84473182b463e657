"""RabbitMQ's publisher confirms: on by default, one wait per batch, and each
answer (ack, nack, none) attributed to its own task.

The local RabbitMQ, on queues of the test's own (deleted at teardown); a
queue with ``x-max-length`` and ``x-overflow = reject-publish`` for real
nacks; an exchange that does not exist for a channel the broker closes; and
for a broker that takes messages and never answers, or goes away, a TCP
relay of the test's own in front of RabbitMQ that holds back the broker's
replies or cuts its connections.
"""

import logging
import socket
import threading
import time
import uuid
from contextlib import suppress
from urllib.parse import urlsplit

import kombu
import pytest
import transaction
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from pyramid_tasks import ScheduleOnCommitTask

from .test_jobs_web import durable, echo  # noqa: F401 - a fixture

_KEY = "celery.broker_transport_options.confirm_publish"


def make_app(broker_url, queue_name, **settings):
    """A committed app whose task ``echo`` is a ScheduleOnCommitTask."""
    config = Configurator(
        settings={
            "celery.broker_url": broker_url,
            "celery.task_default_queue": queue_name,
            **settings,
        }
    )
    config.include("pyramid_tasks")
    config.add_task(echo, bind=True, base=ScheduleOnCommitTask, name="echo")
    config.commit()
    return config.registry.celery_app


class Rabbit:
    """The test's queues on RabbitMQ: declared, read and deleted."""

    def __init__(self, url):
        self.url = url
        self.queues = []
        self.token = uuid.uuid4().hex[:10]

    def name(self, label):
        name = f"pyramid_tasks_test_{self.token}_{label}"
        self.queues.append(name)
        return name

    def declare(self, label, max_length=None):
        """A queue, bound to ``amq.direct`` under its own name; with
        ``max_length``, one that refuses (nacks) every message beyond it."""
        name = self.name(label)
        exchange = kombu.Exchange("amq.direct", type="direct")
        arguments = None
        if max_length is not None:
            arguments = {"x-max-length": max_length, "x-overflow": "reject-publish"}
        with kombu.Connection(self.url) as connection:
            queue = kombu.Queue(
                name, exchange, routing_key=name, queue_arguments=arguments
            )
            queue(connection.default_channel).declare()
        return name

    def ids(self, name):
        """The task ids of the messages in queue ``name``, taken off it."""
        found = []
        with kombu.Connection(self.url) as connection:
            channel = connection.default_channel
            while (message := channel.basic_get(name, no_ack=True)) is not None:
                found.append(message.headers["id"])
        return found

    def delete(self):
        with kombu.Connection(self.url) as connection:
            channel = connection.default_channel
            for name in self.queues:
                channel.queue_delete(name)


@pytest.fixture
def rabbit(amqp_url):
    rabbit = Rabbit(amqp_url)
    yield rabbit
    rabbit.delete()


@pytest.fixture
def queue(rabbit):
    """The durable app's queue (test_jobs_web's ``durable`` fixture)."""
    return rabbit.name("jobs")


@pytest.fixture
def apps():
    made = []

    def make(*args, **settings):
        made.append(make_app(*args, **settings))
        return made[-1]

    yield make
    for app in made:
        app.close()


def commit(app, *calls):
    """One transaction scheduling ``(value, options)`` calls; their ids."""
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        task = app.tasks["echo"]
        ids = [
            task.apply_async((value,), tm=tm, **options).id for value, options in calls
        ]
    return ids


def logged(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.levelno >= level]


# -- the setting ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "settings", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", {}, True),
        ("pyamqp://127.0.0.1//", {}, True),
        ("amqp://127.0.0.1//", {_KEY: "false"}, False),
        ("amqp://127.0.0.1//", {_KEY: "off"}, False),
        ("redis://127.0.0.1:6379/0", {}, None),
        ("redis://127.0.0.1:6379/0", {_KEY: "yes"}, True),
    ],
)
def test_confirms_are_on_for_rabbitmq_unless_the_ini_says(url, settings, expected):
    """A py-amqp broker gets ``confirm_publish``; the INI's own value wins,
    read as a strict boolean; other brokers are left alone."""
    app = make_app(url, "q", **settings)
    assert app.conf.broker_transport_options.get("confirm_publish") == expected
    assert (
        app.conf.broker_transport_options
        is not make_app(url, "q").conf.broker_transport_options
    )


def test_a_bad_confirm_publish_value_names_the_setting():
    with pytest.raises(ConfigurationError) as raised:
        make_app("amqp://127.0.0.1//", "q", **{_KEY: "maybe"})
    assert (
        "Invalid setting celery.broker_transport_options.confirm_publish = "
        "'maybe': expected one of true/false, yes/no, on/off, 1/0."
    ) in str(raised.value)


# -- one wait a batch, each answer to its task ---------------------------------


@pytest.mark.parametrize("timeout", ["2", "none"])
def test_a_hundred_tasks_are_confirmed_and_delivered_once(
    rabbit, apps, caplog, timeout
):
    app = apps(rabbit.url, rabbit.name("main"), **{"tasks.publish_timeout": timeout})
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        ids = commit(app, *[(n, {}) for n in range(100)])
        [single] = commit(app, (100, {}))  # a batch of one, the same channel
    delivered = rabbit.ids(app.conf.task_default_queue)
    print(f"scheduled=101 delivered={len(delivered)} reported={len(caplog.records)}")
    assert delivered == [*ids, single]
    assert logged(caplog) == []


def test_each_nack_is_its_own_tasks(rabbit, apps, caplog):
    """Five tasks to a queue that takes two, between five to the main queue:
    the three the broker refuses are reported, each by its id; the rest
    arrive, each once."""
    app = apps(rabbit.url, rabbit.name("main"))
    full = rabbit.declare("full", 2)
    to_full = {"exchange": "amq.direct", "routing_key": full}
    calls = [(n, to_full if n % 2 else {}) for n in range(10)]
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        ids = commit(app, *calls)
    main, kept = rabbit.ids(app.conf.task_default_queue), rabbit.ids(full)
    refused = [r.args[1] for r in logged(caplog)]
    print(
        f"scheduled=10 main={len(main)} full queue={len(kept)} "
        f"refused={len(refused)} lost={10 - len(main) - len(kept) - len(refused)}"
    )
    assert main == ids[0::2]
    assert kept == ids[1::2][:2]
    assert refused == ids[1::2][2:]
    for record in logged(caplog):
        assert record.levelno == logging.ERROR
        assert record.getMessage() == (
            f"Task echo[{record.args[1]}] was committed but could not be sent: "
            "Refused: the broker refused it (basic.nack)"
        )


def test_an_exchange_that_does_not_exist_costs_only_its_task(rabbit, apps, caplog):
    """The broker closes the channel on the bad publish, before answering
    for the others: they go again one at a time (those it may have taken
    already may arrive twice), and the bad one fails alone.  Once as the
    last of its batch (the close comes while the batch waits), once before
    a send to a new queue (whose declaration meets the close)."""
    app = apps(rabbit.url, rabbit.name("main"))
    other = rabbit.declare("other")
    bad = {"exchange": f"missing_{rabbit.token}", "routing_key": "x"}
    main, figures = [], []
    for calls in (
        [(0, {}), (1, {}), (2, bad)],
        [(0, {}), (1, bad), (2, {"queue": other}), (3, {})],
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
            ids = commit(app, *calls)
        [bad_id] = [
            i for i, (_, options) in zip(ids, calls, strict=True) if options is bad
        ]
        good = [i for i in ids if i != bad_id]
        [warning, error] = logged(caplog)
        arrived = rabbit.ids(app.conf.task_default_queue) + rabbit.ids(other)
        maybe = warning.args[2]
        counts = {
            "scheduled": len(ids),
            "delivered": len(set(arrived)),
            "duplicates": len(arrived) - len(set(arrived)),
            "lost": len(set(good) - set(arrived)),
            "may arrive twice": maybe,
        }
        print(" ".join(f"{k}={v}" for k, v in counts.items()))
        figures.append(counts)
        assert sorted(set(arrived)) == sorted(good)
        assert counts["duplicates"] <= maybe - 1  # the bad one never arrives
        assert warning.getMessage().startswith(
            f"Sending {warning.args[0]} committed tasks again one at a time ("
        )
        assert f"NOT_FOUND - no exchange 'missing_{rabbit.token}'" in (
            warning.getMessage()
        )
        assert error.args[1] == bad_id
        assert error.getMessage().endswith(
            "ChannelClosed: the broker closed the channel: Basic.publish: (404) "
            f"NOT_FOUND - no exchange 'missing_{rabbit.token}' in vhost '/'"
        )
        main.append(ids)
    # The channel the broker closed is in confirm mode again for the next.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        ids = commit(app, (9, {}), (10, {}))
    assert rabbit.ids(app.conf.task_default_queue) == ids
    assert logged(caplog) == []


def test_alone_a_refused_publish_is_its_own_error(rabbit, apps, caplog):
    app = apps(rabbit.url, rabbit.name("main"))
    bad = {"exchange": f"missing_{rabbit.token}", "routing_key": "x"}
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        [task_id] = commit(app, (1, bad))
        [after] = commit(app, (2, {}))
    [error] = logged(caplog)
    assert error.getMessage() == (
        f"Task echo[{task_id}] was committed but could not be sent: "
        "ChannelClosed: the broker closed the channel: Basic.publish: (404) "
        f"NOT_FOUND - no exchange 'missing_{rabbit.token}' in vhost '/'"
    )
    assert rabbit.ids(app.conf.task_default_queue) == [after]


def test_without_confirms_a_refused_publish_is_lost_silently(rabbit, apps, caplog):
    """What ``confirm_publish = false`` gives: the broker closes the channel
    on the bad publish and drops what followed it until py-amqp notices
    (when it next reads, at a later publish: that task gets the error).
    The bad task itself is never reported."""
    app = apps(rabbit.url, rabbit.name("main"), **{_KEY: "false"})
    bad = {"exchange": f"missing_{rabbit.token}", "routing_key": "x"}
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        ids = commit(app, (0, {}), (1, bad), (2, {}), (3, {}))
    arrived = rabbit.ids(app.conf.task_default_queue)
    reported = [r.args[1] for r in logged(caplog)]
    silent = [i for i in ids if i not in arrived and i not in reported]
    print(
        f"scheduled=4 (1 bad) delivered={len(arrived)} reported={len(reported)} "
        f"lost silently={len(silent)}"
    )
    assert arrived[0] == ids[0]
    assert ids[1] in silent


def test_a_refused_job_stays_pending_for_the_relay(rabbit, durable, caplog):  # noqa: F811
    d = durable(broker_url=rabbit.url)
    full = rabbit.declare("full", 1)
    to_full = {"exchange": "amq.direct", "routing_key": full}
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        d.tm.begin()
        ids = [d.echo.apply_async((n,), tm=d.tm, **to_full).id for n in range(3)]
        d.tm.commit()
    states = d.states()
    print("states:", [states[i] for i in ids])
    assert [states[i] for i in ids] == ["queued", "pending", "pending"]
    assert [r.getMessage() for r in logged(caplog)] == [
        f"Job echo[{i}] is committed; the broker did not take it (Refused: the "
        "broker refused it (basic.nack)): the relay will send it."
        for i in ids[1:]
    ]
    assert rabbit.ids(full) == ids[:1]


# -- a broker that does not answer, or goes away --------------------------------


class Relay:
    """A TCP relay on a free port in front of RabbitMQ: ``hold()`` stops
    passing the broker's replies on (it takes messages, never answers),
    ``cut()`` closes every connection."""

    def __init__(self, url):
        parts = urlsplit(url)
        self.target = (parts.hostname, parts.port or 5672)
        self.server = socket.create_server(("127.0.0.1", 0))
        port = self.server.getsockname()[1]
        self.url = url.replace(parts.netloc, f"guest:guest@127.0.0.1:{port}")
        self.replies = threading.Event()
        self.replies.set()
        self.sockets = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            broker = socket.create_connection(self.target)
            self.sockets += [client, broker]
            threading.Thread(
                target=self._pipe, args=(client, broker), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(broker, client, self.replies), daemon=True
            ).start()

    def _pipe(self, source, sink, gate=None):
        try:
            while data := source.recv(65536):
                if gate is not None:
                    gate.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def hold(self):
        self.replies.clear()

    def cut(self):
        for end in self.sockets:
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        self.replies.set()  # what it held goes nowhere now

    def close(self):
        self.cut()
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.server.close()


@pytest.fixture
def relay(amqp_url):
    relay = Relay(amqp_url)
    yield relay
    relay.close()


def test_unanswered_messages_are_reported_as_maybe_delivered(
    rabbit, relay, apps, caplog
):
    """The broker takes the batch and its answers never come: after
    ``tasks.publish_timeout`` each task is reported as committed and maybe
    delivered; they were."""
    app = apps(relay.url, rabbit.name("main"), **{"tasks.publish_timeout": "0.5"})
    commit(app, (0, {}))  # connected, in confirm mode
    relay.hold()
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        start = time.monotonic()
        ids = commit(app, *[(n, {}) for n in range(3)])
        held = time.monotonic() - start
    print(f"commit held {held:.2f} s for a 0.5 s publish timeout")
    assert 0.5 <= held < 2.5  # one timeout, plus a loaded machine's margin
    assert [r.getMessage() for r in logged(caplog)] == [
        f"Task echo[{i}] was committed and may have been delivered, but the "
        "broker did not confirm it: TimeoutError: no answer from the broker "
        "within 0.5 s (tasks.publish_timeout)"
        for i in ids
    ]
    assert rabbit.ids(app.conf.task_default_queue)[1:] == ids


@pytest.mark.parametrize("when", ["publishing", "waiting"])
def test_a_broker_gone_mid_batch_is_reported(rabbit, relay, apps, caplog, when):
    """Cut while the batch is published (no retry: ``retry=False``), or while
    it waits for the answers: the tasks are reported, as maybe delivered
    where they went out."""
    app = apps(relay.url, rabbit.name("main"))
    commit(app, (0, {}))
    relay.hold()
    if when == "publishing":
        relay.cut()
    else:
        threading.Timer(0.3, relay.cut).start()
    with caplog.at_level(logging.WARNING, logger="pyramid_tasks"):
        ids = commit(app, *[(n, {"retry": False}) for n in range(3)])
    messages = [r.getMessage() for r in logged(caplog)]
    print("\n".join(messages))
    assert [r.args[1] for r in logged(caplog)] == ids
    verb = "could not be sent" if when == "publishing" else "may have been delivered"
    assert all(verb in message for message in messages)
