"""Embedded KATO-compatible memory server: FastAPI + SQLite, idempotency keys, /nodes and learn-batch extensions.

    from streamtrain.server import EmbeddedServer
    with EmbeddedServer("run/kb.sqlite3") as srv:
        ... srv.url ...

Importing EmbeddedServer (the launcher of a server subprocess) loads neither FastAPI nor the engine: create_app,
serve and add_serve_arguments are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamtrain.server.launcher import EmbeddedServer

if TYPE_CHECKING:
    from streamtrain.server.app import create_app
    from streamtrain.server.cli import add_serve_arguments, serve

__all__ = ["EmbeddedServer", "add_serve_arguments", "create_app", "serve"]

_LAZY = {"create_app": "app", "add_serve_arguments": "cli", "serve": "cli"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"streamtrain.server.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
