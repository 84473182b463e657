"""Secrets out of errors and logs: passwords in URLs, DSNs and JSON values."""

import re

__all__ = ["mask_secrets"]

# ``scheme://user:password@host`` and ``scheme://:password@host``.  The password
# runs to the *last* ``@`` (as urllib and kombu read it: ``redis://:p@ss@host``),
# stopping only at whitespace or the next ``scheme://`` of a failover list.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*:)(?:(?!://)\S)*@")

# ``"password": "..."`` and the like inside JSON values (transport options).
_JSON_SECRET = re.compile(
    r'(?P<head>"[^"]*(?:password|passwd|secret|token)[^"]*"\s*:\s*)"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)


# ``?password=...`` in URL queries and ``password=...`` in libpq DSNs.
_KEYWORD_SECRET = re.compile(r"(?P<head>\b(?:password|passwd)=)[^&\s]+", re.IGNORECASE)


def mask_secrets(value):
    """``value`` as text, with passwords in URLs, DSNs and JSON replaced."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", str(value))
    text = _KEYWORD_SECRET.sub(r"\g<head>***", text)
    return _JSON_SECRET.sub(r'\g<head>"***"', text)
