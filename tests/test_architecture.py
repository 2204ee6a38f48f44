"""Architecture rules the import contracts (``lint-imports``, pyproject.toml) cannot express."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spap", "solvers")


def _sources():
    for folder in (*PACKAGES, "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(path: Path, source: str | None = None) -> list[str]:
    """``from M import _x`` and ``M._x`` where ``M`` is another module of the project (``source``: the
    file's text, read from ``path`` when None)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                if _private(a.name) and f"{base}.{a.name}" != here:
                    submodule = (ROOT / Path(*base.split("."), a.name + ".py")).is_file()
                    if not submodule or base.split(".")[0] != here.split(".")[0]:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {base}.{a.name}")
                aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and target != here:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    return found


def test_no_module_uses_a_private_name_of_another():
    found = [use for path in _sources() for use in _private_uses(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "from spap.pipeline import _solve_groups\n",
    "from .capture import _Stop\n",
    "import spap.pipeline as p\np._HOOKS\n",
])
def test_the_private_name_check_catches(source):
    assert _private_uses(ROOT / "spap" / "probe.py", source)
