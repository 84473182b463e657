"""RabbitMQ's path of the after-commit publish: publisher confirms per batch.

With ``confirm_publish`` kombu waits for the broker's answer after each
message, a round trip a task.  Here a committed batch goes out on a channel
in confirm mode without waiting, then waits once for the acks and nacks of
all its messages.  The broker numbers the messages of a channel from 1 from
its ``confirm.select`` on (the delivery tags of its ``basic.ack`` and
``basic.nack``, ``multiple`` covering every tag up to its own): a count a
channel, kept here, matches each answer to its task.
"""

import functools
import time
import weakref

__all__ = ["Batch", "ChannelClosed", "Refused"]


class _Epoch:
    """A channel's publishes since its ``confirm.select``.  A channel that
    the broker closed is reopened in place by py-amqp, out of confirm mode:
    its next publish selects again and starts a new epoch at tag 1.

    Its listeners stay on the channel for the epoch's life: py-amqp reads
    the answers that arrived whenever it publishes (it looks for
    ``connection.blocked``), not only while the batch waits.
    """

    def __init__(self, channel):
        self.channel = channel
        self.count = 0
        self.pending = {}  # delivery tag -> (batch, send)
        self.on_ack = functools.partial(self.answer, "acked")
        self.on_nack = functools.partial(self.answer, "nacked")
        channel.events["basic_ack"].add(self.on_ack)
        channel.events["basic_nack"].add(self.on_nack)

    def answer(self, into, delivery_tag, multiple):
        # Those of an earlier batch that gave up waiting are no longer here.
        tags = [
            tag
            for tag in self.pending
            if (tag <= delivery_tag if multiple else tag == delivery_tag)
        ]
        for tag in tags:
            batch, send = self.pending.pop(tag)
            getattr(batch, into).add(id(send))

    def end(self):
        self.channel.events["basic_ack"].discard(self.on_ack)
        self.channel.events["basic_nack"].discard(self.on_nack)


# Each channel's current epoch; an entry dies with its channel.
_epochs = weakref.WeakKeyDictionary()


def _epoch(channel):
    epoch = _epochs.get(channel)
    # py-amqp clears _confirm_selected when it reopens a closed channel.
    if epoch is None or not channel._confirm_selected:
        if epoch is not None:
            epoch.end()
        channel.confirm_select()
        channel._confirm_selected = True
        epoch = _epochs[channel] = _Epoch(channel)
    return epoch


class Batch:
    """Publishes of one producer whose confirms are awaited together.

    Used as a context manager around :meth:`publish` calls, then
    :meth:`wait`.  While it is open, every message the producer publishes
    (on whichever channel kombu's retry policy gives it) gets a delivery tag
    and is matched to the send being published.
    """

    def __init__(self, producer, timeout):
        self.producer = producer
        self.timeout = timeout
        self.epochs = []
        self.current = None
        self.acked = set()  # id()s of sends
        self.nacked = set()
        self.published = []  # sends, in order

    def __enter__(self):
        original = self.producer._publish

        def _publish(*args, **kwargs):
            epoch = _epoch(self.producer.channel)
            result = original(*args, **kwargs)
            epoch.count += 1
            if epoch not in self.epochs:
                self.epochs.append(epoch)
            epoch.pending[epoch.count] = (self, self.current)
            self.published.append(self.current)
            return result

        # Producer.publish looks _publish up on each call, retries included.
        self.producer._publish = _publish
        return self

    def __exit__(self, *exc_info):
        del self.producer._publish

    def publish(self, send, apply):
        """``apply()`` publishes ``send`` (Celery's ``apply_async``)."""
        self.current = send
        apply()

    def unconfirmed(self):
        """Sends published and neither acked nor nacked, in order."""
        answered = self.acked | self.nacked
        return [send for send in self.published if id(send) not in answered]

    def wait(self):
        """Wait for the answers to every message published, at most
        ``timeout`` seconds in all (``None``: for ever).

        Returns why some went unanswered: ``None`` (none did), a
        :class:`TimeoutError`, or a :class:`ChannelClosed` (chained from the
        broker's channel error, when it was seen here): the broker closed
        their channel before answering, some of them may have been delivered.
        A connection error is raised.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        reason = None
        for epoch in self.epochs:
            try:
                reason = self._wait(epoch, deadline) or reason
            except self.producer.connection.channel_errors as exc:
                reason = ChannelClosed(f"the broker closed the channel: {exc}")
                reason.__cause__ = exc
            finally:
                epoch.pending.clear()  # answers that come later are no one's
        return reason

    def _wait(self, epoch, deadline):
        channel = epoch.channel
        while epoch.pending:  # the producer's, so this batch's alone
            # Closed by the broker (and reopened by py-amqp, out of confirm
            # mode), or its connection lost: no answer will come.
            if not (channel.is_open and channel._confirm_selected):
                return ChannelClosed("the broker closed the channel")
            remaining = None
            if deadline is not None:  # a last look at what arrived
                remaining = max(deadline - time.monotonic(), 0.001)
            try:
                channel.connection.drain_events(timeout=remaining)
            except TimeoutError:
                return self._timed_out()
        return None

    def _timed_out(self):
        return TimeoutError(
            f"no answer from the broker within {self.timeout:g} s "
            "(tasks.publish_timeout)"
        )


class Refused(Exception):
    """The broker answered ``basic.nack``: it did not take the message (a
    full queue with ``x-overflow = reject-publish``, an internal error)."""


class ChannelClosed(Exception):
    """The broker closed the channel before answering for a message: it may
    have been delivered, or dropped."""
