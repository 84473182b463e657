from pyramid.httpexceptions import HTTPBadRequest, HTTPNotFound
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


@view_config(route_name="orders", request_method="POST", renderer="json")
def place_order(request):
    """A form view: the email comes from the POSTed form, and is required."""
    email = request.POST.get("email", "")
    if "@" not in email:
        raise HTTPBadRequest("an email address is needed")
    order = Order(email=email)
    request.dbsession.add(order)
    request.dbsession.flush()
    send_receipt.apply_async((order.id,), tm=request.tm)
    return {"order": order.id}


@view_config(
    route_name="order",
    renderer="tests.pkgs.cookiecutter_app:templates/order.jinja2",
)
def order(request):
    order = request.dbsession.get(Order, int(request.matchdict["id"]))
    if order is None:
        raise HTTPNotFound()
    return {"order": order}
