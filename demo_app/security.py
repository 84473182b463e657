"""The demo's security policy: whoever browses from this machine operates it.

The jobs dashboard (``pyramid_tasks.dashboard``) refuses to start without a
security policy, since Pyramid would otherwise let anyone cancel jobs.  A
local demo has no users: requests from the loopback address are the
operator, with every permission; any other address has none.  A real app
uses its own login instead.
"""

from pyramid.security import Allowed, Denied

LOOPBACK = ("127.0.0.1", "::1")


class LocalOperatorPolicy:
    def identity(self, request):
        return "operator" if request.remote_addr in LOOPBACK else None

    def authenticated_userid(self, request):
        return self.identity(request)

    def permits(self, request, context, permission):
        if self.identity(request):
            return Allowed(f"the local operator may {permission}")
        return Denied(f"{permission} is for requests from this machine only")

    def remember(self, request, userid, **kw):
        return []

    def forget(self, request, **kw):
        return []
