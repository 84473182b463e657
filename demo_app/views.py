"""The demo's pages: place orders, ask for reports, watch the tasks work."""

from pyramid.httpexceptions import HTTPFound, HTTPNotFound
from pyramid.view import view_config

from .models import Order, Report
from .tasks import build_report, confirm_order


@view_config(route_name="home", request_method="GET", renderer="templates/home.jinja2")
def home(request):
    dbsession = request.dbsession
    return {
        "orders": dbsession.query(Order).order_by(Order.id.desc()).limit(20).all(),
        "reports": dbsession.query(Report).order_by(Report.id.desc()).limit(5).all(),
        "eager": request.celery_app.conf.task_always_eager,
    }


@view_config(route_name="orders", request_method="POST")
def place_order(request):
    order = Order(email=request.POST.get("email") or "anonymous@example.com")
    request.dbsession.add(order)
    request.dbsession.flush()
    # Sent when this request's transaction commits, so the worker finds the
    # order; if the request fails, no confirmation goes out.
    confirm_order.apply_async((order.id,), tm=request.tm)
    if request.POST.get("fail"):
        raise RuntimeError("the order page failed after scheduling: nothing is sent")
    return HTTPFound(request.route_url("home"))


@view_config(route_name="reports", request_method="POST")
def request_report(request):
    report = Report()
    request.dbsession.add(report)
    request.dbsession.flush()
    build_report.apply_async((report.id,), tm=request.tm)
    return HTTPFound(request.route_url("home"))


@view_config(route_name="order", renderer="json")
def show_order(request):
    order = request.dbsession.get(Order, int(request.matchdict["id"]))
    if order is None:
        raise HTTPNotFound()
    return {"id": order.id, "status": order.status, "url": order.confirmation_url}


@view_config(context=RuntimeError, renderer="templates/failed.jinja2")
def failed(exc, request):
    """The "fail the request" button: pyramid_tm aborts, nothing is sent."""
    request.response.status = 500
    return {"error": str(exc)}
