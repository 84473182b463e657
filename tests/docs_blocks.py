"""The code blocks of the documentation, for the tests that check them."""

import re
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def code_blocks(language):
    """``{"page:line": source}`` of each ``.. code-block:: <language>`` of
    the docs, dedented."""
    block = re.compile(
        rf"^( *)\.\. code-block:: {language}\n((?:\1 +.*\n|[ \t]*\n)+)", re.M
    )
    found = {}
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text()
        for match in block.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found[f"{page.name}:{line}"] = textwrap.dedent(match.group(2))
    return found
