"""The HTTP client of a KATO server: typed calls and retries (tenacity) bounded by an outage budget.

``KatoClient`` sends one call and retries it when that is safe. A failure is one of three kinds: the
request surely did not reach the application (connect errors, 429, 503: resent); it may have been applied
(read/write timeouts, dropped connections, 500/502/504: resent only for reads, idempotent writes and keyed
calls; an unkeyed observe, observe-sequence or learn raises :class:`~streamtrain.errors.MaybeApplied`); or
an answer (2xx parsed into a model of ``wire.py``; anything else a :class:`~streamtrain.errors.ProtocolError`
carrying ``status_code`` and the body's ``error_code``). This is the only module that catches httpx errors. The
request bodies are ``wire.py``'s too, and its clock is the outage tracker's (``outage.now()``).
Every failure and success is reported to an :class:`~streamtrain.client.outage.OutageTracker` (the run's, shared by
its clients, or the client's own): retries go on until the server has been failing for ``client.outage_seconds``.

The network is one constructor argument: ``http=`` takes any ``httpx.Client`` (e.g. starlette's
``TestClient(create_app(...))`` for an in-process server), ``transport=`` an httpx transport. Nothing is sent
before the first call. Learning a unit exactly once on top of this is ``exactly_once.py``; the argument for both
is docs/client.md.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import tenacity
from pydantic import BaseModel, ValidationError

from .. import wire
from ..config import ClientConfig
from ..errors import (
    ConfigError,
    ConfigRejected,
    KeyAlreadyUsed,
    MaybeApplied,
    ProtocolError,
    ServerUnavailable,
    SessionNotFound,
)
from ..limits import LEARN_BATCH_PART
from ..patterns import strip_prefix
from .extensions import EmbeddedExtensions
from .outage import OutageTracker
from .retry import (
    AMBIGUOUS_STATUS,
    SAFE_STATUS,
    SAFE_TRANSPORT,
    Transient,
    error_code,
    is_retryable,
    parse_retry_after,
    short,
    transport_outage,
)
from .tls import shared_ssl_context

log = logging.getLogger(__name__)

__all__ = ["LEARN_BATCH_PART", "KatoClient", "config_differences"]

M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------------------------------
# Session configs


def _detail(response: httpx.Response) -> str:
    """The reason an error answer gives (its JSON ``detail`` string), else its text on one line."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else short(response.text)


def _error_key(response: httpx.Response) -> str:
    """The key an error answer names (``error.key``), else ""."""
    try:
        error = wire.ErrorAnswer.model_validate_json(response.content).error
    except ValidationError:
        return ""
    return error.key or "" if error is not None else ""


