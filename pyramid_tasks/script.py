"""The ``tasks-celery`` console script: patch for gevent/eventlet, then run.

Celery monkey-patches for ``-P gevent``/``-P eventlet`` in its own
``__main__``, before anything else is imported; this is our twin of that.
Nothing here, nor in the package's ``__init__``, imports Pyramid, SQLAlchemy
or Celery's app machinery before the patch.
"""

import sys

__all__ = ["main"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        from celery import maybe_patch_concurrency

        maybe_patch_concurrency(argv[argv.index("--") + 1 :])
    from .cli import main as run

    return run(argv)
