"""The package's layers, read from its imports: ``ast`` over ``streamtrain/``, where an import inside a function (a
lazy one) counts and one under ``if TYPE_CHECKING:`` does not (it loads nothing). Importing a module of a
subpackage runs the subpackage's ``__init__`` first, so a module loads what its packages' ``__init__`` import too.
A layer is named by a package (``streamtrain.client``: every module under it) or by a module. The rules:

1. **Persisted records import no HTTP.** The formats written to disk that a resume reads (RECORDS: everything
   under ``streamtrain.records``, and ``config``: the run config a checkpoint holds), and everything they import,
   reach neither httpx, tenacity nor a web framework (fastapi, starlette, uvicorn), nor the client side nor the
   server. Reading a checkpoint must not load an HTTP stack; importing each one in a fresh interpreter checks it
   too.
2. **The data side reads files, not a server.** Nothing under ``streamtrain.data`` (DATA: the stream, the text
   filter, the tokenizers, the dataset's files) reaches the client side, the server, httpx, tenacity or a web
   framework; it may read the records (a checkpoint holds the dataset's record).
3. **No module reads a name from a package it belongs to** (``from . import __version__``): the package's
   ``__init__`` imports its modules, so that would import back through ``__init__``. ``from . import wire`` (a
   submodule) is fine. The version lives in ``version.py`` for this reason.
4. **The server and the client side stay apart.** Nothing under ``streamtrain.server`` imports from the rest of
   streamtrain but the shared leaves (SHARED), plus ``errors`` in ``launcher.py`` (the trainer's handle on a
   server process raises the trainer's errors); never httpx or tenacity. Nothing under ``streamtrain.client``
   reaches the server or a web framework, except through SHARED. A shared module belongs to neither side: it
   imports neither.
5. **No module imports another module's private name** (``_name``): what two modules share is public.
6. **No import cycle**, lazy imports included (a package's ``__init__`` importing its modules is no cycle).

The trainer's modules (``trainer``, ``worker``, ``serverconn``, ``indoubt``, ...) sit on top and may import any
layer. A rule's failure names the chain of imports that breaks it; ``test_each_rule_fails_on_a_bad_import``
plants one bad import per rule in the package's source (as read, not on disk) and checks that the rule catches it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import streamtrain

PACKAGE = Path(streamtrain.__file__).parent

# A layer is a package (every module under it) or a module.
RECORDS = ["streamtrain.records", "streamtrain.config"]
DATA = ["streamtrain.data"]
CLIENT = ["streamtrain.client"]
SERVER = ["streamtrain.server"]
# Imported by both sides (or meant to be): a new module that both must read goes here, if it imports neither side.
SHARED = ["streamtrain.disk", "streamtrain.jsonbytes", "streamtrain.limits", "streamtrain.patterns", "streamtrain.wire"]
SERVER_ALSO = {"streamtrain.server.launcher": ["streamtrain.errors"]}
HTTP = ["httpx", "tenacity"]
WEB = ["fastapi", "starlette", "uvicorn"]


@dataclass(frozen=True)
class Import:
    target: str              # a module of the package ("streamtrain.client") or another's top-level name ("httpx")
    names: tuple[str, ...]   # the names a from-import takes
    line: int


@dataclass(frozen=True)
class Graph:
    imports: dict[str, list[Import]]   # per module of the package
    packages: frozenset[str]           # the modules that are packages (an __init__.py)

    def edges(self, module: str) -> set[str]:
        """What ``module`` imports: the from-module of each import, and each name of it that is a submodule."""
        out = set()
        for imp in self.imports.get(module, []):
            out.add(imp.target)
            out.update(f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in self.imports)
        return out - {module}

    def loads(self, module: str) -> set[str]:
        """What importing ``module`` loads first: its imports and the packages it is in (their ``__init__`` runs
        before it)."""
        parts = module.split(".")
        return self.edges(module) | {".".join(parts[:i]) for i in range(1, len(parts))} & self.packages

    def layer(self, names: list[str]) -> set[str]:
        """The modules ``names`` name: each a module, a package and every module under it, or a third party's
        top-level name."""
        return set(names) | {m for m in self.imports if any(within(m, n) for n in names)}

    def chain(self, start: str, bad: set[str]) -> list[str] | None:
        """The shortest chain of loads (``loads``) from ``start`` to a module (or top-level name) in ``bad``, else
        None."""
        came: dict[str, str | None] = {start: None}
        todo = deque([start])
        while todo:
            node = todo.popleft()
            if node in bad and node != start:
                path = [node]
                while (prev := came[path[-1]]) is not None:
                    path.append(prev)
                return path[::-1]
            for nxt in sorted(self.loads(node)):
                if nxt not in came:
                    came[nxt] = node
                    todo.append(nxt)
        return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_graph(root: Path, planted: dict[str, str] | None = None) -> Graph:
    """The imports of every module under ``root``; ``planted``: source appended to some files (path under
    ``root``: text), as if it were there (the tests of the rules themselves)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = frozenset(m for m, p in files.items() if p.name == "__init__.py")
    imports: dict[str, list[Import]] = {}
    for module, path in files.items():
        base = module if module in packages else module.rpartition(".")[0]
        found: list[Import] = []

        def visit(node: ast.AST, base: str = base, found: list[Import] = found) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _type_checking(child.test):
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]))
                    continue
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        inside = alias.name.split(".")[0] == root.name
                        found.append(Import(alias.name if inside else alias.name.split(".")[0], (), child.lineno))
                elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                    if child.level:
                        parts = base.split(".")[: len(base.split(".")) - child.level + 1]
                        target = ".".join(parts + ([child.module] if child.module else []))
                    else:
                        target = child.module or ""
                    if target.split(".")[0] != root.name:
                        target = target.split(".")[0]
                    found.append(Import(target, tuple(a.name for a in child.names), child.lineno))
                visit(child)

        source = path.read_text(encoding="utf-8") + "\n" + (planted or {}).get(path.relative_to(root).as_posix(), "")
        visit(ast.parse(source, str(path)))
        imports[module] = found
    return Graph(imports, packages)


