"""The demo's background tasks: one of each kind pyramid_tasks offers."""

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from pyramid_tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    retryable,
    task,
)

from .models import Order, Report


@task(bind=True, base=RetryableTransactionTask)
def confirm_order(self, order_id):
    """Confirm an order, with a real link to it (``tasks.site_url``).

    Scheduled by the order view on commit; the body runs in its own
    transaction, retried on conflicts.
    """
    request = self.get_request()
    order = request.dbsession.get(Order, order_id)
    if order is None or order.status != "new":
        return None
    order.status = "confirmed"
    order.confirmation_url = request.route_url("order", id=order.id)
    order.confirmed_at = datetime.now(UTC)
    return order.confirmation_url


@task(bind=True, base=RetryableTransactionTask)
def expire_stale_orders(self, older_than=60):
    """Beat's job (``tasks.beat.expire.*`` in the INI): expire old new orders."""
    request = self.get_request()
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
    result = request.dbsession.execute(
        update(Order)
        .where(Order.status == "new", Order.created_at < cutoff)
        .values(status="expired")
    )
    return result.rowcount


# The parts build_report works in; set_progress writes at most two a second.
REPORT_STEPS = 10


@task(bind=True, base=ScheduleOnCommitTask)
def build_report(self, report_id):
    """A slow task in short transactions: mark it running, work, record it.

    Not a transactional task: no transaction is held while it works, and
    its progress (``self.set_progress``, a short transaction of its own) is
    visible while it runs.
    """
    request = self.get_request()
    seconds = float(request.registry.settings.get("demo.report_seconds", 2))
    started = time.monotonic()

    @retryable(tm=request.tm)
    def start():
        report = request.dbsession.get(Report, report_id)
        report.state = "running"
        report.started_at = datetime.now(UTC)

    @retryable(tm=request.tm)
    def finish(counts):
        report = request.dbsession.get(Report, report_id)
        report.orders = sum(counts.values())
        report.confirmed = counts.get("confirmed", 0)
        report.expired = counts.get("expired", 0)
        report.state = "done"
        report.finished_at = datetime.now(UTC)
        report.seconds = round(time.monotonic() - started, 2)

    @retryable(tm=request.tm)
    def count_orders():
        rows = request.dbsession.execute(
            select(Order.status, func.count()).group_by(Order.status)
        )
        return dict(rows.all())

    start()
    # The slow part, in steps: no transaction is held meanwhile.  Each step
    # shows in the job's row (durable mode): the page draws the bar from it.
    for step in range(REPORT_STEPS):
        self.set_progress(
            step, REPORT_STEPS, f"working on part {step + 1} of {REPORT_STEPS}"
        )
        time.sleep(seconds / REPORT_STEPS)
    finish(count_orders())
    return report_id


# -- a workflow: three steps, one job, one workspace (durable mode) ----------


@task(bind=True, base=RetryableTransactionTask)
def pick_orders(self):
    """Step 1 of "Ship confirmed orders": the confirmed orders' ids, into
    the workflow's workspace (saved with this step's transaction)."""
    request = self.get_request()
    query = select(Order.id).where(Order.status == "confirmed").order_by(Order.id)
    self.workspace["orders"] = list(request.dbsession.scalars(query.limit(100)))


@task(bind=True, base=RetryableTransactionTask)
def pack_orders(self):
    """Step 2: pack what step 1 picked (here: count it)."""
    self.workspace["packed"] = len(self.workspace["orders"])


@task(bind=True, base=RetryableTransactionTask)
def ship_orders(self):
    """Step 3: mark the picked orders shipped, in this step's transaction."""
    request = self.get_request()
    ids = self.workspace["orders"]
    result = request.dbsession.execute(
        update(Order)
        .where(Order.id.in_(ids), Order.status == "confirmed")
        .values(status="shipped")
    )
    self.workspace["shipped"] = result.rowcount
