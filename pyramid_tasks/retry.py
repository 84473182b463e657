"""The one retry loop: classify the error, back off, count attempts."""

import logging
import random
import time
from dataclasses import dataclass

from transaction.interfaces import TransientError

__all__ = ["RetryAttemptsExhausted", "RetryPolicy", "in_transaction", "run_attempts"]

log = logging.getLogger(__name__)

# SQLSTATE 40003, "statement completion unknown": the COMMIT may have landed,
# so running the body again could apply it twice.
_OUTCOME_UNKNOWN = "40003"


class RetryAttemptsExhausted(Exception):
    """Every attempt failed with a retryable error; chained from the last one."""

    def __init__(self, name, attempts):
        super().__init__(f"{name} failed {attempts} times with retryable errors")
        self.name = name
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    """``tasks.retry.*``: attempts, and exponential backoff with full jitter."""

    attempts: int = 3
    backoff: float = 0.1
    backoff_max: float = 2.0

    def delay(self, failed_attempts):
        """Seconds to sleep after ``failed_attempts`` (1, 2, ...) failures."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** (failed_attempts - 1))
        return random.uniform(0, ceiling)


class _Retry(Exception):
    """Internal: the attempt failed with a retryable ``error``."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


def is_retryable(tm, error):
    """Would ``tm``'s current transaction succeed if run again?

    ``transaction``'s own test (``TransientError`` or a joined data manager's
    ``should_retry``: zope.sqlalchemy's class-40 SQLSTATEs), minus 40003.
    It must run before the abort, which forgets the data managers.
    """
    if _outcome_unknown(error):
        return False
    if isinstance(error, TransientError):
        return True
    return bool(getattr(tm, "manager", tm)._retryable(type(error), error))


def _outcome_unknown(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if code == _OUTCOME_UNKNOWN:
            return True
        error = getattr(error, "orig", None) or error.__cause__
    return False


def in_transaction(tm, body, retry=False):
    """Run ``body()`` in a new transaction of ``tm`` and commit it.

    On any error the transaction is aborted (a failed commit included: leaving
    ``with tm:`` through it would not abort).  With ``retry``, a retryable
    error is raised as :class:`_Retry` for :func:`run_attempts`.  A body that
    dooms the transaction gets an abort, not an error.
    """
    tm.begin()
    try:
        result = body()
        if tm.isDoomed():
            tm.abort()
        else:
            tm.commit()
    except BaseException as error:
        retryable = retry and isinstance(error, Exception) and is_retryable(tm, error)
        tm.abort()
        if retryable:
            raise _Retry(error) from error
        raise
    return result


def run_attempts(policy, attempt, name):
    """``attempt(number)`` until it returns, at most ``policy.attempts`` times.

    ``attempt`` raises :class:`_Retry` (from :func:`in_transaction`) to ask
    for another go; exhaustion raises :class:`RetryAttemptsExhausted`.
    """
    number = 1
    while True:
        try:
            return attempt(number)
        except _Retry as retry:
            if number >= policy.attempts:
                raise RetryAttemptsExhausted(name, number) from retry.error
            delay = policy.delay(number)
            log.warning(
                "%s: attempt %d of %d hit a retryable error, retrying in %.3fs: %s",
                name,
                number,
                policy.attempts,
                delay,
                retry.error,
            )
            time.sleep(delay)
            number += 1