@cache
def package_graph() -> Graph:
    return read_graph(PACKAGE)


def within(module: str, name: str) -> bool:
    """``module`` is ``name`` or is under the package ``name``."""
    return module == name or module.startswith(name + ".")


# -- the rules: each returns its violations, one line each ------------------------------------------------------------

def records_violations(graph: Graph) -> list[str]:
    bad = graph.layer(HTTP + WEB + CLIENT + SERVER)
    out = []
    for record in sorted(graph.layer(RECORDS)):
        chain = graph.chain(record, bad)
        if chain:
            out.append(f"{record} is a persisted record but imports {chain[-1]}: {' -> '.join(chain)}")
    return out


def data_violations(graph: Graph) -> list[str]:
    bad = graph.layer(HTTP + WEB + CLIENT + SERVER)
    out = []
    for module in sorted(graph.layer(DATA)):
        chain = graph.chain(module, bad)
        if chain:
            out.append(f"{module} is on the data side, which reads files, but imports {chain[-1]}: "
                       f"{' -> '.join(chain)}")
    return out


def package_root_violations(graph: Graph) -> list[str]:
    out = []
    for module, imports in graph.imports.items():
        for imp in imports:
            own = module == imp.target or module.startswith(imp.target + ".")
            if imp.target not in graph.packages or not own:
                continue
            read = [n for n in imp.names if f"{imp.target}.{n}" not in graph.imports] or (
                [] if imp.names else [imp.target])
            if read:
                out.append(f"{module} (line {imp.line}) reads {', '.join(read)} from {imp.target}'s __init__, which "
                           f"imports its modules: import it from the module that defines it")
    return out


def server_client_violations(graph: Graph) -> list[str]:
    out = []
    server = graph.layer(SERVER)
    for module in sorted(server):
        allowed = set(SHARED) | set(SERVER_ALSO.get(module, []))
        for imp in graph.imports[module]:
            if imp.target in HTTP or (within(imp.target, "streamtrain") and imp.target not in server
                                      and imp.target != "streamtrain" and imp.target not in allowed):
                out.append(f"the server's {module} (line {imp.line}) imports {imp.target}: the server imports only "
                           f"the shared leaves of the rest ({', '.join(SHARED)}) and no HTTP client")
            elif imp.target == "streamtrain" and not all(f"streamtrain.{n}" in allowed for n in imp.names):
                out.append(f"the server's {module} (line {imp.line}) imports {', '.join(imp.names)} of streamtrain: "
                           f"the server imports only the shared leaves of the rest ({', '.join(SHARED)})")
    server_and_web = server | set(WEB)
    for module in sorted(graph.layer(CLIENT)):
        chain = graph.chain(module, server_and_web - set(SHARED))
        if chain:
            out.append(f"the client side's {module} imports {chain[-1]}: {' -> '.join(chain)} (only SHARED modules "
                       "are both sides')")
    either = server_and_web | graph.layer(CLIENT) | set(HTTP)
    for module in SHARED:
        chain = graph.chain(module, either)
        if chain:
            out.append(f"{module} is shared by the server and the client side but imports {chain[-1]}: "
                       f"{' -> '.join(chain)}")
    return out


def private_name_violations(graph: Graph) -> list[str]:
    return [f"{module} (line {imp.line}) imports {n} of {imp.target}: make it public where it is defined"
            for module, imports in graph.imports.items() for imp in imports
            if imp.target.startswith("streamtrain") and imp.target != module
            for n in imp.names if n.startswith("_") and not n.startswith("__")]


