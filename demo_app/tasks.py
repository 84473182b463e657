"""The demo's background tasks."""

from datetime import UTC, datetime

from pyramid_tasks import RetryableTransactionTask, task

from .models import Order


@task(bind=True, base=RetryableTransactionTask)
def confirm_order(self, order_id):
    """Confirm an order; the link in the confirmation is a real URL.

    The body runs in its own transaction, retried on conflicts.
    """
    request = self.get_request()
    order = request.dbsession.get(Order, order_id)
    if order is None:
        return None
    order.status = "confirmed"
    order.confirmation_url = request.route_url("order", id=order.id)
    order.confirmed_at = datetime.now(UTC)
    return order.confirmation_url
