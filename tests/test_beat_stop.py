"""``tasks-celery ... beat`` stops on SIGTERM wherever the signal lands.

Celery's beat handler closes the broker connection inside the handler: on
RabbitMQ, a SIGTERM that lands while a publish waits for its confirm leaves
that close waiting for ever on a stream it reads out of step (2 beats of 30,
sending an entry every 5 ms, never exited; it failed this suite's CI once).
:class:`pyramid_tasks.beat.Beat`'s handler does no I/O.  Here a real beat
``Service`` on the local RabbitMQ, its handler installed, gets the signal
at the two kinds of moment, in this process: inside py-amqp, reading the
confirm of a publish (the signal raised by py-amqp's own ``basic_ack``
callback), and between two ticks.
"""

import signal
import time
import uuid

import kombu
import pytest
from kombu.utils.functional import retry_over_time
from pyramid.config import Configurator

from pyramid_tasks.beat import Beat


@pytest.fixture
def beat(amqp_url, tmp_path):
    """``(beat, service, queue)``: a beat service of an app on RabbitMQ, its
    signal handlers installed (the test's own restored after)."""
    queue = f"pyramid_tasks_test_{uuid.uuid4().hex[:10]}"
    config = Configurator(
        settings={"celery.broker_url": amqp_url, "celery.task_default_queue": queue}
    )
    config.include("pyramid_tasks")
    config.commit()
    app = config.registry.celery_app
    beat = app.Beat(schedule=str(tmp_path / "schedule"), quiet=True)
    service = beat.Service(app=app, schedule_filename=beat.schedule)
    names = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    saved = {name: signal.getsignal(name) for name in names}
    beat.install_sync_handler(service)
    yield beat, service, queue
    signal.setitimer(signal.ITIMER_REAL, 0)
    for name, handler in saved.items():
        signal.signal(name, handler)
    with kombu.Connection(amqp_url) as connection:
        connection.default_channel.queue_delete(queue)
    app.close()


def publish(service, queue):
    producer = service.scheduler.producer
    producer.publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
    return producer


def test_tasks_celerys_beat_is_ours(beat):
    assert isinstance(beat[0], Beat)


def test_a_sigterm_inside_a_confirm_drops_the_connection_without_a_word(beat):
    _, service, queue = beat
    producer = publish(service, queue)  # the connection, its channel open
    connection = service.scheduler.connection
    acks = producer.channel.events["basic_ack"]
    acks.add(lambda *args: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(SystemExit):
        publish(service, queue)
    # The handler saved and closed nothing (Celery's does, and sets this).
    assert not service._is_stopped.is_set()
    # Dropped untouched: no handshake on a stream in an unknown state, no
    # lock of the client taken (the process ends, its socket with it).
    assert "connection" not in service.scheduler.__dict__
    assert "producer" not in service.scheduler.__dict__
    assert connection.connected
    # What the beat loop's ``finally`` does next returns (no broker I/O on the
    # dropped connection), and a later publish opens a connection of its own.
    service.sync()
    assert service._is_stopped.is_set()
    publish(service, queue)
    assert service.scheduler.connection is not connection
    with kombu.Connection(service.app.conf.broker_url) as check:
        _, messages, _ = check.default_channel.queue_declare(queue, passive=True)
    assert messages == 3  # the cut publish too: its ack is what was being read
    connection.release()  # this test's process lives on


def test_a_sigterm_between_ticks_keeps_the_connection_for_its_close(beat):
    _, service, queue = beat
    publish(service, queue)
    connection = service.scheduler.connection
    with pytest.raises(SystemExit):
        signal.raise_signal(signal.SIGINT)
    assert not service._is_stopped.is_set()
    assert service.scheduler.__dict__["connection"] is connection
    service.sync()  # Celery's close: the connection closed by a handshake
    assert "connection" not in service.scheduler.__dict__
    assert not connection.connected


@pytest.mark.parametrize("made", ["no scheduler", "no connection"])
def test_a_sigterm_in_broker_code_before_any_connection_stops_too(beat, made):
    """The signal lands in kombu's code (its retry loop calling ours) while
    the service has not made its scheduler yet, or its connection."""
    _, service, _ = beat
    if made == "no connection":
        service.scheduler  # noqa: B018 - made, its connection still lazy
    with pytest.raises(SystemExit):
        retry_over_time(signal.raise_signal, (), args=(signal.SIGTERM,))
    assert "connection" not in vars(service.__dict__.get("scheduler", service))
    assert not service._is_stopped.is_set()


class Finalized:
    """An object whose finalizer gets the signal (as a sent task's result
    object, collected while it talks to a Redis result backend)."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def test_a_sigterm_in_a_finalizer_stops_beat_all_the_same(beat):
    """What a finalizer raises, Python ignores (Celery's beat ran on for
    ever): the loop is told to end, and SystemExit comes again from a timer,
    outside the finalizer."""
    _, service, _ = beat
    started = time.monotonic()
    with pytest.raises(SystemExit):
        Finalized()  # collected at once: its __del__ gets the signal
        assert service._is_shutdown.is_set()
        # Busy in Python until the timer's SystemExit arrives (a deadline,
        # not a wait: reaching it fails the test below).
        deadline = started + 5
        while time.monotonic() < deadline:
            pass
    assert time.monotonic() - started < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