def cycle_violations(graph: Graph) -> list[str]:
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    out: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.edges(node) & graph.imports.keys()):
            if state.get(nxt) == 1:
                out.append("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph.imports):
        if module not in state:
            visit(module, [module])
    return out


RULES = {"records": records_violations, "data": data_violations, "package root": package_root_violations,
         "server and client": server_client_violations, "private names": private_name_violations,
         "cycles": cycle_violations}


# -- the package keeps them --------------------------------------------------------------------------------------------

def test_the_graph_is_read():
    """The rules below pass on something real: known imports of each kind are in the graph, and a type-only one
    is not."""
    graph = package_graph()
    assert {"streamtrain.config", "streamtrain.records.knowledge_base", "pydantic"} <= graph.edges(
        "streamtrain.records.checkpoint")
    assert "httpx" in graph.edges("streamtrain.client.kato")                             # another package
    assert "streamtrain.wire" in graph.edges("streamtrain.client.kato")                  # from .. import wire
    assert "streamtrain.client" in graph.loads("streamtrain.client.outage")              # its package's __init__
    assert "streamtrain.server.session_config" in graph.edges("streamtrain.server.session")  # absolute, a submodule
    assert "datasets" in graph.edges("streamtrain.data.datafiles")                       # a lazy import
    assert "streamtrain.client" not in graph.edges("streamtrain.kbcheck")                # under TYPE_CHECKING
    assert set(RECORDS + DATA + CLIENT + SERVER + SHARED) <= graph.imports.keys()
    assert {"streamtrain.records.journal", "streamtrain.data.stream", "streamtrain.client.outage",
            "streamtrain.server.app"} <= graph.layer(RECORDS + DATA + CLIENT + SERVER)


@pytest.mark.parametrize("rule", RULES)
def test_the_package_keeps_the_rule(rule):
    assert RULES[rule](package_graph()) == []


@pytest.mark.parametrize("module, absent", [
    *[(m, HTTP + WEB + ["streamtrain.client", "streamtrain.server.app"])
      for m in sorted(package_graph().layer(RECORDS + DATA))],
    ("streamtrain.client", WEB + ["streamtrain.server.app", "streamtrain.server.store"]),
    ("streamtrain.server.app", HTTP + ["streamtrain.client"]),
    # what a trainer needs to start its server pays for neither FastAPI, uvicorn, numpy nor the engine
    ("streamtrain.server", WEB + HTTP + ["numpy", "rapidfuzz", "streamtrain.server.app", "streamtrain.server.engine",
                                         "streamtrain.server.store"]),
])
def test_importing_a_module_loads_none_of_the_other_layers(module, absent):
    """The static rules, checked where they matter: what a fresh interpreter loads (third-party imports included)."""
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loads {out.strip()}"


def test_the_servers_lazy_names_still_resolve():
    from streamtrain.server import add_serve_arguments, create_app, serve
    assert callable(create_app) and callable(serve) and callable(add_serve_arguments)


# -- and each rule can fail --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, file, bad", [
    ("records", "records/journal.py", "def later():\n    from ..client import KatoClient\n"),     # lazy counts
    ("records", "records/checkpoint.py", "from ..server import store\n"),
    ("records", "records/dataset.py", "import tenacity\n"),
    ("records", "config.py", "import httpx\n"),
    ("data", "data/datafiles.py", "def later():\n    from ..client import KatoClient\n"),
    ("data", "data/tokenization.py", "from ..server.defaults import DEFAULT_IDEMPOTENCY_TTL\n"),
    ("package root", "records/checkpoint.py", "from .. import __version__\n"),
    ("package root", "server/store.py", "from streamtrain.server import EmbeddedServer\n"),
    ("server and client", "server/store.py", "from streamtrain.errors import StreamtrainError\n"),
    ("server and client", "server/engine.py", "import httpx\n"),
    ("server and client", "server/app.py", "from streamtrain import trainer\n"),
    ("server and client", "client/kato.py", "from ..server.defaults import DEFAULT_IDEMPOTENCY_TTL\n"),
    ("server and client", "client/outage.py", "from streamtrain.server import launcher\n"),  # any module under it
    ("server and client", "patterns.py", "from . import client\n"),
    ("private names", "server/app.py", "from streamtrain.server.store import _STORAGE_CODES\n"),
    ("cycles", "config.py", "def later():\n    from .records import checkpoint\n"),
])
def test_each_rule_fails_on_a_bad_import(rule, file, bad):
    assert (PACKAGE / file).is_file()
    found = RULES[rule](read_graph(PACKAGE, {file: bad}))
    module = "streamtrain." + file.removesuffix(".py").replace("/", ".")
    assert found and all(module in line for line in found), found


@pytest.mark.parametrize("rule, file, bad, chain", [
    ("server and client", "client/__init__.py", "from ..server import launcher\n",
     "streamtrain.client.outage -> streamtrain.client -> streamtrain.server"),
    ("records", "records/__init__.py", "import httpx\n", "streamtrain.records.journal -> streamtrain.records -> httpx"),
])
def test_a_packages_init_is_loaded_with_its_modules(rule, file, bad, chain):
    """Importing ``streamtrain.client.outage`` runs ``streamtrain/client/__init__.py`` first: what that imports
    counts for every module of the package."""
    found = RULES[rule](read_graph(PACKAGE, {file: bad}))
    assert any(chain in line for line in found), found


def test_a_type_only_import_is_no_dependency():
    planted = {"records/checkpoint.py": "if TYPE_CHECKING:\n    from ..client import KatoClient\n"}
    assert records_violations(read_graph(PACKAGE, planted)) == []
