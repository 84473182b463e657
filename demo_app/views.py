"""The demo's pages: place orders, ask for reports, watch the tasks work."""

from pyramid.httpexceptions import HTTPFound, HTTPNotFound
from pyramid.interfaces import IRoutesMapper
from pyramid.renderers import render_to_response
from pyramid.view import view_config

from pyramid_tasks.jobs import UNFINISHED, Job, workflow
from pyramid_tasks.jobs.workflow import WORKFLOW_TASK

from .models import Order, Report
from .tasks import build_report, confirm_order, pack_orders, pick_orders, ship_orders


@view_config(route_name="home", request_method="GET", renderer="templates/home.jinja2")
def home(request):
    dbsession = request.dbsession
    # Each with the row of its task's job (None until the request that sent
    # it commits, and for rows made before the demo recorded jobs).
    orders = (
        dbsession.query(Order, Job)
        .outerjoin(Job, Job.id == Order.job_id)
        .order_by(Order.id.desc())
        .limit(20)
        .all()
    )
    reports = (
        dbsession.query(Report, Job)
        .outerjoin(Job, Job.id == Report.job_id)
        .order_by(Report.id.desc())
        .limit(5)
        .all()
    )
    # The workflows: one job each, its steps its children.
    shipments = (
        dbsession.query(Job)
        .filter(Job.name == WORKFLOW_TASK)
        .order_by(Job.created_at.desc())
        .limit(5)
        .all()
    )
    jobs = [job for _, job in orders + reports if job is not None] + shipments
    return {
        "orders": orders,
        "reports": reports,
        "shipments": shipments,
        # The page refreshes only while a task has work to show: an email
        # being typed is not wiped out by an idle page.
        "busy": any(order.status == "new" for order, _ in orders)
        or any(report.state != "done" for report, _ in reports)
        or any(job.state in UNFINISHED for job in jobs),
        "eager": request.celery_app.conf.task_always_eager,
        "dashboard": _dashboard_url(request),
        "email": "ann@example.com",
        "error": None,
    }


def _dashboard_url(request):
    """The jobs dashboard's URL when the app includes it, else None."""
    mapper = request.registry.getUtility(IRoutesMapper)
    if mapper.get_route("pyramid_tasks.dashboard.overview") is None:
        return None
    return request.route_url("pyramid_tasks.dashboard.overview")


def _email_error(email):
    """Why ``email`` cannot be an order's address, or None if it can."""
    if not email:
        return "Enter an email address: the order needs one."
    if "@" not in email:
        return f"{email!r} is not an email address (it has no @)."
    return None


@view_config(route_name="orders", request_method="POST")
def place_order(request):
    email = request.POST.get("email", "").strip()
    error = _email_error(email)
    if error:
        # The form again, with the message and what was typed: nothing saved.
        values = {**home(request), "email": email, "error": error}
        response = render_to_response("templates/home.jinja2", values, request)
        response.status = 400
        return response
    order = Order(email=email)
    request.dbsession.add(order)
    request.dbsession.flush()
    # Sent when this request's transaction commits, so the worker finds the
    # order; if the request fails, no confirmation goes out.
    # The AsyncResult's id is the job's: the page finds its row by it.
    order.job_id = confirm_order.apply_async((order.id,), tm=request.tm).id
    if request.POST.get("fail"):
        raise RuntimeError("the order page failed after scheduling: nothing is sent")
    return HTTPFound(request.route_url("home"))


@view_config(route_name="reports", request_method="POST")
def request_report(request):
    report = Report()
    request.dbsession.add(report)
    request.dbsession.flush()
    report.job_id = build_report.apply_async((report.id,), tm=request.tm).id
    return HTTPFound(request.route_url("home"))


@view_config(route_name="shipments", request_method="POST")
def ship_confirmed_orders(request):
    # One job of three steps, sharing a workspace; the first step is sent
    # when this request commits, each next one when the one before succeeds.
    workflow(
        pick_orders.si(),
        pack_orders.si(),
        ship_orders.si(),
        title="Ship confirmed orders",
        workspace={"requested_by": "the demo page"},
    ).apply_async(tm=request.tm)
    return HTTPFound(request.route_url("home"))


@view_config(route_name="order", renderer="json")
def show_order(request):
    # The route admits ASCII digits only (routes.py): int() cannot fail.
    order = request.dbsession.get(Order, int(request.matchdict["id"]))
    if order is None:
        raise HTTPNotFound()
    return {"id": order.id, "status": order.status, "url": order.confirmation_url}


@view_config(context=RuntimeError, renderer="templates/failed.jinja2")
def failed(exc, request):
    """The "fail the request" button: pyramid_tm aborts, nothing is sent."""
    request.response.status = 500
    return {"error": str(exc)}
