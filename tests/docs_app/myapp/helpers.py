"""The plain names the docs' examples take as given."""

from types import SimpleNamespace

mailer = SimpleNamespace(send=print)


def send_welcome_function(self, user_id):
    """A task body, registered with ``config.add_task``."""


def rebuild(request, asset):
    """Rebuild one asset."""


def make_client(settings):
    """A client of some search service."""


def my_session_factory(request):
    """A Pyramid session factory."""


class MySecurityPolicy:
    """A Pyramid security policy: nobody, with no permission."""

    def identity(self, request):
        """Nobody."""

    def authenticated_userid(self, request):
        """Nobody."""

    def permits(self, request, context, permission):
        """No permission."""
