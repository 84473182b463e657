from pyramid_tasks import (
    PyramidTask,
    RetryableTransactionTask,
    TransactionalTask,
    retryable,
    task,
)

from .models import Order


@task(bind=True, base=RetryableTransactionTask)
def send_receipt(self, order_id):
    """Send the receipt (here: record its link) and have the order packed."""
    request = self.get_request()
    order = request.dbsession.get(Order, order_id)
    if order is None:  # not (or not yet) visible to this transaction
        return None
    order.receipt_url = request.route_url("order", id=order.id)
    pack_order.apply_async((order.id,), tm=request.tm)
    return order.receipt_url


@task(bind=True, base=TransactionalTask)
def pack_order(self, order_id):
    request = self.get_request()
    request.dbsession.get(Order, order_id).packed = True


@task(bind=True, base=PyramidTask)
def count_receipts(self):
    """Short transactions of its own: ``retryable`` on ``request.tm``."""
    request = self.get_request()

    @retryable(tm=request.tm)
    def count():
        query = request.dbsession.query(Order)
        return query.filter(Order.receipt_url.is_not(None)).count()

    return count()
