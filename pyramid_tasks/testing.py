"""Capture tasks in application tests instead of sending them.

.. code-block:: python

    config.include("pyramid_tasks.testing")

Scheduling still honours the transaction (abort and savepoint rollback drop,
commit records), nothing reaches a broker, and nothing runs until the test
asks.  It also works with the pyramid-cookiecutter test recipe, whose
``request.tm`` is doomed and never commits: see :meth:`TaskCapture.pending`.
"""

from dataclasses import dataclass

from .datamanager import pending_sends

__all__ = ["CapturedTask", "TaskCapture", "get_task_capture", "includeme"]


@dataclass
class CapturedTask:
    """One task the app sent (or scheduled): what the message would carry."""

    task: object
    args: tuple
    kwargs: dict
    options: dict
    task_id: str

    @property
    def name(self):
        return self.task.name

    def run(self):
        """Run it now, in-process, in its own request; return its result."""
        return self.task.apply(
            self.args, self.kwargs, task_id=self.task_id, throw=True
        ).result


class TaskCapture:
    """The tasks an app sent while ``pyramid_tasks.testing`` was included."""

    def __init__(self):
        self.sent = []

    def record(self, task, args, kwargs, options, task_id):
        self.sent.append(CapturedTask(task, args, kwargs, options, task_id))

    def pending(self, tm):
        """Tasks scheduled with ``tm=tm`` in its open transaction, not yet sent.

        Use this with a doomed test transaction that will never commit.
        """
        return [
            CapturedTask(s.task, s.args, s.kwargs, s.options, s.task_id)
            for s in pending_sends(tm)
        ]

    def run_sent(self):
        """Run the sent tasks in order, and those they send, until none is left.

        Returns their results.
        """
        results = []
        while self.sent:
            results.append(self.sent.pop(0).run())
        return results

    def clear(self):
        self.sent.clear()


def get_task_capture(registry):
    """The :class:`TaskCapture` of an app that included this module."""
    return registry.pyramid_tasks_capture


def includeme(config):
    """Capture, do not send, every task of this app (``apply_async``, ``delay``,
    on-commit sends and eager mode alike)."""
    config.include("pyramid_tasks")
    config.registry.pyramid_tasks_capture = TaskCapture()
