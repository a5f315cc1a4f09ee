"""`python -m streamtrain.server` / `streamtrain serve`: run the embedded server with uvicorn (one worker)."""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from streamtrain.disk import is_storage_error, storage_message
from streamtrain.server.defaults import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    EXIT_STORAGE,
    MIN_UPLOAD_RATE,
    TOKEN_ENV,
)
from streamtrain.server.store import StoreError

log = logging.getLogger(__name__)


__all__ = ["TOKEN_ENV", "add_serve_arguments", "main", "serve"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port: give a number from 1 to 65535 (0: any free "
                                         "port)")
    return port


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default loopback; any other needs a token, or "
                             "--allow-no-token)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535, or 0 for any free one (default 8000)")
    parser.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' on every route but /health. Visible to every "
                             f"local user in the process list: prefer --token-file or ${TOKEN_ENV}")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="read the bearer token from this file (its first line; keep it mode 0600)")
    parser.add_argument("--allow-no-token", action="store_true",
                        help="serve a non-loopback --host without a token (anyone who reaches the port can read "
                             "and change every knowledge base)")
    parser.add_argument("--no-idempotency", action="store_true",
                        help="ignore Idempotency-Key headers (behave like a real KATO)")
    parser.add_argument("--idempotency-ttl", type=float, default=DEFAULT_IDEMPOTENCY_TTL,
                        help="seconds an idempotency key is remembered (default 86400)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-batch-items", type=int, default=DEFAULT_MAX_BATCH_ITEMS,
                        help=f"a learn-batch with more items gets 413 (default {DEFAULT_MAX_BATCH_ITEMS})")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                        help="seconds a request's line and headers may take to arrive; its body gets as long "
                             f"again plus its size at {MIN_UPLOAD_RATE // 1_000_000} MB/s (default "
                             f"{DEFAULT_HEADER_TIMEOUT:g})")
    parser.add_argument("--sync", choices=("normal", "full"), default="normal",
                        help="SQLite synchronous mode: normal survives process kills, full also power loss")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                        help="shut down when process PID (the one that started this server) is gone")
    parser.add_argument("--wait-for-db", type=float, default=0.0, metavar="SECONDS",
                        help="when another server holds the database, wait up to this long for it to stop (default "
                             "0: refuse at once); a trainer's server waits for the one a killed trainer left, which "
                             "stops itself within a second")
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


