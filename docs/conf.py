"""Sphinx configuration of the pyramid_tasks documentation.

Build it with ``.venv/bin/sphinx-build -W -b html docs docs/_build/html``
(``tests/test_docs.py`` builds it the same way, warnings as errors).
"""

project = "pyramid_tasks"
author = "the pyramid_tasks authors"
copyright = "2026, the pyramid_tasks authors"

extensions = ["sphinx.ext.autodoc"]

# The narrative pages link each other as files (``jobs.rst``), which reads
# well on a forge; the site keeps those links as they are.
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
autodoc_member_order = "bysource"
autodoc_typehints = "none"
