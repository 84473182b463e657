"""Durable mode's relay in beat: one in a standalone beat, none in the beat a
worker embeds (``worker --beat``: the worker's own relay serves, so SQLite,
which has no SKIP LOCKED, sees one relay a worker)."""

import pytest
from celery import signals
from celery.beat import Service

from demo_app import main
from pyramid_tasks.jobs.relay import RelayStep, install


@pytest.fixture
def celery_app(tmp_path):
    app = main(
        {},
        **{
            "sqlalchemy.url": f"sqlite:///{tmp_path}/demo.sqlite",
            "pyramid.includes": "pyramid_tasks.jobs",
            "demo.create_tables": "true",
            "celery.broker_url": "memory://",
            "tasks.jobs.relay_interval": "10s",  # no round while the test runs
        },
    )
    celery_app = app.registry.celery_app
    install(celery_app)
    yield celery_app
    relay = getattr(celery_app, "pyramid_beat_relay", None)
    if relay is not None:
        relay.stop()


class _Worker:
    def __init__(self, app):
        self.app = app


def test_a_standalone_beat_runs_a_relay(celery_app, tmp_path):
    beat = Service(celery_app, schedule_filename=str(tmp_path / "schedule"))
    signals.beat_init.send(sender=beat)
    relay = celery_app.pyramid_beat_relay
    assert relay.thread.is_alive()
    relay.stop()
    assert not relay.thread.is_alive()


def test_the_beat_a_worker_embeds_runs_none(celery_app, tmp_path):
    RelayStep(_Worker(celery_app))  # the worker's step, made before beat forks
    beat = Service(celery_app, schedule_filename=str(tmp_path / "schedule"))
    signals.beat_init.send(sender=beat)
    assert getattr(celery_app, "pyramid_beat_relay", None) is None
