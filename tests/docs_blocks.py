"""The code blocks of the documentation, for the tests that check them: the
pages of ``docs/`` and the package's docstrings (the API reference)."""

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def code_blocks(language):
    """``{"page:line": source}`` of each ``.. code-block:: <language>`` of
    the docs' pages and the package's docstrings, dedented."""
    block = re.compile(
        rf"^( *)\.\. code-block:: {language}\n((?:\1 +.*\n|[ \t]*\n)+)", re.M
    )
    found = {}
    pages = sorted(DOCS.glob("*.rst")) + sorted(ROOT.glob("pyramid_tasks/**/*.py"))
    for page in pages:
        text = page.read_text()
        name = page.name if page.suffix == ".rst" else page.relative_to(ROOT)
        for match in block.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found[f"{name}:{line}"] = textwrap.dedent(match.group(2))
    return found
