"""The tasks the docs' examples schedule, route and put on the beat schedule."""

from pyramid_tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    task,
)


@task(bind=True, base=RetryableTransactionTask)
def send_receipt(self, order_id):
    """Send the order's receipt."""


@task(bind=True, base=TransactionalTask)
def import_rows(self, upload_id):
    """Import an upload's rows."""


@task(base=ScheduleOnCommitTask)
def report(site_id):
    """Build a site's monthly report."""


@task
def cleanup(days=7):
    """Delete what is older than ``days``."""


@task
def nightly():
    """The nightly batch."""


@task
def heartbeat():
    """Say the site is alive."""


@task(bind=True, base=RetryableTransactionTask)
def fetch(self, upload_id):
    """A workflow's first step: fetch an upload."""


@task(bind=True, base=RetryableTransactionTask)
def parse(self):
    """Its second: parse what was fetched."""


@task(bind=True, base=RetryableTransactionTask)
def store(self):
    """Its third: store what was parsed."""
