"""Embedded KATO-compatible memory server: FastAPI + SQLite, idempotency keys, /nodes extensions.

    from streamtrain.server import EmbeddedServer
    with EmbeddedServer("run/kb.sqlite3") as srv:
        ... srv.url ...
"""

from streamtrain.server.app import create_app
from streamtrain.server.cli import add_serve_arguments, serve
from streamtrain.server.launcher import EmbeddedServer

__all__ = ["EmbeddedServer", "add_serve_arguments", "create_app", "serve"]
