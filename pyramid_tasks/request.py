"""Build and close the Pyramid request a task execution works with."""

import io
import logging

import transaction
from pyramid.interfaces import IRequestExtensions, IRequestFactory
from pyramid.request import Request, apply_request_extensions
from pyramid.threadlocal import manager as threadlocal_manager
from transaction.interfaces import NoTransaction

__all__ = ["close_request", "make_request"]

log = logging.getLogger(__name__)


def make_request(registry, site_url, tm=None):
    """A request from ``registry`` as a view would get one, and push it.

    The app's request factory and request extensions (``request.dbsession``)
    are honoured, ``site_url`` gives scheme, host, port and script name, and
    ``request.tm`` is ``tm`` or else a new explicit
    :class:`transaction.TransactionManager`.  The registry and request are
    pushed on Pyramid's threadlocal stack until :func:`close_request`.
    """
    factory = registry.queryUtility(IRequestFactory, default=Request)
    extensions = registry.queryUtility(IRequestExtensions)
    if isinstance(factory, type):
        request = _from_prototype(registry, factory, extensions, site_url)
    else:  # a factory object: Pyramid's own, slower way
        request = factory.blank("/", base_url=site_url)
        request.registry = registry
        apply_request_extensions(request, extensions=extensions)
    # Set after the extensions: pyramid_tm's ``tm`` is reified, so the
    # instance attribute wins over the thread-local default manager.
    request.tm = transaction.TransactionManager(explicit=True) if tm is None else tm
    threadlocal_manager.push({"registry": registry, "request": request})
    return request


def _from_prototype(registry, factory, extensions, site_url):
    # Pyramid's apply_request_extensions makes a new class for every request
    # (most of a request's cost); a task's requests all have the same shape,
    # so the class with the app's request properties and the environ of
    # ``factory.blank("/", base_url=site_url)`` are made once per shape.
    descriptors = tuple(extensions.descriptors.items()) if extensions else ()
    key = (factory, site_url, descriptors)
    cache = registry.__dict__.setdefault("_pyramid_tasks_prototypes", {})
    prototype = cache.get(key)
    if prototype is None:
        cls = type(factory.__name__, (factory,), dict(descriptors))
        prototype = cache[key] = (cls, factory.blank("/", base_url=site_url).environ)
    cls, environ = prototype
    request = cls({**environ, "wsgi.input": io.BytesIO()})
    request.registry = registry
    for name, method in extensions.methods.items() if extensions else ():
        setattr(request, name, method.__get__(request, cls))
    return request


def close_request(request, task_name, owns_tm=True):
    """End ``request``: abort a transaction left open, run finished callbacks, pop.

    A transaction of a ``tm`` the request does not own (``owns_tm=False``: a
    test's, lent to the task) is left as it is.  Safe to call when the body
    raised; the threadlocals are popped whatever the callbacks do.
    """
    try:
        if owns_tm:
            _abort_left_open(request.tm, task_name)
        request._process_finished_callbacks()
    finally:
        threadlocal_manager.pop()


def _abort_left_open(tm, task_name):
    try:
        tm.get()
    except NoTransaction:
        return
    log.warning(
        "Task %s left a transaction open in request.tm; it was aborted.", task_name
    )
    tm.abort()
