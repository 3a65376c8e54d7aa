"""The layering rules of docs/architecture.md, checked on the source: HTTP stays in the API package, the
application layer never reaches up into it, and no two packages import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fluxserve"
HTTP_ALLOWED = ("api/", "cli.py")  # the API package and the CLI (it serves the app)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources() -> dict[str, set[str]]:
    return {path.relative_to(PACKAGE).as_posix(): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_http_frameworks_only_in_the_api_and_the_cli():
    offenders = {
        name: sorted(m for m in modules if m.split(".")[0] in ("fastapi", "starlette"))
        for name, modules in sources().items()
        if not name.startswith(HTTP_ALLOWED)
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_application_layer_does_not_import_the_api_or_the_composition_root():
    for name, modules in sources().items():
        if name.startswith(("app/", "jobs/", "accounts/", "engine/", "webhooks/", "outputs/")):
            upward = [m for m in modules if m.startswith(("fluxserve.api", "fluxserve.services", "fluxserve.cli"))]
            assert upward == [], name


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = defaultdict(set)
    for name, modules in sources().items():
        source = name.split("/")[0].removesuffix(".py")
        for module in modules:
            parts = module.split(".")
            if parts[0] == "fluxserve" and len(parts) > 1 and parts[1] != source:
                graph[source].add(parts[1])
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    cycles = sorted(
        (a, b) for a in packages for b in graph[a] if b in packages and a < b and a in graph.get(b, set())
    )
    assert cycles == []
