"""Failures grouped by signature: the task, the exception's class and its
message with numbers and ids replaced (``order 1234 of 5f1c…`` and ``order
99 of 0b3e…`` are one group).

The groups are made from the newest :data:`SCAN` failed jobs, read as the
list reads them (the ``(state, created_at)`` index, 1,000 rows a query,
never the arguments or tracebacks): an older failure outside them is not
counted, and the page says when that can be.
"""

import hashlib
import re

from ..jobs.model import FAILED

__all__ = ["SCAN", "failure_groups", "signature"]

#: The newest failed jobs grouped.
SCAN = 5000

_UUID = re.compile(
    r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I
)
# Long hexadecimal ids (object ids, hashes) with at least one digit.
_HEX = re.compile(r"\b(?=[0-9a-f]*[0-9])[0-9a-f]{8,}\b", re.I)
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_CLASS = re.compile(r"[A-Za-z_][\w.]*")


def signature(name, error):
    """``(task name, exception class, normalised message)`` of a failure
    whose error is ``error`` (``"ValueError: ..."``, its first line)."""
    line = (error or "").strip().split("\n", 1)[0]
    exception, _, message = line.partition(": ")
    if not _CLASS.fullmatch(exception):
        exception, message = "", line  # no class named: all of it is message
    message = _UUID.sub("<id>", message)
    message = _HEX.sub("<id>", message)
    message = _NUMBER.sub("<n>", message)
    return name, exception, message


def _key(sig):
    return hashlib.sha1("\0".join(sig).encode()).hexdigest()[:12]


def failure_groups(service, scan=None):
    """``(groups, complete)``: the groups of the newest ``scan`` failed
    jobs, the largest first (then the most recent), each ``{"key", "name",
    "exception", "message", "count", "first", "last", "ids"}`` (``first``
    and ``last``: the ISO times the oldest and newest of them failed);
    ``complete``: whether every failed job was among them.  ``scan``:
    :data:`SCAN` when None."""
    scan = SCAN if scan is None else scan
    groups = {}
    seen, before = 0, None
    while True:
        limit = min(service.max_limit, scan - seen)
        jobs = service.list(
            state=FAILED,
            before=before,
            limit=limit,
            fields=("name", "error", "finished_at"),
        )
        for job in jobs:
            _add(groups, job)
        seen += len(jobs)
        if len(jobs) < limit:
            return _ordered(groups), True
        before = jobs[-1]["id"]
        if seen >= scan:  # as many as the scan takes: is any older one left?
            older = service.list(state=FAILED, before=before, limit=1, fields=())
            return _ordered(groups), not older


def _add(groups, job):
    sig = signature(job["name"], job["error"])
    key = _key(sig)
    when = job["finished_at"] or job["created_at"]
    group = groups.get(key)
    if group is None:
        group = groups[key] = {
            "key": key,
            "name": sig[0],
            "exception": sig[1],
            "message": sig[2],
            "count": 0,
            "first": when,
            "last": when,
            "ids": [],
        }
    group["count"] += 1
    group["ids"].append(job["id"])
    group["first"] = min(group["first"], when)
    group["last"] = max(group["last"], when)


def _ordered(groups):
    """The largest first; of equal ones, the most recent."""
    return sorted(groups.values(), key=lambda g: (g["count"], g["last"]), reverse=True)
