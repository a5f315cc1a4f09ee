"""The embedded server's module structure: the launcher stays light, and the package has no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import streamtrain.server

PACKAGE = Path(streamtrain.server.__file__).parent


def test_importing_the_launcher_loads_neither_fastapi_nor_the_engine():
    """`from streamtrain.server import EmbeddedServer` (what a trainer needs to start its server) must not pay for
    FastAPI, uvicorn, numpy or the engine: they load in the server process only."""
    code = ("import sys; from streamtrain.server import EmbeddedServer; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'numpy', 'rapidfuzz', 'httpx', "
            "'streamtrain.server.app', 'streamtrain.server.engine', 'streamtrain.server.store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # and the lazy names still resolve
    from streamtrain.server import add_serve_arguments, create_app, serve
    assert callable(create_app) and callable(serve) and callable(add_serve_arguments)


def imports_of(path: Path) -> set[str]:
    """The streamtrain.server modules a module imports, at any level (a lazy import is a dependency too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("streamtrain.server"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if (PACKAGE / (n.split(".")[-1] + ".py")).exists()
                         and n.count(".") == 2)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("streamtrain.server."))
    return found


def test_no_import_cycle_in_the_server_package():
    graph = {f"streamtrain.server.{p.stem}": imports_of(p) - {f"streamtrain.server.{p.stem}"}
             for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert "streamtrain.server.predictions" in graph["streamtrain.server.engine"]     # the graph is read
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_server_module_over_500_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 500, sizes
