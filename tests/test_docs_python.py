"""Every Python example of the documentation (``.. code-block:: python``) is
valid Python, and what it imports from this package exists: a renamed
function or module cannot stay in the docs.  (Running each example against
an app is the next step of the docs' tests.)"""

import ast
import importlib
import re
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^( *)\.\. code-block:: python\n((?:\1 +.*\n|[ \t]*\n)+)", re.M)
_OURS = ("pyramid_tasks", "demo_app")


def python_blocks():
    """``(page:line, source)`` of each Python block of the docs."""
    for page in sorted(DOCS.glob("*.rst")):
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield f"{page.name}:{line}", textwrap.dedent(match.group(2))


BLOCKS = dict(python_blocks())


def test_the_docs_have_python_examples_to_check():
    assert len(BLOCKS) >= 35


@pytest.mark.parametrize("where", BLOCKS)
def test_a_python_example_parses_and_imports_what_exists(where):
    tree = ast.parse(BLOCKS[where], filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(_OURS):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(_OURS):
            module = importlib.import_module(node.module)
            for alias in node.names:
                name = f"{node.module}.{alias.name}"  # a name, or a submodule
                assert hasattr(module, alias.name) or find_spec(name), (
                    f"{where}: {node.module} has no {alias.name}"
                )
