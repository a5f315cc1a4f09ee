"""Which server, and is it there: the one a config names or the embedded server started on a run's knowledge base,
its bearer token, and waiting, out loud, until it answers (``train``); a quick check and a connection for the
notebooks (``connect``)."""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import indoubt
from .client import KatoClient
from .config import ClientConfig, RunConfig
from .errors import ServerError, ServerUnavailable
from .wire import ServiceInfo

logger = logging.getLogger(__name__)


def token_for(url: str, config: RunConfig) -> str | None:
    """The bearer token of the run's server: that of an embedded server this process started at ``url`` (kept in
    memory only), else the config's ``server_token`` (or its environment variable)."""
    from .server.launcher import token_for as embedded_token

    return embedded_token(url) or config.server_token_value()


@contextmanager
def run_server(config: RunConfig) -> Iterator[tuple[str, bool]]:
    """(URL, embedded): the config's ``server_url``, or the embedded server started on the run's knowledge base
    (``<run folder>/kb.sqlite3``) for as long as the block runs.

    The embedded server gets a fresh random bearer token at each start, so no other local process can read or
    change the run's knowledge base while it trains; the run's clients find it with ``token_for``.
    """
    if config.server_url:
        yield config.server_url, False
        return
    from .rundir import RunDir
    from .server import EmbeddedServer

    rundir = RunDir(config.run_dir)
    rundir.path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # the run's own server: its key lifetime covers the journal's steps in doubt, however long ago (indoubt.py)
    extra = indoubt.embedded_server_args(rundir.journal_path)
    with EmbeddedServer(rundir.kb_path, log_path=rundir.server_log_path, token=token, extra_args=extra) as server:
        logger.info("embedded server for run %s at %s (bearer token required)", config.run_name, server.url)
        yield server.url, True


def wait_for_server(url: str, token: str | None, settings: ClientConfig,
                    stop: threading.Event | None = None) -> ServiceInfo:
    """``GET /`` until the server answers; meanwhile say what the run waits for every 2 s. Gives up after
    ``settings.retry_total_seconds`` (ServerUnavailable); a set ``stop`` event (one Ctrl-C) raises
    KeyboardInterrupt at once."""
    budget = settings.retry_total_seconds
    one_try = settings.model_copy(update={"retry_max_attempts": 1, "connect_timeout": min(2.0, settings.connect_timeout)})
    deadline = time.monotonic() + budget
    with KatoClient(url, token=token, settings=one_try) as client:
        for attempt in itertools.count(1):
            try:
                return client.info()
            except ServerUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerUnavailable(
                        f"the server at {url} did not answer within {budget:g} s ({attempt} attempts; last: {exc}). "
                        "Check that it is running and reachable, or raise client.retry_total_seconds") from None
                logger.warning("waiting for the server at %s (attempt %d, %.0f s left; Ctrl-C to stop)", url, attempt, left)
            pause = min(2.0, max(0.0, deadline - time.monotonic()))
            if stop is not None and stop.wait(pause):
                raise KeyboardInterrupt  # nothing trained yet: nothing to checkpoint
            if stop is None:
                time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# For notebooks: a given server, checked quickly, or the embedded one on a run's knowledge base


@dataclass
class Connection:
    """A client on a server, and the embedded server when this connection started one.

    Use it as a context manager (or call :meth:`close`): the client is closed and an embedded server stopped.
    """

    url: str
    client: KatoClient
    server: Any = None  # streamtrain.server.EmbeddedServer when started here
    db_path: Path | None = None

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str | None,
    db_path: str | Path | None = None,
    *,
    token: str | None = None,
    wait_seconds: float = 5.0,
    settings: ClientConfig | None = None,
) -> Connection:
    """Connect to ``url`` after a quick health check, or (``url`` None) start the embedded server on ``db_path``.

    Args:
        url: a KATO server such as ``http://127.0.0.1:8000``; None starts the embedded server.
        db_path: the embedded server's SQLite file (a run's is ``RunDir(config.run_dir).kb_path``).
        token: bearer token of the server, if any. The embedded server started here (``url`` None) gets this
            token, or a random one that only this process knows; ``url`` of an embedded server this process
            started needs no token.
        wait_seconds: how long ``GET /health`` may keep failing before giving up. Short on purpose: a notebook
            should say at once that nobody answers, not after the training retry budget of minutes.
        settings: the client's settings for everything after the health check (default: ``ClientConfig()``).

    Raises:
        ServerUnavailable: nobody answers at ``url`` within ``wait_seconds``, or the embedded server did not start.
        ConfigError: ``url`` is not an http(s) URL.
    """
    settings = settings or ClientConfig()
    if url is None:
        if db_path is None:
            raise ValueError("connect(None, db_path): give the embedded server's database path (or a server URL)")
        from .server import EmbeddedServer

        db_path = Path(db_path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        token = token or secrets.token_urlsafe(32)   # no other local process may use the server we start
        server = EmbeddedServer(db_path, token=token).start()
        return Connection(server.url, KatoClient(server.url, token=token, settings=settings), server, db_path)

    url = url.rstrip("/")
    if token is None:  # an embedded server this process started (a notebook's other connection, a trainer's)
        from .server.launcher import token_for

        token = token_for(url)
    quick = ClientConfig(
        connect_timeout=min(2.0, wait_seconds), read_timeout=min(5.0, max(wait_seconds, 0.5)),
        retry_total_seconds=wait_seconds, retry_max_attempts=50, backoff_initial=0.1, backoff_max=1.0,
    )
    probe = KatoClient(url, token=token, settings=quick)
    try:
        probe.health()
    except ServerError as exc:
        raise ServerUnavailable(
            f"no KATO server answers at {url}: GET /health failed for {wait_seconds:g} s "
            f"({_last_cause(exc)}). Start the server (for example `streamtrain serve`), fix the URL, "
            "or set server_url to None to use the embedded server."
        ) from None
    finally:
        probe.close()
    return Connection(url, KatoClient(url, token=token, settings=settings))


def _last_cause(exc: BaseException) -> str:
    cause = getattr(exc, "last_cause", None)  # ServerUnavailable carries it; no message is parsed
    return str(cause) if cause else str(exc).splitlines()[0]
