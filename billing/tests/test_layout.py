"""The shape of the code, as the contributing guide promises it (docs/adding-an-event-handler.rst).

* SQL is written by hand in one module, ``billing/sql.py`` (and in the migrations and the
  backfill, where set-based SQL is the point); handlers and services use the ORM.
* The apps depend one way: billing uses provisioning, never the reverse.
* No module of the app is over 600 lines.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP_DIRS = ("billing", "provisioning", "config")
SQL_ALLOWED = {Path("billing/sql.py"), Path("billing/backfill.py")}

# SQL as it appears in a string: a statement's opening words, a lock clause, a PostgreSQL function.
SQL_TEXT = re.compile(
    r"\bSELECT\b.+\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\S+\s+SET\b|\bDELETE\s+FROM\b|\bFOR\s+UPDATE\b"
    r"|\bON\s+CONFLICT\b|\bpg_\w+\(",
    re.DOTALL,
)
# Ways to send text to the database without the ORM.
RAW_CALLS = {"cursor", "raw", "extra", "RawSQL", "execute", "executemany"}


def app_modules():
    for top in APP_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if "tests" in relative.parts or "migrations" in relative.parts:
                continue
            yield relative


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, which may name SQL)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def sql_in(path: Path) -> list[str]:
    """Where ``path`` writes SQL text or sends a statement around the ORM."""
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if SQL_TEXT.search(node.value):
                problems.append(f"{path}:{node.lineno}: SQL text {node.value[:60]!r}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in RAW_CALLS:
                problems.append(f"{path}:{node.lineno}: {name}() sends SQL around the ORM")
    return problems


def test_the_checker_finds_sql_text_and_raw_cursors(tmp_path, monkeypatch):
    """The check below would see SQL if there were any (it is not a test that cannot fail)."""
    sample = ROOT / "billing" / "_layout_probe.py"
    sample.write_text(
        '"""SELECT this docstring FROM prose is allowed."""\n'
        "from django.db import connection\n\n"
        "def f():\n"
        "    with connection.cursor() as c:\n"
        '        c.execute("SELECT id FROM billing_invoice WHERE stripe_id = %s FOR UPDATE", ["in_1"])\n'
    )
    try:
        problems = sql_in(Path("billing/_layout_probe.py"))
    finally:
        sample.unlink()
    assert len([p for p in problems if "SQL text" in p]) == 1
    assert len([p for p in problems if "around the ORM" in p]) == 2  # cursor() and execute()


def test_sql_is_written_only_in_billing_sql():
    problems = [problem for path in app_modules() if path not in SQL_ALLOWED for problem in sql_in(path)]
    assert problems == []


def test_billing_sql_is_where_the_sql_is():
    assert sql_in(Path("billing/sql.py")), "billing/sql.py should hold the hand-written statements"


@pytest.mark.parametrize("path", list(app_modules()), ids=str)
def test_no_module_is_over_600_lines(path):
    assert len((ROOT / path).read_text().splitlines()) <= 600
