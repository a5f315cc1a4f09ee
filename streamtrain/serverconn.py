"""Which server, and is it there: the one a config names or the embedded server started on a run's knowledge base
(watched, and restarted when it dies), its bearer token, and waiting, out loud, until it answers (``train``); a quick
check and a connection for the notebooks (``connect``)."""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import indoubt
from .client import KatoClient
from .client.outage import OutageTracker
from .config import ClientConfig, RunConfig
from .errors import ServerError, ServerUnavailable, StreamtrainError
from .wire import ServiceInfo

logger = logging.getLogger(__name__)


def token_for(url: str, config: RunConfig) -> str | None:
    """The bearer token of the run's server: that of an embedded server this process started at ``url`` (kept in
    memory only), else the config's ``server_token`` (or its environment variable)."""
    from .server.launcher import token_for as embedded_token

    return embedded_token(url) or config.server_token_value()


@contextmanager
def run_server(config: RunConfig,
               on_lost: Callable[[StreamtrainError], None] = lambda exc: None) -> Iterator[tuple[str, bool]]:
    """(URL, embedded): the config's ``server_url``, or the embedded server started on the run's knowledge base
    (``<run folder>/kb.sqlite3``) for as long as the block runs, kept alive by a ``ServerKeeper``; ``on_lost`` is
    called (from the keeper's thread) with the cause when it died and cannot be restarted.

    The embedded server gets a fresh random bearer token (kept across its restarts), so no other local process can
    read or change the run's knowledge base while it trains; the run's clients find it with ``token_for``.
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
    server = EmbeddedServer(rundir.kb_path, log_path=rundir.server_log_path, token=token, extra_args=extra).start()
    keeper = ServerKeeper(server, on_lost)
    try:
        logger.info("embedded server for run %s at %s (bearer token required)", config.run_name, server.url)
        yield server.url, True
    finally:
        keeper.close()


# A call restarts its embedded server at most this often: a server that keeps dying (a full disk, a bad build) stops
# the run with its cause instead of flapping.
MAX_SERVER_RESTARTS = 5


class ServerKeeper:
    """The trainer owns its embedded server's life: a thread waits on the child, and an exit that ``close`` did not
    ask for is said at once (ERROR: how it ended, the path of its log) and answered with a restart on the same
    database and port (same token), at most ``max_restarts`` times. The run goes on exactly: the workers' clients
    resend what the dead server refused or left unanswered (keys, or the counter protocol decide), and the knowledge
    base is the same file. A server that cannot be restarted, or that died once too often, is reported to
    ``on_lost`` with the cause (how it ended, the end of its log), which stops the run at once.
    """

    def __init__(self, server: Any, on_lost: Callable[[StreamtrainError], None],
                 max_restarts: int = MAX_SERVER_RESTARTS, *, owner: str = "the run's",
                 scope: str = "this call") -> None:
        self.server, self.on_lost, self.max_restarts = server, on_lost, max_restarts
        self.owner, self.scope = owner, scope  # for messages: whose server, and over what the restarts count
        self.restarts = 0
        self._closed = False
        self._lock = threading.Lock()  # a restart and close() never overlap: close() stops the server restarted last
        self._thread = threading.Thread(target=self._watch, name="streamtrain-server-keeper", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            with self._lock:
                proc = self.server.process
                if self._closed or proc is None:
                    return
            code = proc.wait()
            with self._lock:
                if self._closed:
                    return  # close() stopped it
                lost = self._restart(proc.pid, code)
            if lost is not None:
                self.on_lost(lost)
                return

    def _restart(self, pid: int, code: int) -> ServerUnavailable | None:
        """Start the server again after its unexpected exit; the error that ends the run when that fails."""
        from .server.launcher import describe_exit

        server, how = self.server, describe_exit(code)
        logger.error("%s embedded server (pid %d, %s) exited unexpectedly (%s); its log: %s",
                     self.owner, pid, server.url, how, server.log_path)
        if self.restarts >= self.max_restarts:
            return ServerUnavailable(
                f"{self.owner} embedded server exited unexpectedly ({how}) after {self.restarts} restart(s) in "
                f"{self.scope}: not restarting it again. Its log {server.log_path} ends with:\n{server.log_tail()}")
        self.restarts += 1
        logger.warning("restarting the embedded server on %s, port %d (restart %d of at most %d in %s)",
                       server.db_path, server.port, self.restarts, self.max_restarts, self.scope)
        try:
            server.start()
        except ServerUnavailable as exc:  # the run stops with this message: not logged twice
            return ServerUnavailable(
                f"{self.owner} embedded server exited unexpectedly ({how}) and could not be restarted on "
                f"{server.db_path}: {exc}")
        logger.warning("embedded server restarted at %s (pid %s); %s goes on", server.url, server.pid, self.scope)
        return None

    def close(self) -> None:
        """Stop watching, then stop the server (after a restart in progress, if any)."""
        with self._lock:
            self._closed = True
        self.server.stop()
        self._thread.join(timeout=5)


def wait_for_server(url: str, token: str | None, settings: ClientConfig, stop: threading.Event | None = None,
                    outage: OutageTracker | None = None) -> ServiceInfo:
    """``GET /`` until the server answers; meanwhile say what the run waits for every 2 s. Gives up once the
    server has failed for ``settings.outage_seconds`` (ServerUnavailable), counted by ``outage`` (the run's tracker,
    shared with its later calls; None: one of its own); a set ``stop`` event (one Ctrl-C) raises KeyboardInterrupt
    at once."""
    outage = outage if outage is not None else OutageTracker(settings.outage_seconds)
    one_try = settings.model_copy(update={"retry_max_attempts": 1, "connect_timeout": min(2.0, settings.connect_timeout)})
    with KatoClient(url, token=token, settings=one_try, outage=outage) as client:
        for attempt in itertools.count(1):
            try:
                return client.info()
            except ServerUnavailable as exc:
                outage.check()  # the run was aborted (its embedded server lost for good): its cause
                if outage.spent():
                    raise ServerUnavailable(
                        f"the server at {url} did not answer within {outage.budget:g} s: {outage.past_budget()} "
                        f"({attempt} attempts; last cause: {exc.last_cause}). Check that it is running and reachable "
                        "(the URL, its log), or raise client.outage_seconds", attempts=attempt,
                        last_cause=exc.last_cause) from None
                logger.warning("waiting for the server at %s: %s (Ctrl-C to stop)", url,
                               outage.status(blips=True) or exc.last_cause)
            pause = min(2.0, outage.left())
            if stop is None:
                outage.sleep(pause)
            elif stop.wait(pause):
                raise KeyboardInterrupt  # nothing trained yet: nothing to checkpoint
            outage.check()  # the run was aborted
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
    keeper: ServerKeeper | None = None  # restarts that server when it dies (a notebook outlives many such events)

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def close(self) -> None:
        self.client.close()
        if self.keeper is not None:
            self.keeper.close()  # stops the server too
            self.keeper = None
        elif self.server is not None:
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
        # the notebook's server outlives cells: one that dies (OOM, a kill) is restarted on the same database and
        # port, as a trainer's is; one that cannot be restarted is said, and the next call says it is gone
        keeper = ServerKeeper(server, lambda exc: logger.error("%s", exc), owner="the notebook connection's",
                              scope="this connection")
        return Connection(server.url, KatoClient(server.url, token=token, settings=settings), server, db_path, keeper)

    url = url.rstrip("/")
    if token is None:  # an embedded server this process started (a notebook's other connection, a trainer's)
        from .server.launcher import token_for

        token = token_for(url)
    quick = ClientConfig(
        connect_timeout=min(2.0, wait_seconds), read_timeout=min(5.0, max(wait_seconds, 0.5)),
        outage_seconds=wait_seconds, backoff_initial=0.1, backoff_max=1.0,
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
