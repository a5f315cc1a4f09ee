"""`python -m streamtrain.server` / `streamtrain serve`: run the embedded server with uvicorn (one worker)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from streamtrain.server.app import DEFAULT_IDEMPOTENCY_TTL, DEFAULT_MAX_BODY_BYTES, create_app
from streamtrain.server.store import Store, StoreError

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default loopback; another host needs --token to be safe)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' on every route but /health")
    parser.add_argument("--no-idempotency", action="store_true",
                        help="ignore Idempotency-Key headers (behave like a real KATO)")
    parser.add_argument("--idempotency-ttl", type=float, default=DEFAULT_IDEMPOTENCY_TTL,
                        help="seconds an idempotency key is remembered (default 86400)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--sync", choices=("normal", "full"), default="normal",
                        help="SQLite synchronous mode: normal survives process kills, full also power loss")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                        help="shut down when process PID (the one that started this server) is gone")
    return parser


def _watch_parent(pid: int, server) -> None:
    """Shut the server down once its parent is gone: a trainer killed with SIGKILL must not leave an orphan
    holding the database (the resumed trainer's own server would be refused)."""
    import threading

    def watch() -> None:
        while not server.should_exit:
            if os.getppid() != pid:
                log.warning("parent process %d is gone: shutting down", pid)
                server.should_exit = True
                return
            threading.Event().wait(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lock_database(db: str):
    """Hold an exclusive lock on `<db>.lock` for the life of the process (released by the kernel even on
    SIGKILL): two servers writing one database would break its durability guarantees."""
    try:
        import fcntl
    except ImportError:          # not POSIX: no protection
        return None
    path = Path(f"{db}.lock")
    if not path.parent.is_dir():
        return None              # Store reports the missing folder
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise StoreError(f"database {db} is already served by another process (pid {holder}); stop it or "
                         "give another --db path") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def serve(args: argparse.Namespace) -> int:
    """Open the database, build the app and serve until SIGTERM/SIGINT. Returns the exit code."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host) and not args.token:
        log.warning("listening on %s without --token: anyone who can reach this port can read and change "
                    "the knowledge base", args.host)
    if args.max_body_bytes < 1:
        print("error: --max-body-bytes must be positive", file=sys.stderr)
        return 2
    try:
        lock = _lock_database(args.db)
        store = Store(args.db, sync=args.sync)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(store=store, idempotency=not args.no_idempotency, idempotency_ttl=args.idempotency_ttl,
                     token=args.token, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level=args.log_level,
                            access_log=args.access_log, timeout_keep_alive=5, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    if args.exit_with_parent is not None:
        _watch_parent(args.exit_with_parent, server)
    try:
        server.run()
    finally:
        store.close()
        if lock is not None:
            lock.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamtrain.server",
                                     description="Embedded KATO-compatible memory server (SQLite)")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))
