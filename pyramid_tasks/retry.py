"""The one retry loop: classify the error, back off, count attempts."""

import functools
import logging
import math
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from pyramid.threadlocal import get_current_registry
from transaction.interfaces import AlreadyInTransaction, TransientError

from .datamanager import current_transaction
from .publish import forget_eager_errors, raise_eager_errors

__all__ = [
    "RetryAttemptsExhausted",
    "RetryPolicy",
    "in_transaction",
    "lent_transaction",
    "retryable",
    "run_attempts",
]

log = logging.getLogger(__name__)

# SQLSTATE 40003, "statement completion unknown": the COMMIT may have landed,
# so running the body again could apply it twice.
_OUTCOME_UNKNOWN = "40003"


class RetryAttemptsExhausted(Exception):
    """Every attempt failed with a retryable error; chained from the last one."""

    def __init__(self, name, attempts):
        super().__init__(name, attempts)  # args rebuild it (pickle, result backends)
        self.name = name
        self.attempts = attempts

    def __str__(self):
        return f"{self.name} failed {self.attempts} times with retryable errors"


@dataclass(frozen=True)
class RetryPolicy:
    """``tasks.retry.*``: attempts, and exponential backoff with full jitter."""

    attempts: int = 20  # the defaults of TasksSettings
    backoff: float = 0.1
    backoff_max: float = 2.0

    @classmethod
    def from_settings(cls, settings):
        """The policy of an app's parsed ``tasks.*`` settings."""
        return cls(
            settings.retry_attempts, settings.retry_backoff, settings.retry_backoff_max
        )

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
    return bool(tm.get().isRetryableError(error))


def _outcome_unknown(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if code == _OUTCOME_UNKNOWN:
            return True
        error = getattr(error, "orig", None) or error.__cause__
    return False


# The manager whose open transaction this thread has lent to a task run
# (pyramid_tasks.testing runs a captured task inside the test's transaction).
_lent = threading.local()


@contextmanager
def lent_transaction(tm):
    """Lend ``tm``'s open transaction to the code run in this block.

    Meanwhile :func:`in_transaction` and :func:`retryable` given ``tm`` run
    their body inside that transaction: no begin, commit, abort or retry, as
    the transaction belongs to the lender, who ends it.
    """
    previous = getattr(_lent, "tm", None)
    _lent.tm = tm
    try:
        yield
    finally:
        _lent.tm = previous


def _is_lent(tm):
    # None is what a thread that lent nothing holds: it is never a lent manager.
    lent = getattr(_lent, "tm", None)
    return lent is not None and lent is tm


def in_transaction(tm, body, retry=False):
    """Run ``body()`` in a new transaction of ``tm`` and commit it.

    On any error the transaction is aborted (a failed commit included: leaving
    ``with tm:`` through it would not abort).  With ``retry``, a retryable
    error is raised as :class:`_Retry` for :func:`run_attempts`.  A body that
    dooms the transaction gets an abort, not an error.  In a transaction
    lent by :func:`lent_transaction`, ``body()`` is only called.
    """
    if _is_lent(tm):
        return body()
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


def _policy_for(tm):
    # The app whose registry is current: a task execution pushes its own (as
    # do pshell and bootstrap scripts); anywhere else, the defaults.
    registry = get_current_registry()
    return getattr(registry, "pyramid_tasks_retry_policy", None) or RetryPolicy()


def _checked(name, value, kind, minimum):
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum:
        expected = "an integer" if kind is int else "a number of seconds"
        raise ValueError(
            f"retryable({name}={value!r}): expected {expected} >= {minimum}"
        )
    return value


def _check_manager(tm):
    # Refused here, at the decorator: a body run "in a transaction" of None
    # would run in none at all.
    if not all(callable(getattr(tm, name, None)) for name in ("begin", "commit")):
        hint = " (was @retryable written without its call?)" if callable(tm) else ""
        raise TypeError(
            f"retryable(tm={tm!r}): expected a transaction manager, such as "
            f"request.tm, to run each call in a transaction of its own{hint}: "
            "write @retryable(tm=request.tm)."
        )


def retryable(tm, *, attempts=None, backoff=None, backoff_max=None):
    """Run each call of the decorated function in its own retried transaction.

    Each call begins a transaction in ``tm``, runs the function, commits and
    returns its value.  A retryable error (40001, 40P01, ``TransientError``;
    never 40003) in the body or at commit aborts and runs that call again,
    with the policy's backoff and jitter; exhaustion raises
    :class:`RetryAttemptsExhausted`; other errors propagate at once.  Calls
    that committed stay committed.

    The policy is the app's ``tasks.retry.*`` for a ``tm`` from
    ``self.get_request()`` (or when the app's registry is current, as in
    pshell); ``attempts``, ``backoff`` and ``backoff_max`` override it.
    ``tm`` must be a transaction manager: ``None`` (or ``@retryable`` written
    without its call) is a :class:`TypeError` here, at the decorator.
    Calling it while ``tm`` has an active transaction raises
    :class:`transaction.interfaces.AlreadyInTransaction`: it never nests.
    (A captured task run inside a test's transaction by
    :mod:`pyramid_tasks.testing` is the exception: each call then runs in
    that transaction, once.)

    .. code-block:: python

        @retryable(tm=request.tm)
        def rebuild_one(asset_id):
            rebuild(request, request.dbsession.get(Asset, asset_id))
    """
    _check_manager(tm)
    base = _policy_for(tm)
    policy = RetryPolicy(
        base.attempts if attempts is None else _checked("attempts", attempts, int, 1),
        base.backoff
        if backoff is None
        else _checked("backoff", backoff, float | int, 0),
        base.backoff_max
        if backoff_max is None
        else _checked("backoff_max", backoff_max, float | int, 0),
    )

    def decorate(func):
        name = getattr(func, "__qualname__", repr(func))

        @functools.wraps(func)
        def call(*args, **kwargs):
            if _is_lent(tm):
                return func(*args, **kwargs)
            if current_transaction(tm) is not None:
                raise AlreadyInTransaction(
                    f"retryable {name}() was called while its transaction manager "
                    "already has a transaction open: each call runs in a "
                    "transaction of its own, so call it outside `with tm:` and "
                    "outside TransactionalTask bodies and pyramid_tm views."
                )

            forget_eager_errors(tm)

            def attempt(number):
                result = in_transaction(tm, lambda: func(*args, **kwargs), retry=True)
                raise_eager_errors(tm)
                return result

            return run_attempts(policy, attempt, name)

        return call

    return decorate