def _same_value(asked: Any, got: Any) -> bool:
    if isinstance(asked, bool) or isinstance(got, bool):
        return type(asked) is type(got) and asked == got
    if isinstance(asked, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(asked, got, rel_tol=1e-9, abs_tol=1e-12)
    return bool(asked == got)


def config_differences(asked: Mapping[str, Any], effective: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Each asked-for key whose effective value differs, as key -> (asked, effective or '<absent>')."""
    return {
        k: (v, effective.get(k, "<absent>"))
        for k, v in asked.items()
        if k not in effective or not _same_value(v, effective[k])
    }


# --------------------------------------------------------------------------------------------------
# The client


class KatoClient(EmbeddedExtensions):
    """A sync KATO client: one keep-alive ``httpx.Client``, typed answers, retries within an outage budget.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: sent as ``Authorization: Bearer <token>`` when given.
        settings: timeouts and the outage budget (``ClientConfig``).
        transport: an httpx transport (tests pass ``httpx.MockTransport``).
        http: an ``httpx.Client`` to send through instead of building one (e.g. starlette's
            ``TestClient(create_app(...))``: an in-process server, no port). Its own base URL, headers and timeouts
            are kept; the token is added to its headers. ``close()`` closes it. Not together with ``transport``.
        outage: the tracker of the server's outages, shared by a run's clients (None: one of this client's own,
            with ``settings.outage_seconds``). Retries wait through its ``sleep``, so its ``abort`` stops them.

    The constructor sends nothing.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        settings: ClientConfig = ClientConfig(),
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        outage: OutageTracker | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000")
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.outage = outage if outage is not None else OutageTracker(settings.outage_seconds)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout,
            write=settings.read_timeout, pool=settings.connect_timeout,
        )
        if http is not None:
            if transport is not None:
                raise ConfigError("KatoClient takes an http client or a transport, not both")
            http.headers.update(headers)
            self._http = http
        else:
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport,
                                      verify=shared_ssl_context())

    # ---- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KatoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KatoClient({self.base_url!r})"

    def _attempt(self, method: str, path: str, content: bytes | None, params: Any,
                 headers: dict[str, str] | None) -> httpx.Response:
        """One HTTP exchange, reported to the outage tracker. Transport errors and 429/500/502/503/504 become
        ``Transient``."""
        write = method != "GET"
        try:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
        except SAFE_TRANSPORT as exc:
            self.outage.failed(transport_outage(exc), write=write)
            raise Transient(f"{type(exc).__name__}: {exc}", ambiguous=False, exc=exc) from exc
        except httpx.UnsupportedProtocol as exc:  # a wrong URL is not transient
            raise ConfigError(f"server URL {self.base_url!r} is not usable: {exc}") from exc
        except httpx.TransportError as exc:  # read/write timeouts, dropped connections: maybe applied
            self.outage.failed(transport_outage(exc), write=write)
            raise Transient(f"{type(exc).__name__}: {exc or 'no detail'}", ambiguous=True, exc=exc) from exc
        status = response.status_code
        if status in SAFE_STATUS or status in AMBIGUOUS_STATUS:
            self.outage.failed(f"answering {status}", write=write)
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if status in SAFE_STATUS else None
            raise Transient(
                f"HTTP {status} {short(response.text, 100)!r}"
                + (f" (Retry-After {response.headers.get('Retry-After')})" if retry_after is not None else ""),
                ambiguous=status in AMBIGUOUS_STATUS, retry_after=retry_after,
            )
        ended = self.outage.succeeded(write=write)
        if ended is not None:
            log.info("server %s answering again after %.1f s (it was %s)", self.base_url, ended[0], ended[1])
        return response

    def _wait(self, attempt: int, exc: BaseException | None, left: float) -> float:
        """The sleep after failed attempt number ``attempt``: exponential from backoff_initial up to backoff_max
        plus up to one backoff_initial of jitter, at least Retry-After, cut to ``left`` (of the outage budget)."""
        s = self.settings
        delay = min(s.backoff_max, s.backoff_initial * 2 ** min(attempt - 1, 64)) + random.uniform(0, s.backoff_initial)
        if isinstance(exc, Transient) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return max(0.0, min(delay, left))

    def _pause(self, attempt: int, exc: BaseException | None, failing_since: float, what: str) -> float:
        """The wait before the next attempt; the outage is announced now and then (not at every attempt)."""
        delay = self._wait(attempt, exc, self._budget_left(failing_since))
        status = self.outage.warning_due(f"server {self.base_url}")
        if status is not None:
            log.warning("%s", status)
        log.debug("%s %s: attempt %d failed (%s); retrying in %.2f s", self.base_url, what, attempt, exc, delay)
        return delay

    def _budget_left(self, failing_since: float) -> float:
        """What is left of the outage budget for a call (or a unit's resends) failing since ``failing_since`` (the
        tracker's clock): the run's outage may end sooner, and one call never retries longer than the budget, even
        when other requests succeed in between (a partial outage: a server that fails one route only)."""
        return min(self.outage.left(), self.outage.budget - (self.outage.now() - failing_since))

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        resend: bool,
    ) -> httpx.Response:
        """Send with retries; ``resend``: the call is a read or idempotent write (ambiguity is harmless).

        The first attempt goes out directly, so the common case costs no retry machinery. After a failure worth
        another, tenacity sends the rest until the outage budget is spent (and at most ``retry_max_attempts``
        attempts in all, when set)."""
        # encoded once for every attempt (4x as fast as httpx's json=): a resend is the same bytes
        content = None if json is None else wire.encode(json)
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        resend_ambiguous = resend or idempotency_key is not None
        started = self.outage.now()
        try:
            return self._attempt(method, path, content, params, headers)
        except Transient as exc:
            failed = exc
        attempts, failing_since = 1, self.outage.now()
        cap = self.settings.retry_max_attempts

        def retryable(exc: BaseException) -> bool:
            return is_retryable(exc, resend_ambiguous=resend_ambiguous)

        def spent(_: object = None) -> bool:  # the stop condition
            return self._budget_left(failing_since) <= 0 or (cap is not None and attempts >= cap)

        def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return self._attempt(method, path, content, params, headers)

        def give_up(exc: Transient) -> NoReturn:
            self._give_up(exc, f"{method} {path}", attempts, started, failing_since, resend_ambiguous)

        if not retryable(failed) or spent():
            give_up(failed)
        self.outage.sleep(self._pause(attempts, failed, failing_since, f"{method} {path}"))
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable), stop=spent, sleep=self.outage.sleep, reraise=True,
            wait=lambda state: self._pause(attempts, state.outcome.exception() if state.outcome else None,
                                           failing_since, f"{method} {path}"),
        )
        try:
            return retrying(attempt)
        except Transient as exc:
            give_up(exc)

    def _give_up(self, exc: Transient, call: str, attempts: int, started: float, failing_since: float,
                 resend_ambiguous: bool) -> NoReturn:
        """The call failed for good: MaybeApplied for an unkeyed write that may have been applied, else
        ServerUnavailable."""
        where = f"server {self.base_url}: {call} failed after {attempts} attempt(s) in {self.outage.now() - started:.1f} s"
        if exc.ambiguous and not resend_ambiguous:
            raise MaybeApplied(
                f"{where}; last cause: {exc.cause}. The request may or may not have been applied, so it "
                "was not resent (no idempotency key); decide from server state before sending it again",
                attempts=attempts, last_cause=exc.cause,
            ) from (exc.exc or exc)
        raise ServerUnavailable(
            f"{where}: {self._why_given_up(failing_since)}; last cause: {exc.cause}. {self._what_to_do()}",
            attempts=attempts, last_cause=exc.cause,
        ) from (exc.exc or exc)

    def _why_given_up(self, failing_since: float) -> str:
        if self.outage.spent():
            return self.outage.past_budget()
        if self._budget_left(failing_since) <= 0:
            return self.outage.past_budget(since=failing_since)
        return f"client.retry_max_attempts ({self.settings.retry_max_attempts}) reached"

    def _what_to_do(self) -> str:
        return ("Check the server (is it running and reachable? its log, its disk), then run the same command "
                "again: the run resumes exactly where it stopped. To ride out longer outages, raise "
                "client.outage_seconds")

    def pause_before_resend(self, resends: int, last_cause: str, failing_since: float) -> None:
        """Before sending again a request that went unanswered and that server state showed was not applied:
        wait as a retry would, or raise ServerUnavailable once the budget is spent (the outage's, or the budget
        counted from ``failing_since``, the tracker's ``now()`` at the first lost answer; or ``retry_max_attempts``
        sends in all). ``resends``: how many times it was resent so far. ``exactly_once.NodeSession`` calls it."""
        cap = self.settings.retry_max_attempts
        if self._budget_left(failing_since) <= 0 or (cap is not None and resends + 1 >= cap):
            raise ServerUnavailable(
                f"server {self.base_url}: a request kept going unanswered ({resends + 1} times; each time server "
                f"state showed it was not applied): {self._why_given_up(failing_since)}; last cause: {last_cause}. "
                f"{self._what_to_do()}", attempts=resends + 1, last_cause=last_cause,
            )
        self.outage.sleep(self._pause(resends + 1, None, failing_since, "resend"))

    def _answer(self, response: httpx.Response, model: type[M], call: str, session_id: str | None = None) -> M:
        """Turn an answer into ``model``, or raise the error the status means."""
        status = response.status_code
        if 200 <= status < 300:
            try:
                return model.model_validate_json(response.content)
            except (ValueError, ValidationError) as exc:
                raise ProtocolError(
                    f"server {self.base_url}: {call} answered {status} with a body that is not a valid "
                    f"{model.__name__}: {short(str(exc))}; body: {short(response.text)}"
                ) from exc
        code = error_code(response)
        if status == 404 and session_id is not None and code == "SESSION_NOT_FOUND":
            raise SessionNotFound(
                f"server {self.base_url}: {call}: session {session_id} not found or expired (404)", session_id
            )
        if status == 507:  # the server cannot write its storage: its whole reason names the disk and what to do
            raise ProtocolError(f"server {self.base_url}: {call} answered HTTP 507 Insufficient Storage: "
                                f"{_detail(response)}", status_code=status, error_code=code)
        hint = ("; check the bearer token (server_token in the run config, or $STREAMTRAIN_SERVER_TOKEN)"
                if status in (401, 403) else "; a resend would not help: check the server" if status >= 500 else "")
        raise ProtocolError(
            f"server {self.base_url}: {call} answered HTTP {status}: {short(response.text)}{hint}",
            status_code=status, error_code=code,
        )

    def _get(self, path: str, model: type[M], *, params: Mapping[str, Any] | None = None,
             session_id: str | None = None) -> M:
        return self._answer(self._request("GET", path, params=params, resend=True), model, f"GET {path}", session_id)

    def _post(self, path: str, model: type[M], *, json: Any = None, params: Mapping[str, Any] | None = None,
              session_id: str | None = None, resend: bool, idempotency_key: str | None = None) -> M:
        response = self._request("POST", path, json=json, params=params, resend=resend,
                                 idempotency_key=idempotency_key)
        if response.status_code == 422 and error_code(response) in wire.KEY_REUSED_CODES:
            # the request's Idempotency-Key, or the batch key a learn-batches answer names
            key = idempotency_key or _error_key(response)
            raise KeyAlreadyUsed(
                f"server {self.base_url}: POST {path}: {'Idempotency-Key' if idempotency_key else 'batch key'} "
                f"{key!r} was already used for another request: {short(response.text)}", key=key,
            )
        return self._answer(response, model, f"POST {path}", session_id)

    @staticmethod
    def _s(session_id: str) -> str:
        return f"/sessions/{quote(session_id, safe='')}"

    # ---- service ----------------------------------------------------------------------------------

    def info(self) -> wire.ServiceInfo:
        """``GET /``: the service description (the embedded server adds ``idempotency``)."""
        return self._get("/", wire.ServiceInfo)

    @cached_property
    def supports_idempotency(self) -> bool:
        """Whether the server honours ``Idempotency-Key`` (asked once, then cached)."""
        return self.info().idempotency

    @cached_property
    def supports_learn_batch(self) -> bool:
        """Whether the server offers ``POST /learn-batch`` with idempotency keys (the embedded server does)."""
        info = self.info()
        return info.idempotency and "learn-batch" in info.extensions

    def health(self) -> wire.Health:
        return self._get("/health", wire.Health)

    # ---- sessions ---------------------------------------------------------------------------------

    def create_session(self, node_id: str, config: Mapping[str, Any] | None = None,
                       ttl_seconds: int | None = None) -> wire.SessionInfo:
        """Create a session and check that the server took every config value asked for.

        A retry after a lost answer can leave an orphan session, which is harmless: it holds an empty STM
        and expires. Raises ConfigRejected naming the keys whose effective value differs. A real KATO
        silently drops a whole config when one value is invalid (kato-api.md §4).
        """
        response = self._request("POST", "/sessions", json=wire.session_body(node_id, config, ttl_seconds), resend=True)
        if response.status_code == 400 and config:  # a compatible server may refuse instead of dropping
            raise ConfigRejected(
                f"server {self.base_url}: POST /sessions for node {node_id!r} rejected the config "
                f"{dict(config)!r}: {short(response.text)}; fix the invalid value(s)"
            )
        info = self._answer(response, wire.SessionInfo, "POST /sessions")
        diffs = config_differences(config or {}, info.session_config)
        if diffs:
            self.delete_session_quietly(info.session_id)
            listed = "; ".join(f"{k}: asked {a!r}, server has {g!r}" for k, (a, g) in diffs.items())
            raise ConfigRejected(
                f"server {self.base_url}: POST /sessions for node {node_id!r} did not apply the asked config "
                f"(rejected keys: {', '.join(diffs)}): {listed}. The server ignored or changed these values (a real "
                "KATO drops the whole config when any value is invalid, and ignores unknown keys); fix or remove them"
            )
        return info

    def get_session(self, session_id: str) -> wire.SessionInfo:
        try:
            return self._get(self._s(session_id), wire.SessionInfo, session_id=session_id)
        except ProtocolError as exc:
            if exc.status_code != 404:
                raise
            # the route IS the session: KATO answers FastAPI's {"detail": ...} here, without an error code
            raise SessionNotFound(
                f"server {self.base_url}: GET {self._s(session_id)}: session {session_id} not found or expired (404)",
                session_id,
            ) from exc

    def delete_session(self, session_id: str) -> bool:
        """Delete a session; False when it was already gone (e.g. a retried delete)."""
        try:
            self._request_checked("DELETE", self._s(session_id), session_id)
        except SessionNotFound:
            return False
        return True

    def delete_session_quietly(self, session_id: str) -> None:
        """Best-effort delete: a failure is logged, never raised (the session expires anyway)."""
        try:
            self.delete_session(session_id)
        except Exception as exc:
            log.warning("could not delete session %s on %s: %s", session_id, self.base_url, exc)

    def _request_checked(self, method: str, path: str, session_id: str) -> wire.StatusResult:
        response = self._request(method, path, resend=True)
        if response.status_code == 404 and path == self._s(session_id):  # the route is the session (KATO: no code)
            raise SessionNotFound(f"server {self.base_url}: {method} {path}: session {session_id} not found (404)",
                                  session_id)
        return self._answer(response, wire.StatusResult, f"{method} {path}", session_id)

    def session_exists(self, session_id: str) -> bool:
        return self._get(f"{self._s(session_id)}/exists", wire.SessionExists).exists

    def extend_session(self, session_id: str, ttl_seconds: int = 3600) -> wire.ExtendResult:
        return self._post(f"{self._s(session_id)}/extend", wire.ExtendResult, params={"ttl_seconds": ttl_seconds},
                          session_id=session_id, resend=True)

    def get_config(self, session_id: str) -> dict[str, Any]:
        return self._get(f"{self._s(session_id)}/config", wire.SessionConfig, session_id=session_id).config

    def update_config(self, session_id: str, config: Mapping[str, Any]) -> None:
        """Change a session's config. A 400 (invalid value; nothing applied) raises ConfigRejected."""
        path = f"{self._s(session_id)}/config"
        response = self._request("POST", path, json=wire.config_body(config), resend=True)
        if response.status_code == 400:
            raise ConfigRejected(
                f"server {self.base_url}: POST {path} rejected the config {dict(config)!r}: {short(response.text)}"
            )
        self._answer(response, wire.StatusResult, f"POST {path}", session_id)

    # ---- STM and learning -------------------------------------------------------------------------

    def observe(self, session_id: str, strings: Sequence[str], emotives: Mapping[str, float] | None = None,
                metadata: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None) -> wire.ObserveResult:
        """Append one event. Without a key, an ambiguous failure raises MaybeApplied (never resent)."""
        return self._post(f"{self._s(session_id)}/observe", wire.ObserveResult,
                          json=wire.observation_body(strings, emotives, metadata), session_id=session_id,
                          resend=False, idempotency_key=idempotency_key)

    def observe_sequence(
        self,
        session_id: str,
        observations: Sequence[Sequence[str] | Mapping[str, Any]],
        *,
        learn_after_each: bool = False,
        learn_at_end: bool = False,
        clear_stm_between: bool = False,
        idempotency_key: str | None = None,
    ) -> wire.ObserveSequenceResult:
        """Observe several events in one request. An item is a list of strings or a full observation dict."""
        body = wire.observation_sequence_body(observations, learn_after_each=learn_after_each,
                                              learn_at_end=learn_at_end, clear_stm_between=clear_stm_between)
        return self._post(f"{self._s(session_id)}/observe-sequence", wire.ObserveSequenceResult, json=body,
                          session_id=session_id, resend=False, idempotency_key=idempotency_key)

    def learn(self, session_id: str, idempotency_key: str | None = None) -> wire.LearnResult:
        """Learn the STM as one pattern (the STM is cleared). Unkeyed and ambiguous: MaybeApplied."""
        return self._post(f"{self._s(session_id)}/learn", wire.LearnResult, session_id=session_id, resend=False,
                          idempotency_key=idempotency_key)

    def clear_stm(self, session_id: str) -> None:
        self._post(f"{self._s(session_id)}/clear-stm", wire.StatusResult, session_id=session_id, resend=True)

    def clear_all(self, session_id: str) -> None:
        """Clear this session's STM AND the node's whole knowledge base (every session of the node)."""
        self._post(f"{self._s(session_id)}/clear-all", wire.StatusResult, session_id=session_id, resend=True)

    def stm(self, session_id: str) -> list[list[str]]:
        return self._get(f"{self._s(session_id)}/stm", wire.StmResult, session_id=session_id).stm

    def cognition(self, session_id: str) -> tuple[int, list[list[str]]]:
        """``GET cognition-data``: the session's observation counter (``time``) and its STM, read together."""
        data = self._get(f"{self._s(session_id)}/cognition-data", wire.CognitionResult, session_id=session_id).cognition_data
        return data.time, data.short_term_memory

    def predictions(self, session_id: str) -> wire.PredictionsResult:
        return self._get(f"{self._s(session_id)}/predictions", wire.PredictionsResult, session_id=session_id)

    # ---- knowledge base ---------------------------------------------------------------------------

    def pattern(self, node_id: str, name: str) -> wire.PatternInfo | None:
        """A stored pattern (name with or without ``PTRN|``), or None when the node has none by that name."""
        path = f"/pattern/{quote(strip_prefix(name), safe='')}"
        response = self._request("GET", path, params={"node_id": node_id}, resend=True)
        if response.status_code == 404:  # dead code in KATO, but a compatible server may use it
            return None
        found = self._answer(response, wire.PatternAnswer, f"GET {path}")
        if found.pattern.status == "error":  # KATO's "not found" is 200 with status "error"
            return None
        if found.pattern.pattern is None:
            raise ProtocolError(f"server {self.base_url}: GET {path} answered status {found.pattern.status!r} "
                                f"without a pattern: {short(response.text)}")
        return found.pattern.pattern.model_copy(update={"kb_id": found.node_id})

    def learn_batch(self, items: Sequence[tuple[str, Sequence[Sequence[str]]]], idempotency_key: str) -> list[str]:
        """Learn each ``(node_id, events)`` as one pattern, in order, in one request and one transaction
        (embedded server extension ``POST /learn-batch``). Keyed, so a retry after any failure is harmless:
        the server applies the batch once and answers a replay with its stored answer. Returns the names.

        More than ``LEARN_BATCH_PART`` items (a huge sample; the server accepts 20,000 by default) go in parts of
        that size, in order, part ``i`` keyed ``<key>/<i>``: the split depends on the items alone, so a resend after
        a crash sends the same parts under the same keys, and each part is applied once."""
        if len(items) > LEARN_BATCH_PART:
            names: list[str] = []
            for i, start in enumerate(range(0, len(items), LEARN_BATCH_PART)):
                names += self.learn_batch(items[start:start + LEARN_BATCH_PART], f"{idempotency_key}/{i}")
            return names
        return self._post("/learn-batch", wire.LearnBatchResult, json=wire.learn_batch_body(items), resend=True,
                          idempotency_key=idempotency_key).patterns
