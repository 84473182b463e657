"""The Pyramid event of an operator's action on jobs."""

__all__ = ["JobsActedOn"]


class JobsActedOn:
    """An operator acted on jobs from the dashboard, once the action is done.

    ``event.request`` is the request; ``event.userid`` the operator (the
    security policy's ``authenticated_userid``, None when anonymous);
    ``event.action`` what was done (``"retry"``, ``"cancel"``, ``"delete"``,
    ``"clear"``, ``"run"``: a periodic task or scheduled jobs sent now,
    ``"pause"``, ``"resume"``: a queue's consumption, ``"bulk"``: a bulk job
    sent for everything matching the list's filters);
    ``event.job_ids`` the jobs (none for ``clear``, ``pause`` and
    ``resume``: ``event.queues`` names the queue; the bulk job for
    ``bulk``); ``event.results`` the service's answer: for ``retry``,
    ``cancel`` and ``run`` one dict per job (``id``, ``state_before``,
    ``state``; a periodic task's ``{"id", "periodic"}``), for ``clear``
    ``{"queues": {queue: cancelled}, "purged": {queue: messages}}``, for
    ``pause`` and ``resume`` ``{"queue", "workers"}`` (those that answered),
    for ``bulk`` ``{"action", "filters", "matching"}`` (counted up to
    1,001).  Subscribe with ``config.add_subscriber(handler, JobsActedOn)``.
    """

    def __init__(self, request, action, job_ids, results, queues=None):
        self.request = request
        self.userid = request.authenticated_userid
        self.action = action
        self.job_ids = list(job_ids)
        self.results = results
        self.queues = list(queues or ())
