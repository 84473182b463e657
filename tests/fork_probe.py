"""Run by ``test_publish_faults``: publish on AMQP, fork (as a pre-loading
web server does), ``app.close()`` in the child, publish again in the parent.

Prints whether the parent kept its connection.  A process of its own, so
the child may exit as a process does.
"""

import os
import sys

import transaction

from pyramid_tasks.producers import _pool

from .test_schedule_on_commit import make_app


def transport_connection(app):
    with _pool(app).acquire(block=True) as producer:
        return producer.connection.connection


def main(url, queue):
    app = make_app(url, queue)
    echo = app.tasks["t.echo"]
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        echo.apply_async((1,), tm=tm)
    before = transport_connection(app)
    pid = os.fork()
    # The child closes the app and exits (app.close() is None: status 0).  One
    # line: the child goes on in frames coverage cannot trace after a fork.
    pid or sys.exit(app.close())
    os.waitpid(pid, 0)
    with tm:
        echo.apply_async((2,), tm=tm)
    kept = transport_connection(app) is before
    app.close()
    print("kept" if kept else "reconnected")


main(*sys.argv[1:])  # run with python -m tests.fork_probe URL QUEUE
