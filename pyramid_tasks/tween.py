"""Web side: eager task failures reach the response in development."""

from .publish import forget_eager_errors, raise_eager_errors

__all__ = ["eager_errors_tween_factory"]


def eager_errors_tween_factory(handler, registry):
    """In eager mode with ``task_eager_propagates``, fail the response.

    Sits above pyramid_tm: after the request's commit ran its eager tasks,
    the first failure is raised here as :class:`~pyramid_tasks.EagerTaskFailed`
    (never retried by pyramid_retry), so development servers answer 500 with
    the task's traceback.  Elsewhere it is not in the chain at all.
    """
    conf = registry.celery_app.conf
    if not (conf.task_always_eager and conf.task_eager_propagates):
        return handler

    def eager_errors_tween(request):
        tm = getattr(request, "tm", None)  # None without pyramid_tm
        if tm is None:
            return handler(request)
        forget_eager_errors(tm)
        response = handler(request)
        raise_eager_errors(tm)
        return response

    return eager_errors_tween
