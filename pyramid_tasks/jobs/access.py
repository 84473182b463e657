"""What every operators' include over HTTP needs (the JSON API, the dashboard).

Each checks, once the configuration is committed, that the app has the job
table, a security policy (without one Pyramid grants every permission) and
somewhere to keep its CSRF tokens; then records itself among the includes
whose ``tasks.jobs.*`` settings are read (``config.check_jobs_settings``).
"""

from pyramid.csrf import LegacySessionCSRFStoragePolicy, SessionCSRFStoragePolicy
from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import ICSRFStoragePolicy, ISecurityPolicy, ISessionFactory

__all__ = ["check_operator_include"]

_IN_SESSION = (LegacySessionCSRFStoragePolicy, SessionCSRFStoragePolicy)


def check_operator_include(registry, include):
    """Refuse the include ``include`` (its dotted name, for the messages)
    when it could not work, or when anyone could use it."""
    if getattr(registry, "pyramid_tasks_jobs", None) is None:
        raise ConfigurationError(
            f"{include} needs the job table: add "
            "config.include('pyramid_tasks.jobs') (before or after it)."
        )
    if registry.queryUtility(ISecurityPolicy) is None:
        raise ConfigurationError(
            f"{include} needs a security policy: without one Pyramid grants "
            "every permission, so anyone could cancel jobs. Set one with "
            "config.set_security_policy(...)."
        )
    policy = registry.queryUtility(ICSRFStoragePolicy)
    sessions = registry.queryUtility(ISessionFactory)
    if isinstance(policy, _IN_SESSION) and sessions is None:
        raise ConfigurationError(
            f"{include} checks a CSRF token kept in the session, but the app "
            "has no session factory: set one (config.set_session_factory) or "
            "keep the token in a cookie (config.set_csrf_storage_policy("
            "pyramid.csrf.CookieCSRFStoragePolicy()))."
        )
    registry.pyramid_tasks_jobs_includes = (
        *getattr(registry, "pyramid_tasks_jobs_includes", ()),
        include,
    )
