"""The Pyramid event of an operator's action on jobs."""

__all__ = ["JobsActedOn"]


class JobsActedOn:
    """An operator acted on jobs from the dashboard, once the action is done.

    ``event.request`` is the request; ``event.userid`` the operator (the
    security policy's ``authenticated_userid``, None when anonymous);
    ``event.action`` what was done (``"retry"``, ``"cancel"``, ``"delete"``,
    ``"clear"``, ``"run"``: a periodic task sent now);
    ``event.job_ids`` the jobs (none for ``clear``: ``event.queues`` names
    the queues); ``event.results`` the service's answer: for ``retry`` and
    ``cancel`` one dict per job (``id``, ``state_before``, ``state``), for
    ``clear`` ``{"queues": {queue: cancelled}, "purged": {queue:
    messages}}``.  Subscribe with
    ``config.add_subscriber(handler, JobsActedOn)``.
    """

    def __init__(self, request, action, job_ids, results, queues=None):
        self.request = request
        self.userid = request.authenticated_userid
        self.action = action
        self.job_ids = list(job_ids)
        self.results = results
        self.queues = list(queues or ())