def _lock_database(db: str, wait_seconds: float = 0.0):
    """Hold an exclusive lock on `<db>.lock` for the life of the process (released by the kernel even on
    SIGKILL): two servers writing one database would break its durability guarantees. Held by another process,
    the lock is waited for up to ``wait_seconds`` (the server of a killed trainer stops itself within a second)."""
    try:
        import fcntl
    except ImportError:          # not POSIX: no protection
        return None
    path = Path(f"{db}.lock")
    if not path.parent.is_dir():
        return None              # Store reports the missing folder
    f = open(path, "a+")
    deadline = time.monotonic() + wait_seconds
    said = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if time.monotonic() < deadline:
                if not said:
                    log.warning("database %s is held by process %s; waiting for it to stop", db, holder)
                    said = True
                time.sleep(0.05)
                continue
            f.close()
            waited = f" for {wait_seconds:g} s" if wait_seconds > 0 else ""
            raise StoreError(f"database {db} is already served by another process (pid {holder}){waited}; stop "
                             "it or give another --db path") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class _Refused(Exception):
    """A setting the server will not start with; the message says what to do."""


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else --token-file, else $STREAMTRAIN_SERVER_TOKEN, else None."""
    if args.token is not None and args.token_file is not None:
        raise _Refused("give --token or --token-file, not both")
    if args.token is not None:
        if not args.token.strip():
            raise _Refused("--token is empty; give a token, or leave the option out")
        log.warning("--token on the command line is visible to every local user (ps); prefer --token-file or "
                    "the %s environment variable", TOKEN_ENV)
        return args.token.strip()
    if args.token_file is not None:
        path = Path(args.token_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise _Refused(f"cannot read --token-file {path}: {e}; give a readable text file holding the "
                           "token") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise _Refused(f"--token-file {path} is empty; write the token on its first line")
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0
        if mode & 0o077:
            log.warning("--token-file %s is readable by other users (mode %o); make it private: chmod 600 %s",
                        path, mode, path)
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear line, not uvicorn's traceback-like log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise _Refused(f"port {port} on {host} is already in use (another server?); stop that process or "
                           "choose another --port") from None
        if e.errno == errno.EACCES:
            raise _Refused(f"no permission to listen on port {port} of {host} (ports below 1024 need "
                           "privileges); choose another --port") from None
        raise _Refused(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    """Open the database, build the app and serve until SIGTERM/SIGINT. Returns the exit code."""
    import uvicorn

    from streamtrain.server.app import create_app
    from streamtrain.server.deadlines import deadline_protocol
    from streamtrain.server.store import Store

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = _token(args)
        if not _is_loopback(args.host) and token is None:
            if not args.allow_no_token:
                raise _Refused(
                    f"refusing to listen on {args.host} without a token: anyone who can reach the port could read "
                    f"and wipe every knowledge base. Give a token (${TOKEN_ENV}, --token-file or --token), listen "
                    "on 127.0.0.1, or pass --allow-no-token if the network is trusted")
            log.warning("listening on %s without a token (--allow-no-token): anyone who can reach this port can "
                        "read and change the knowledge base", args.host)
        if args.max_body_bytes < 1:
            raise _Refused("--max-body-bytes must be positive")
        if args.max_batch_items < 1:
            raise _Refused("--max-batch-items must be positive")
        if not args.header_timeout > 0:
            raise _Refused("--header-timeout must be positive (seconds)")
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lock = _lock_database(args.db, args.wait_for_db)
        store = Store(args.db, sync=args.sync)
    except StoreError as e:
        _say(f"error: {e}")
        return EXIT_STORAGE if e.storage else 2
    except OSError as e:  # the lock file: its disk refused the write
        if not is_storage_error(e):
            raise
        _say("error: " + storage_message(e, f"{args.db}.lock", "write the database's lock file",
                                         "What to do: free space on that disk or make it writable, then start the "
                                         "server again (a streamtrain run: run the same command again)."))
        return EXIT_STORAGE
    try:
        sock = _bind(args.host, args.port)
    except _Refused as e:
        store.close()
        if lock is not None:
            lock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(store=store, idempotency=not args.no_idempotency, idempotency_ttl=args.idempotency_ttl,
                     token=token, max_body_bytes=args.max_body_bytes, max_batch_items=args.max_batch_items)
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level=args.log_level,
                            access_log=args.access_log, timeout_keep_alive=5, timeout_graceful_shutdown=30,
                            http=deadline_protocol(args.header_timeout, args.max_body_bytes))
    server = uvicorn.Server(config)
    # What exists now (modules, the app) lives as long as the process: out of the garbage collector's sight, a full
    # collection scans only what requests made (it scanned it all, 100 ms each, a sixth of the CPU of a training run)
    gc.freeze()
    if args.exit_with_parent is not None:
        _watch_parent(args.exit_with_parent, server)
    # uvicorn re-raises the stop signal once it has shut down; SIGTERM's default action would then end the process
    # before the store is closed, leaving the knowledge base split between the database file and its WAL.
    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, SystemExit):
        pass  # the stop signal, raised again by uvicorn after its graceful shutdown
    finally:
        sock.close()
        store.close()
        if lock is not None:
            lock.close()
    return 0 if server.started else 1


def _say(message: str) -> None:
    """Why the server stops, on stderr (its log); a full disk may refuse even that: the exit status still tells
    (EXIT_STORAGE), and the launcher describes the disk itself."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamtrain.server",
                                     description="Embedded KATO-compatible memory server (SQLite)")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))
