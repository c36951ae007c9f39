"""The package's layers stay visible: a module imports only its own layer and those below it
(commands above runtime, engines and service, above models, above config), and no two
modules import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "model_serve"
# Higher imports lower; equal ranks may import each other. Shared helpers sit below all.
RANKS = {"errors": 0, "fileio": 0, "sse": 0, "programs": 0, "machine_code": 0,
         "loopback": 0, "machine": 0, "config": 1,
         "internal_key": 1, "models": 2, "engines": 3, "runtime": 3, "service": 3,
         "commands": 4, "cli": 5, "render": 5,
         "__main__": 6}


def layer(module: str) -> str:
    """'model_serve.runtime.stack' -> 'runtime'; 'model_serve.cli' -> 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "model_serve":
                found += [f"model_serve.{alias.name}" for alias in node.names]
            elif node.module.startswith("model_serve."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("model_serve.")]
    return found


def modules() -> dict[str, Path]:
    return {".".join(("model_serve", *p.relative_to(PACKAGE).with_suffix("").parts)): p
            for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_belongs_to_a_layer() -> None:
    assert {layer(name) for name in modules()} <= set(RANKS)


def test_imports_go_down_the_layers() -> None:
    upward = []
    for name, path in modules().items():
        for target in imports(path, top_level_only=False):
            if RANKS[layer(target)] > RANKS[layer(name)]:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_no_import_cycle_at_load_time() -> None:
    graph = {name: [t for t in imports(path, top_level_only=True) if t in modules()]
             for name, path in modules().items()}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        for target in graph.get(node, []):
            visit(target, [*trail, node])

    for start in graph:
        visit(start, [])
    assert cycles == []


def test_only_the_front_loads_aiohttp() -> None:
    """The CLI must start fast: aiohttp is for the front's own process (and the routes it
    imports). runtime/peers.py loads it inside the list check alone, which the CLI runs only
    when PEERS is set (`model list`, `model doctor`)."""
    def loads_aiohttp(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "aiohttp" for name in names):
                return True
        return False

    assert sorted(name for name, path in modules().items() if loads_aiohttp(path)) == \
        ["model_serve.runtime.connections", "model_serve.runtime.dashboard",
         "model_serve.runtime.front",
         "model_serve.runtime.ollama_routes", "model_serve.runtime.peers"]
