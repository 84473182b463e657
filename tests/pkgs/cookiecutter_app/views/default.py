from pyramid.httpexceptions import HTTPNotFound
from pyramid.view import view_config

from ..models import Order
from ..tasks import send_receipt


@view_config(route_name="checkout", request_method="POST", renderer="json")
def checkout(request):
    order = Order(email=request.params.get("email"))
    request.dbsession.add(order)
    request.dbsession.flush()
    result = send_receipt.apply_async((order.id,), tm=request.tm)
    return {"order": order.id, "receipt_task": result.id}


@view_config(
    route_name="order",
    renderer="tests.pkgs.cookiecutter_app:templates/order.jinja2",
)
def order(request):
    order = request.dbsession.get(Order, int(request.matchdict["id"]))
    if order is None:
        raise HTTPNotFound()
    return {"order": order}
