"""The demo's pages."""

from html import escape

from pyramid.httpexceptions import HTTPFound, HTTPNotFound
from pyramid.response import Response
from pyramid.view import view_config

from .models import Order
from .tasks import confirm_order

PAGE = """<!doctype html><title>pyramid_tasks demo</title>
<h1>Orders</h1>
<form method="post"><input name="email" value="ann@example.com">
<button>Place order</button></form>
<table><tr><th>#</th><th>email</th><th>status</th><th>confirmation</th></tr>{rows}</table>
"""
ROW = "<tr><td>{id}</td><td>{email}</td><td>{status}</td><td>{url}</td></tr>"


@view_config(route_name="home", request_method="GET")
def home(request):
    orders = request.dbsession.query(Order).order_by(Order.id.desc()).limit(50)
    rows = "".join(
        ROW.format(
            id=o.id,
            email=escape(o.email),
            status=escape(o.status),
            url=escape(o.confirmation_url or ""),
        )
        for o in orders
    )
    return Response(PAGE.format(rows=rows))


@view_config(route_name="home", request_method="POST")
def place_order(request):
    order = Order(email=request.POST.get("email") or "anonymous@example.com")
    request.dbsession.add(order)
    request.dbsession.flush()
    # Sent when this request's transaction commits, so the worker finds the
    # order; if the request fails, no confirmation goes out.
    confirm_order.apply_async((order.id,), tm=request.tm)
    return HTTPFound(request.route_url("home"))


@view_config(route_name="order", renderer="json")
def show_order(request):
    order = request.dbsession.get(Order, int(request.matchdict["id"]))
    if order is None:
        raise HTTPNotFound()
    return {"id": order.id, "status": order.status, "url": order.confirmation_url}
