"""Every Python example of the documentation (``.. code-block:: python``) is
valid Python, and what it imports from this package exists: a renamed
function or module cannot stay in the docs.  (Running each example against
an app is the next step of the docs' tests.)"""

import ast
import importlib
from importlib.util import find_spec

import pytest

from .docs_blocks import code_blocks

_OURS = ("pyramid_tasks", "demo_app")

BLOCKS = code_blocks("python")


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
