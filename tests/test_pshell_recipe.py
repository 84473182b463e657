"""The README's pshell recipe, typed into a real ``pshell``: on the demo's
test settings as they are, and with the cookiecutter's ``pshell.py`` setup,
which has begun ``request.tm`` before the first line is typed."""

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
COOKIECUTTER_SETUP = "tests.pkgs.cookiecutter_app.pshell.setup"


def readme_recipe():
    """The README's pshell session: the lines typed, and what the shell prints."""
    lines = (ROOT / "README.rst").read_text().splitlines()
    start = lines.index("    .venv/bin/pshell conf/test.ini") + 1
    typed, printed = [], []
    for line in itertools.takewhile(
        lambda line: line.startswith("    "), lines[start:]
    ):
        text = line[4:]
        if text.startswith(">>> "):
            if typed and typed[-1].startswith(" "):
                typed.append("")  # the empty line that ends an indented block
            typed.append(text[4:])
        elif text.startswith("... "):
            typed.append(text[4:])
        else:
            printed.append(text)
    return typed, printed


def pshell(ini, typed, *options):
    """Type ``typed`` into ``pshell ini``; return (values printed, stderr)."""
    command = [shutil.which("pshell", path=str(Path(sys.executable).parent))]
    result = subprocess.run(
        [*command, *options, str(ini)],
        input="\n".join(typed) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # The console writes its prompts to stdout before each line it reads.
    printed = re.sub(r"(>>> |\.\.\. )", "", result.stdout).splitlines()
    return [line for line in printed if line], result.stderr


def test_the_readme_recipe_works_with_and_without_a_pshell_setup(
    start_worker, ini_vars, database_url
):
    typed, printed = readme_recipe()
    assert printed == ["'https://example.com/app/orders/1'"]
    worker = start_worker(section="main")
    engine = sqlalchemy.create_engine(database_url)

    for options in ([], ["--setup", COOKIECUTTER_SETUP]):
        with engine.begin() as connection:  # the next order is number 1 again
            connection.execute(
                sqlalchemy.text(
                    f'TRUNCATE "{ini_vars["schema"]}".orders RESTART IDENTITY'
                )
            )
        values, errors = pshell(worker.ini_path, typed, *options)
        assert "Traceback" not in errors, errors
        assert values == printed, errors
    engine.dispose()
