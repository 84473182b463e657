"""Acting on every job matching a filter, as a job of its own.

The dashboard's "everything matching this filter" never does the work in the
web request: it sends :data:`BULK_TASK`, which pages through the matching
jobs by keyset (newest first, as :meth:`.JobService.list` pages), acts on
each batch with :meth:`.JobService.retry`, ``cancel`` or ``delete``, logs a
line per batch and reports its progress on its own job row.
"""

import logging

import transaction

from .model import FINISHED, UNFINISHED
from .service import RETRYABLE, JobError, JobService

__all__ = [
    "ACTIONS",
    "BULK_TASK",
    "applicable",
    "bulk_job",
    "count_matching",
    "matching",
    "send",
]

log = logging.getLogger(__name__)

#: The name of the package's own bulk task.
BULK_TASK = "pyramid_tasks.jobs.bulk"

#: Per action, the states of the jobs it takes.
ACTIONS = {"retry": RETRYABLE, "cancel": UNFINISHED, "delete": FINISHED}

#: Jobs one batch takes (one list query, one action).  Small enough that a
#: batch's retry publishes well within ``tasks.jobs.relay_grace``.
BATCH = 200

_DONE = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}


def applicable(action, filters):
    """``filters`` (keyword arguments of :meth:`.JobService.list`) with its
    ``state`` narrowed to the states ``action`` takes; None when none is
    left (the filter names only other states)."""
    states = list(ACTIONS[action])
    asked = filters.get("state")
    if asked:
        asked = asked.split(",") if isinstance(asked, str) else list(asked)
        asked = [one.strip() for one in asked]
        states = [state for state in states if state in asked]
    if not states:
        return None
    return {**filters, "state": states}


def _following(found, limit):
    """Where the next page starts after ``found`` (a
    :meth:`.JobService.list_page` of ``limit``), as ``(created_at, id)`` (it
    holds when that job is deleted meanwhile), or None after the last: a
    search stopped short (its text and finished-time filters) goes on from
    the oldest job it searched."""
    if len(found["jobs"]) == limit:
        last = found["jobs"][-1]
        return last["created_at"], last["id"]
    if found["searched"] is None:
        return None
    return found["searched_at"], found["searched"]


def _taken(found, own_id=None):
    """The ids of ``found``'s jobs an action takes: never a bulk job (a
    bulk job run again would act on what matches its filters now), nor
    the running one."""
    return [
        job["id"]
        for job in found["jobs"]
        if job["name"] != BULK_TASK and job["id"] != own_id
    ]


def matching(service, action, filters, cap=None):
    """The jobs ``action`` would take, counted by keyset pages of ids
    (``cap + 1`` at most when ``cap`` is given).  Searched filters (title,
    error, finished times) are followed through the whole table, a window
    of :attr:`.JobService.search_depth` jobs a query."""
    return count_matching(service, action, filters, cap)[0]


def count_matching(service, action, filters, cap=None, reads=None):
    """``(count, complete)``: :func:`matching`'s count, read in ``reads``
    queries at most (None: no bound); ``complete`` is false when they
    stopped before the count was known (the count is then a lower bound:
    a rare text searched window after window would take the web request
    through the whole table)."""
    query = applicable(action, filters)
    if query is None:  # the filters name none of its states: checked all the same
        service.list_page(**filters, limit=1, fields=())
        return 0, True
    count, before, done = 0, None, 0
    while reads is None or done < reads:
        limit = service.max_limit
        if cap is not None:
            limit = min(limit, cap + 1 - count)
        found = service.list_page(**query, before=before, limit=limit, fields=("name",))
        done += 1
        count += len(_taken(found))
        before = _following(found, limit)
        if before is None or (cap is not None and count > cap):
            return count, True
    return count, False


def _act(service, action, ids):
    """``action`` on ``ids``: the jobs it changed.  A batch refused because
    one of its jobs changed meanwhile is done one job at a time, the
    refused ones left as they are."""
    perform = getattr(service, action)
    try:
        results = perform(ids)
    except JobError:
        results = []
        for job_id in ids:
            try:
                results += perform([job_id])
            except JobError as exc:
                log.info("Bulk %s: job %s left as it is: %s", action, job_id, exc)
    return sum(r["state"] != r["state_before"] for r in results)


def send(service, action, filters=None, ids=None, title=None):
    """Send the bulk job for ``action`` on the jobs matching ``filters`` (or
    on the jobs ``ids``), with its row like any job's: its id."""
    from .service import BROKER_TIMEOUT

    task = service.app.tasks[BULK_TASK]
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        job_id = task.apply_async(
            (action, filters or {}),
            {"ids": list(ids)} if ids is not None else {},
            tm=tm,
            title=title,
        ).id
    service.jobs.flush(BROKER_TIMEOUT)
    return job_id


def _batches_of_ids(self, ids):
    """``ids`` in batches of :data:`BATCH`, this job left out."""
    ids = [job_id for job_id in dict.fromkeys(ids) if job_id != self.request.id]
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH], start + BATCH >= len(ids)


def _batches_matching(self, service, query):
    """The jobs matching ``query`` in keyset pages of :data:`BATCH`, a
    search (text and finished-time filters) followed through every window."""
    before = None
    while query is not None:
        found = service.list_page(**query, before=before, limit=BATCH, fields=("name",))
        before = _following(found, BATCH)
        yield _taken(found, self.request.id), before is None
        if before is None:
            return


def bulk_job(self, action, filters, ids=None):
    """The package's bulk task: ``action`` (``retry``, ``cancel`` or
    ``delete``) on every job matching ``filters`` (keyword arguments of
    :meth:`.JobService.list`) in the states the action takes, in batches of
    :data:`BATCH`, newest first; or, given ``ids``, on those jobs (a
    failure group), in batches in their order.  A job created after this
    one started may be left out; this job itself is, and any bulk job.
    Cancelled (its page's **Cancel**), it stops after the batch it is in.
    ``{"action", "matching", "changed"}``.
    """
    if action not in ACTIONS:
        raise ValueError(f"bad action {action!r}: expected one of {', '.join(ACTIONS)}")
    service = JobService.from_registry(self.app.pyramid_registry)
    if ids is not None:
        total = len(set(ids) - {self.request.id})
        batches = _batches_of_ids(self, ids)
    else:
        total = matching(service, action, filters)
        batches = _batches_matching(self, service, applicable(action, filters))
    done = changed = 0
    for batch, last in batches:
        if batch:
            count = _act(service, action, batch)
            changed += count
            done += len(batch)
            log.info(
                "Bulk %s %s: %d of a batch of %d %s; %d of %d done.",
                action,
                self.request.id,
                count,
                len(batch),
                _DONE[action],
                done,
                total,
            )
            said = f"{done} of {total} jobs, {changed} {_DONE[action]}"
            self.set_progress(min(done, total), total, said)
        if not last and self.cancel_requested():  # an operator cancelled it
            log.info(
                "Bulk %s %s cancelled: %d of %d done.",
                action,
                self.request.id,
                done,
                total,
            )
            break
    self.set_progress(100, None, f"{done} of {total} jobs, {changed} {_DONE[action]}")
    return {"action": action, "matching": done, "changed": changed}
