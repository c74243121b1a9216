"""The package's layout rules, checked from the source: which folder may import which, and where SQL text lives.

    backfill/          the engine (spec, plan, settings, executor, policies, store protocol, state, status, parallel)
    backfill/pg/       everything that speaks SQL or holds a connection
    backfill/schema/   online schema changes as plain functions
    backfill/api.py    the Python API: wires the engine to pg and schema
    backfill/alembic/, backfill/cli/, backfill/tools/, backfill/web/   integrations on top

Lower layers never import higher ones; only module-level imports count (a command may import a tool lazily).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "backfill"

LAYERS = ["engine", "pg", "schema", "api", "integration"]
#: What each layer may import from the package, besides its own layer.
ALLOWED = {
    "engine": {"engine"},
    "pg": {"engine", "pg"},
    "schema": {"engine", "pg", "schema"},
    "api": {"engine", "pg", "schema"},
    "integration": {"engine", "pg", "schema", "api", "integration"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return "api" if module == "backfill" else "engine"
    head = parts[1]
    if head in ("pg", "schema"):
        return head
    if head in ("alembic", "cli", "tools", "web"):
        return "integration"
    if head == "api":
        return "api"
    return "engine"


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports still describe a dependency
            nodes = list(node.body)
        for item in nodes:
            if isinstance(item, ast.Import):
                found += [alias.name for alias in item.names]
            elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                found += [f"{item.module}.{alias.name}" for alias in item.names]
    return [name for name in found if name == "backfill" or name.startswith("backfill.")]


def _imported_layer(name: str) -> str:
    # `from backfill import api` names the module api; `from backfill.store import X` names module backfill.store.
    parts = name.split(".")
    candidates = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for candidate in candidates:
        path = PACKAGE.parent / Path(*candidate.split("."))
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return _layer(candidate)
    return _layer(name)


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_from_its_own_layer_or_lower_ones(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    if module == "backfill":
        return  # the package root re-exports the public API of every layer
    wrong = [name for name in _top_level_imports(path) if _imported_layer(name) not in ALLOWED[layer]]
    assert wrong == [], f"{module} ({layer}) imports {wrong}"


#: Where SQL text may be written: the statements, the DDL, the offline scripts; tools play the application.
SQL_HOMES = {"pg", "schema", "tools"}
SQL_FILES = {"alembic/offline.py"}
_SQL_TEXT = re.compile(r"""sql\.SQL\(|(?:execute|exec_driver_sql)\(\s*f?["'](?!(BEGIN|COMMIT|ROLLBACK)["'])""")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sql_text_is_written_only_in_the_sql_modules(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    if relative.parts[0] in SQL_HOMES or str(relative) in SQL_FILES:
        return
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if _SQL_TEXT.search(line)]
    assert lines == [], f"SQL text in {relative} at lines {lines}"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: an engine module importing pg, or SQL text in the engine, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text('from backfill.pg.store import PostgresStore\nx = conn.execute("SELECT 1")\n')
    assert _top_level_imports(bad) == ["backfill.pg.store.PostgresStore"]
    assert _imported_layer("backfill.pg.store.PostgresStore") == "pg"
    assert "pg" not in ALLOWED["engine"]
    assert _SQL_TEXT.search(bad.read_text().splitlines()[1])
