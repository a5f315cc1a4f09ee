"""The server a run talks to: the one its config names, or the embedded server started for it; its bearer token;
and waiting, out loud, until it answers."""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .client import KatoClient
from .config import ClientConfig, RunConfig
from .errors import ServerUnavailable
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
    with EmbeddedServer(rundir.kb_path, log_path=rundir.server_log_path, token=token) as server:
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
