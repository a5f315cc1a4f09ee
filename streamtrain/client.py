"""The KATO client: typed calls, bounded retries, and learning each unit exactly once.

Two layers live here.

``KatoClient`` sends one HTTP call and retries it with tenacity when that is safe. Every failure
falls into one of three kinds:

* the request certainly did not reach the application: a connect error, a pool timeout, ``429`` or
  ``503`` (uvicorn's ``--limit-concurrency`` answers 503 before the app runs). It is always safe to
  resend.
* the request may have been applied: a read or write timeout, a connection dropped after sending,
  or ``502``/``504`` from a proxy. This is **ambiguous**. Reads, effectively idempotent writes
  (clear-stm, config, delete, extend, session creation, which at worst leaves an orphan session)
  and calls that carry an ``Idempotency-Key`` are resent. An unkeyed ``observe``,
  ``observe-sequence`` or ``learn`` is **never** resent blindly: the client raises
  :class:`MaybeApplied` (an :class:`~streamtrain.errors.AmbiguousEffect`) and lets
  ``NodeSession`` decide from server state.
* an answer: 2xx is parsed into a pydantic model. ``404 SESSION_NOT_FOUND`` raises
  :class:`SessionNotFound` (a :class:`~streamtrain.errors.SessionLost`). Any other status
  (400, 404, 422, 500, ...) raises :class:`~streamtrain.errors.ProtocolError` without a retry.

Each call stops after ``retry_max_attempts`` attempts or once ``retry_total_seconds`` have passed.
The last sleep is cut to fit the budget, so a call gives up at most one attempt's timeout after the
budget ends. ``Retry-After`` on 429/503 is honoured, up to the remaining budget.

Exactly once: the argument
--------------------------
A *unit* is a list of events that must become ONE learned pattern, counted once, in the node's
knowledge base. ``NodeSession.learn_unit`` has two protocols.

**keys mode** (the server's ``GET /`` says ``"idempotency": true``). The whole unit is ONE request:
``observe-sequence(events, learn_at_end=True)`` with ``Idempotency-Key: <key>``. The server applies a
key at most once. A repeat with the same key and body gets the stored first answer and changes
nothing. So resending after *any* failure is safe. The key is deterministic in (run, node, raw sample
index, level, unit index), so a trainer that crashed and resends the unit also gets the stored answer.
A 404 answer is not stored, so after a lost session the same key is sent to a fresh session.
If the key was already applied under another session (a trainer resuming after its crash, with new
sessions), the embedded server refuses it with 422 because the path differs. That refusal proves the
unit was applied. The pattern's presence is checked as a sanity check, and the unit counts as learned.
Limits: the server forgets keys after its TTL. A unit resent after that is applied again. The
guarantee also depends on the server writing the key and the effect in one transaction.

**verify mode** (a real KATO, which has no idempotency; kato-api.md §6). The session config must have
``max_pattern_length=0``. Then an observe-sequence without learn flags changes only the session's STM
and never the knowledge base (§5.2-5.3). The steps:

1. Start from an STM known to be empty: a fresh session, the previous unit's successful learn (a learn
   always clears the STM, §5.4), or an explicit ``clear-stm`` (idempotent).
2. ``on_phase("observe", sid)``, then ``observe-sequence(events)``. If its answer is lost, the STM is
   either empty or holds the events once. ``clear-stm`` and a resend repair both cases, and the
   knowledge base was never touched. After a repair the STM is read back and must equal the events
   before anything is learned.
3. ``on_phase("learn", sid)``, then ``learn``. This is the only request that changes the knowledge
   base. If its answer is lost, ``GET stm`` decides. Learn clears the STM, and nothing else in this
   session can empty it in between, so an empty STM means applied and an STM equal to the events
   means not applied (resend). Anything else is a ProtocolError.
4. ``404 SESSION_NOT_FOUND`` on any step proves that request was not applied (the server checks the
   session before it acts). A new session is created with the same node and config, and the unit is
   redone from its clean STM. It is never replayed onto a half-filled STM.
5. A learn whose answer was lost, and whose session then vanished (expiry or restart between the two
   requests), leaves no STM to read. ``GET /pattern`` decides only one way. An absent pattern means
   not applied, so the unit is redone. A present pattern may come from this learn or from an earlier
   unit with the same content, so :class:`~streamtrain.errors.AmbiguousEffect` is raised. Nothing is
   guessed.

Every learn answer is checked against ``pattern_name(sorted events)``. A mismatch means the STM held
something else, and raises ProtocolError.

Limits of verify mode: (a) a request the server holds for longer than the client's read timeout and
then applies after the client's check cannot be told apart from a lost one. The read timeout must
therefore exceed the server's worst-case handling time (KATO's learn takes milliseconds; the default
read timeout is 30 s). (b) Nobody else may use the session. (c) The case in step 5 raises.
``on_phase`` is called before each mutating request. A trainer that journals it can decide after its
own crash with :func:`unit_took_effect`.

With auto-learn on (``max_pattern_length > 0``) an observe-sequence writes patterns itself, so a lost
answer cannot be repaired by clear-and-resend. ``NodeSession`` refuses such a config. The trainer cuts
units itself instead (``LayerConfig.session_config``).
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import tenacity
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ClientConfig
from .errors import (
    AmbiguousEffect,
    ConfigError,
    ConfigRejected,
    ProtocolError,
    ServerUnavailable,
    SessionLost,
)
from .patterns import pattern_name, sort_event, strip_prefix

log = logging.getLogger(__name__)

__all__ = [
    "KatoClient",
    "NodeSession",
    "unit_took_effect",
    "is_retryable",
    "MaybeApplied",
    "SessionNotFound",
    "KeyAlreadyUsed",
]


# --------------------------------------------------------------------------------------------------
# Response models (extra fields allowed: KATO returns more than a training client reads)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class ServiceInfo(_Model):
    service: str = ""
    version: str = ""
    status: str = ""
    session_support: bool = True
    idempotency: bool = False  # only the embedded server sends it; a real KATO has none
    extensions: list[str] = []  # the embedded server's extra endpoints ("nodes", "learn-batch")
    database_id: str | None = None  # the embedded server's id of its database file (a real KATO has none)


class Health(_Model):
    status: str


class SessionInfo(_Model):
    session_id: str
    node_id: str
    created_at: str | None = None
    expires_at: str | None = None
    ttl_seconds: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    session_config: dict[str, Any] = Field(default_factory=dict)


class SessionExists(_Model):
    exists: bool
    expired: bool = False
    session_id: str


class ExtendResult(_Model):
    status: str
    session_id: str
    ttl_seconds: int | None = None


class SessionConfig(_Model):
    session_id: str
    config: dict[str, Any]


class StatusResult(_Model):
    status: str
    session_id: str | None = None


class ObserveResult(_Model):
    status: str
    session_id: str | None = None
    stm_length: int
    time: int
    unique_id: str | None = None
    auto_learned_pattern: str | None = None


class SequenceItem(_Model):
    status: str
    sequence_position: int
    stm_length: int
    time: int
    unique_id: str | None = None
    auto_learned_pattern: str | None = None


class ObserveSequenceResult(_Model):
    status: str
    observations_processed: int
    initial_stm_length: int
    final_stm_length: int
    results: list[SequenceItem] = Field(default_factory=list)
    auto_learned_patterns: list[str] = Field(default_factory=list)
    final_learned_pattern: str | None = None


class LearnResult(_Model):
    status: str
    pattern_name: str
    session_id: str | None = None


class StmResult(_Model):
    stm: list[list[str]]
    session_id: str | None = None
    length: int | None = None


class PredictionsResult(_Model):
    predictions: list[dict[str, Any]]
    future_potentials: list[dict[str, Any]] | None = None
    session_id: str | None = None
    count: int | None = None


class PatternInfo(_Model):
    name: str
    pattern_data: list[list[str]]
    length: int | None = None
    frequency: int
    kb_id: str | None = None  # the response's node_id, which is the kb_id


class NodeInfo(_Model):
    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int


class NodePattern(_Model):
    name: str
    pattern_data: list[list[str]]
    frequency: int


class NodePatternsPage(_Model):
    node_id: str
    kb_id: str
    total: int
    offset: int
    limit: int
    patterns: list[NodePattern]


class NodeStats(_Model):
    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int
    distinct_symbols: int


M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------------------------------
# Errors internal to the retry layer, and the two public subclasses NodeSession catches


class MaybeApplied(AmbiguousEffect):
    """An unkeyed mutating request went unanswered in a way that may have reached the server.

    The client did not resend it. ``NodeSession`` decides from server state. A direct caller gets an
    honest AmbiguousEffect.
    """


class SessionNotFound(SessionLost):
    """The server answered 404 SESSION_NOT_FOUND: the session expired or was never there.

    A 404 answer proves the request was not applied.
    """

    def __init__(self, message: str, session_id: str) -> None:
        super().__init__(message)
        self.session_id = session_id


class KeyAlreadyUsed(ProtocolError):
    """A keyed request was refused because its key was already applied to a different request.

    The embedded server fingerprints method, path and body. The same unit sent to a new session (a
    trainer resuming after its crash) has another path, so the refusal means the key was applied,
    under another session.
    """


class _Transient(Exception):
    """One failed attempt that may be worth another. ``ambiguous``: the request may have been applied."""

    def __init__(self, cause: str, *, ambiguous: bool, retry_after: float | None = None,
                 exc: BaseException | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.ambiguous = ambiguous
        self.retry_after = retry_after
        self.exc = exc


_SAFE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # never sent
_SAFE_STATUS = {429, 503}  # answered before the application ran
_AMBIGUOUS_STATUS = {502, 504}  # a proxy gave up; upstream may have applied it


def is_retryable(exc: BaseException, *, resend_ambiguous: bool) -> bool:
    """Whether a failed attempt may be sent again.

    Args:
        exc: the failed attempt, as raised inside the retry loop.
        resend_ambiguous: true for reads, idempotent writes and keyed calls, which may be resent even when
            the first copy could have been applied.
    """
    if not isinstance(exc, _Transient):
        return False  # answers (4xx, 500, bad bodies) and programming errors are final
    return resend_ambiguous or not exc.ambiguous


def parse_retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - now()).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


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


class KatoClient:
    """A sync KATO client: one keep-alive ``httpx.Client``, typed answers, bounded retries.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        token: sent as ``Authorization: Bearer <token>`` when given.
        settings: timeouts and the retry budget (``ClientConfig``).
        transport: an httpx transport (tests pass ``httpx.MockTransport``).
        sleep: how the retry loop waits (tests may record instead).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        settings: ClientConfig = ClientConfig(),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000")
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout,
            write=settings.read_timeout, pool=settings.connect_timeout,
        )
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        # Exponential from backoff_initial up to backoff_max, plus up to one backoff_initial of jitter
        self._backoff = tenacity.wait_exponential(multiplier=settings.backoff_initial, max=settings.backoff_max) \
            + tenacity.wait_random(0, settings.backoff_initial)

    # ---- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KatoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KatoClient({self.base_url!r})"

    def _attempt(self, method: str, path: str, json: Any, params: Any, headers: dict[str, str]) -> httpx.Response:
        """One HTTP exchange. Transport errors and 429/502/503/504 become ``_Transient``."""
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except _SAFE_TRANSPORT as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}", ambiguous=False, exc=exc) from exc
        except httpx.UnsupportedProtocol as exc:  # a wrong URL is not transient
            raise ConfigError(f"server URL {self.base_url!r} is not usable: {exc}") from exc
        except httpx.TransportError as exc:  # read/write timeouts, dropped connections: maybe applied
            raise _Transient(f"{type(exc).__name__}: {exc or 'no detail'}", ambiguous=True, exc=exc) from exc
        status = response.status_code
        if status in _SAFE_STATUS or status in _AMBIGUOUS_STATUS:
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if status in _SAFE_STATUS else None
            raise _Transient(
                f"HTTP {status} {_short(response.text, 100)!r}"
                + (f" (Retry-After {response.headers.get('Retry-After')})" if retry_after is not None else ""),
                ambiguous=status in _AMBIGUOUS_STATUS, retry_after=retry_after,
            )
        return response

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Exponential backoff with jitter, at least Retry-After, cut to the remaining budget."""
        delay = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        remaining = self.settings.retry_total_seconds - (state.seconds_since_start or 0.0)
        return max(0.0, min(delay, remaining))

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
        """Send with retries; ``resend``: the call is a read or idempotent write (ambiguity is harmless)."""
        call = f"{method} {path}"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        resend_ambiguous = resend or idempotency_key is not None
        started = time.monotonic()
        attempts = 0

        def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return self._attempt(method, path, json, params, headers)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("%s %s: attempt %d failed (%s); retrying in %.2f s",
                     self.base_url, call, state.attempt_number, exc, state.upcoming_sleep)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: is_retryable(e, resend_ambiguous=resend_ambiguous)),
            stop=tenacity.stop_after_attempt(self.settings.retry_max_attempts)
            | tenacity.stop_after_delay(self.settings.retry_total_seconds),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Transient as exc:
            spent = time.monotonic() - started
            where = f"server {self.base_url}: {call} failed after {attempts} attempt(s) in {spent:.1f} s"
            if exc.ambiguous and not resend_ambiguous:
                raise MaybeApplied(
                    f"{where}; last cause: {exc.cause}. The request may or may not have been applied, so it "
                    "was not resent (no idempotency key); decide from server state before sending it again"
                ) from (exc.exc or exc)
            raise ServerUnavailable(
                f"{where} (budget: {self.settings.retry_max_attempts} attempts, "
                f"{self.settings.retry_total_seconds:g} s); last cause: {exc.cause}. "
                "Check that the server is running and reachable, or raise client.retry_total_seconds"
            ) from (exc.exc or exc)

    def _answer(self, response: httpx.Response, model: type[M], call: str, session_id: str | None = None) -> M:
        """Turn an answer into ``model``, or raise the error the status means."""
        status = response.status_code
        if 200 <= status < 300:
            try:
                return model.model_validate(response.json())
            except (ValueError, ValidationError) as exc:
                raise ProtocolError(
                    f"server {self.base_url}: {call} answered {status} with a body that is not a valid "
                    f"{model.__name__}: {_short(str(exc))}; body: {_short(response.text)}"
                ) from exc
        if status == 404 and session_id is not None and self._is_session_not_found(response):
            raise SessionNotFound(
                f"server {self.base_url}: {call}: session {session_id} not found or expired (404)", session_id
            )
        hint = ("; check the bearer token (server_token in the run config, or $STREAMTRAIN_SERVER_TOKEN)"
                if status in (401, 403) else "")
        raise ProtocolError(
            f"server {self.base_url}: {call} answered HTTP {status}: {_short(response.text)}{hint}",
            status_code=status,
        )

    @staticmethod
    def _is_session_not_found(response: httpx.Response) -> bool:
        try:
            body = response.json()
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        error = body.get("error")
        if isinstance(error, dict) and error.get("code") == "SESSION_NOT_FOUND":
            return True
        detail = body.get("detail")  # GET /sessions/{id} uses FastAPI's default body
        return isinstance(detail, str) and "not found or expired" in detail

    def _get(self, path: str, model: type[M], *, params: Mapping[str, Any] | None = None,
             session_id: str | None = None) -> M:
        return self._answer(self._request("GET", path, params=params, resend=True), model, f"GET {path}", session_id)

    def _post(self, path: str, model: type[M], *, json: Any = None, params: Mapping[str, Any] | None = None,
              session_id: str | None = None, resend: bool, idempotency_key: str | None = None) -> M:
        response = self._request("POST", path, json=json, params=params, resend=resend,
                                 idempotency_key=idempotency_key)
        if idempotency_key and response.status_code == 422 and "Idempotency-Key" in response.text:
            raise KeyAlreadyUsed(
                f"server {self.base_url}: POST {path}: Idempotency-Key {idempotency_key!r} was already used for "
                f"another request: {_short(response.text)}"
            )
        return self._answer(response, model, f"POST {path}", session_id)

    @staticmethod
    def _s(session_id: str) -> str:
        return f"/sessions/{quote(session_id, safe='')}"

    # ---- service ----------------------------------------------------------------------------------

    def info(self) -> ServiceInfo:
        """``GET /``: the service description (the embedded server adds ``idempotency``)."""
        return self._get("/", ServiceInfo)

    @cached_property
    def supports_idempotency(self) -> bool:
        """Whether the server honours ``Idempotency-Key`` (asked once, then cached)."""
        return self.info().idempotency

    @cached_property
    def supports_learn_batch(self) -> bool:
        """Whether the server offers ``POST /learn-batch`` with idempotency keys (the embedded server does)."""
        info = self.info()
        return info.idempotency and "learn-batch" in info.extensions

    def health(self) -> Health:
        return self._get("/health", Health)

    # ---- sessions ---------------------------------------------------------------------------------

    def create_session(self, node_id: str, config: Mapping[str, Any] | None = None,
                       ttl_seconds: int | None = None) -> SessionInfo:
        """Create a session and check that the server took every config value asked for.

        A retry after a lost answer can leave an orphan session, which is harmless: it holds an empty STM
        and expires. Raises ConfigRejected naming the keys whose effective value differs. A real KATO
        silently drops a whole config when one value is invalid (kato-api.md §4).
        """
        body: dict[str, Any] = {"node_id": node_id}
        if config is not None:
            body["config"] = dict(config)
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        response = self._request("POST", "/sessions", json=body, resend=True)
        if response.status_code == 400 and config:  # a compatible server may refuse instead of dropping
            raise ConfigRejected(
                f"server {self.base_url}: POST /sessions for node {node_id!r} rejected the config "
                f"{dict(config)!r}: {_short(response.text)}; fix the invalid value(s)"
            )
        info = self._answer(response, SessionInfo, "POST /sessions")
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

    def get_session(self, session_id: str) -> SessionInfo:
        return self._get(self._s(session_id), SessionInfo, session_id=session_id)

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
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the real error
            log.warning("could not delete session %s on %s: %s", session_id, self.base_url, exc)

    def _request_checked(self, method: str, path: str, session_id: str) -> StatusResult:
        response = self._request(method, path, resend=True)
        return self._answer(response, StatusResult, f"{method} {path}", session_id)

    def session_exists(self, session_id: str) -> bool:
        return self._get(f"{self._s(session_id)}/exists", SessionExists).exists

    def extend_session(self, session_id: str, ttl_seconds: int = 3600) -> ExtendResult:
        return self._post(f"{self._s(session_id)}/extend", ExtendResult, params={"ttl_seconds": ttl_seconds},
                          session_id=session_id, resend=True)

    def get_config(self, session_id: str) -> dict[str, Any]:
        return self._get(f"{self._s(session_id)}/config", SessionConfig, session_id=session_id).config

    def update_config(self, session_id: str, config: Mapping[str, Any]) -> None:
        """Change a session's config. A 400 (invalid value; nothing applied) raises ConfigRejected."""
        path = f"{self._s(session_id)}/config"
        response = self._request("POST", path, json={"config": dict(config)}, resend=True)
        if response.status_code == 400:
            raise ConfigRejected(
                f"server {self.base_url}: POST {path} rejected the config {dict(config)!r}: {_short(response.text)}"
            )
        self._answer(response, StatusResult, f"POST {path}", session_id)

    # ---- STM and learning -------------------------------------------------------------------------

    def observe(self, session_id: str, strings: Sequence[str], emotives: Mapping[str, float] | None = None,
                metadata: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None) -> ObserveResult:
        """Append one event. Without a key, an ambiguous failure raises MaybeApplied (never resent)."""
        body: dict[str, Any] = {"strings": list(strings)}
        if emotives:
            body["emotives"] = dict(emotives)
        if metadata:
            body["metadata"] = dict(metadata)
        return self._post(f"{self._s(session_id)}/observe", ObserveResult, json=body, session_id=session_id,
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
    ) -> ObserveSequenceResult:
        """Observe several events in one request. An item is a list of strings or a full observation dict."""
        items = [dict(o) if isinstance(o, Mapping) else {"strings": list(o)} for o in observations]
        body = {"observations": items, "learn_after_each": learn_after_each, "learn_at_end": learn_at_end,
                "clear_stm_between": clear_stm_between}
        return self._post(f"{self._s(session_id)}/observe-sequence", ObserveSequenceResult, json=body,
                          session_id=session_id, resend=False, idempotency_key=idempotency_key)

    def learn(self, session_id: str, idempotency_key: str | None = None) -> LearnResult:
        """Learn the STM as one pattern (the STM is cleared). Unkeyed and ambiguous: MaybeApplied."""
        return self._post(f"{self._s(session_id)}/learn", LearnResult, session_id=session_id, resend=False,
                          idempotency_key=idempotency_key)

    def clear_stm(self, session_id: str) -> None:
        self._post(f"{self._s(session_id)}/clear-stm", StatusResult, session_id=session_id, resend=True)

    def clear_all(self, session_id: str) -> None:
        """Clear this session's STM AND the node's whole knowledge base (every session of the node)."""
        self._post(f"{self._s(session_id)}/clear-all", StatusResult, session_id=session_id, resend=True)

    def stm(self, session_id: str) -> list[list[str]]:
        return self._get(f"{self._s(session_id)}/stm", StmResult, session_id=session_id).stm

    def predictions(self, session_id: str) -> PredictionsResult:
        return self._get(f"{self._s(session_id)}/predictions", PredictionsResult, session_id=session_id)

    # ---- knowledge base ---------------------------------------------------------------------------

    def pattern(self, node_id: str, name: str) -> PatternInfo | None:
        """A stored pattern (name with or without ``PTRN|``), or None when the node has none by that name."""
        path = f"/pattern/{quote(strip_prefix(name), safe='')}"
        response = self._request("GET", path, params={"node_id": node_id}, resend=True)
        if response.status_code == 404:  # dead code in KATO, but a compatible server may use it
            return None
        body = self._answer(response, _Model, f"GET {path}")
        outer = (body.model_extra or {}).get("pattern")
        if not isinstance(outer, dict):
            raise ProtocolError(f"server {self.base_url}: GET {path} answered without a 'pattern' object: {body!r}")
        if outer.get("status") == "error":  # KATO's "not found" is 200 with status "error"
            return None
        try:
            return PatternInfo.model_validate({**outer.get("pattern", {}), "kb_id": (body.model_extra or {}).get("node_id")})
        except ValidationError as exc:
            raise ProtocolError(f"server {self.base_url}: GET {path} answered an invalid pattern: {_short(str(exc))}") from exc

    def nodes(self) -> list[NodeInfo]:
        """Every node with a knowledge base (embedded server extension ``GET /nodes``)."""
        return self._get("/nodes", _NodeList).nodes

    def node_patterns(self, node_id: str, page_size: int = 500) -> Iterator[NodePattern]:
        """Every pattern of a node, ordered by name, fetched page by page."""
        offset = 0
        while True:
            page = self._get(f"/nodes/{quote(node_id, safe='')}/patterns", NodePatternsPage,
                             params={"offset": offset, "limit": page_size})
            yield from page.patterns
            offset += len(page.patterns)
            if not page.patterns or offset >= page.total:
                return

    def node_stats(self, node_id: str) -> NodeStats:
        return self._get(f"/nodes/{quote(node_id, safe='')}/stats", NodeStats)

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
        body = {"items": [{"node_id": node, "events": [list(e) for e in events]} for node, events in items]}
        return self._post("/learn-batch", LearnBatchResult, json=body, resend=True,
                          idempotency_key=idempotency_key).patterns

    def export_knowledge_base(self) -> dict[str, dict[str, int]]:
        """node_id -> {pattern name ("PTRN|..."): frequency} for every node (tests and notebooks)."""
        return {
            n.node_id: {"PTRN|" + strip_prefix(p.name): p.frequency for p in self.node_patterns(n.node_id)}
            for n in self.nodes()
        }


class _NodeList(_Model):
    nodes: list[NodeInfo]


# Items of one learn-batch request; a larger batch is sent in parts (learn_batch). A constant, never read from the
# server: the parts and their keys must be the same when a batch is sent again after a crash.
LEARN_BATCH_PART = 10_000


class LearnBatchResult(_Model):
    status: str
    patterns: list[str]


# --------------------------------------------------------------------------------------------------
# Exactly once per unit


Mode = Literal["keys", "verify"]
PhaseHook = Callable[[str, str], None]


class NodeSession:
    """One node's training session that learns each unit exactly once (see the module docstring).

    Args:
        client: the KatoClient to use.
        node_id: the node whose knowledge base receives the units.
        config: the session config. ``max_pattern_length`` must be 0 (or absent), because units are cut
            by the caller.
        mode: ``"keys"`` (Idempotency-Key) or ``"verify"`` (decide from server state); None picks
            ``"keys"`` when the server supports idempotency.
        max_session_losses: how many times one unit may lose its session before SessionLost is raised.
        ttl_seconds: the session's time to live (None: the server's default, 3600 s on KATO).
    """

    def __init__(self, client: KatoClient, node_id: str, config: Mapping[str, Any], *,
                 mode: Mode | None = None, max_session_losses: int = 5, ttl_seconds: int | None = None) -> None:
        if config.get("max_pattern_length", 0) != 0:
            raise ConfigError(
                f"node {node_id!r}: NodeSession needs max_pattern_length=0 (got {config['max_pattern_length']!r}); "
                "with server-side auto-learn a lost observe answer cannot be repaired. Cut units in the trainer"
            )
        if mode is None:
            mode = "keys" if client.supports_idempotency else "verify"
        elif mode == "keys" and not client.supports_idempotency:
            raise ConfigError(f"server {client.base_url} does not support idempotency keys; use mode='verify'")
        elif mode not in ("keys", "verify"):
            raise ConfigError(f"mode must be 'keys', 'verify' or None, not {mode!r}")
        self.client = client
        self.node_id = node_id
        self.config = dict(config)
        self.mode: Mode = mode
        self.max_session_losses = max_session_losses
        self.ttl_seconds = ttl_seconds
        self._session_id: str | None = None
        self._stm_clean = False  # known empty: fresh session, after a learn, or after clear-stm

    def __repr__(self) -> str:
        return f"NodeSession({self.node_id!r}, mode={self.mode!r}, session={self._session_id!r})"

    @property
    def session_id(self) -> str:
        """The session's id (created on first use)."""
        return self._session_id or self.open()

    def open(self) -> str:
        """Create the session now (checking its config) and return its id."""
        info = self.client.create_session(self.node_id, self.config, ttl_seconds=self.ttl_seconds)
        self._session_id, self._stm_clean = info.session_id, True
        log.debug("node %s: session %s created", self.node_id, info.session_id)
        return info.session_id

    def close(self) -> None:
        """Delete the session, best effort."""
        if self._session_id is not None:
            self.client.delete_session_quietly(self._session_id)
            self._session_id = None

    def __enter__(self) -> NodeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def learn_unit(self, events: Sequence[Sequence[str]], key: str, on_phase: PhaseHook | None = None) -> str:
        """Learn exactly these events as ONE pattern, exactly once; return its ``PTRN|...`` name.

        Args:
            events: the unit's events, at least 2 symbols in total.
            key: deterministic and unique per unit of the run; the Idempotency-Key in keys mode.
            on_phase: called as ``on_phase(phase, session_id)`` BEFORE each mutating request.
                The phase is "keyed" in keys mode and "observe" or "learn" in verify mode.

        Raises:
            ServerUnavailable: the retry budget of a call ran out. Whether the unit took effect is then
                unknown. In keys mode, resending the unit with the same key is safe. In verify mode, use
                the journaled phase and :func:`unit_took_effect`.
            SessionLost: the session vanished more than ``max_session_losses`` times during the unit.
            AmbiguousEffect: a learn's answer was lost and its session vanished, and the pattern exists
                in the knowledge base.
            ProtocolError: the server learned something other than these events.
        """
        sorted_events = [sort_event(e) for e in events]
        expected = pattern_name(sorted_events)
        if not expected:
            raise ValueError(f"node {self.node_id!r}, unit {key!r}: a unit needs at least 2 symbols, got {sorted_events!r}")
        hook = on_phase or (lambda phase, sid: None)
        losses = 0
        while True:
            try:
                if self.mode == "keys":
                    name = self._learn_keyed(sorted_events, key, hook)
                else:
                    name = self._learn_verified(sorted_events, expected, hook)
                break
            except SessionNotFound as exc:
                losses += 1
                log.warning("node %s, unit %s: session %s lost (%d); redoing the unit in a new session",
                            self.node_id, key, exc.session_id, losses)
                self._session_id, self._stm_clean = None, False
                if losses > self.max_session_losses:
                    raise SessionLost(
                        f"node {self.node_id!r}, unit {key!r}: the session vanished {losses} times in one unit "
                        f"on {self.client.base_url}; the server may expire sessions too fast (check its TTL)"
                    ) from exc
            except BaseException:
                self._stm_clean = False  # the STM's content is unknown until cleared
                raise
        if strip_prefix(name) != strip_prefix(expected):
            self._stm_clean = False
            raise ProtocolError(
                f"node {self.node_id!r}, unit {key!r}: server {self.client.base_url} learned {name!r}, expected "
                f"{expected!r} from {sorted_events!r}; the session's STM held something else "
                "(another client on this session?)"
            )
        return expected

    def _ensure_clean(self) -> str:
        sid = self.session_id
        if not self._stm_clean:
            self.client.clear_stm(sid)
            self._stm_clean = True
        return sid

    def _learn_keyed(self, events: list[list[str]], key: str, hook: PhaseHook) -> str:
        sid = self._ensure_clean()
        hook("keyed", sid)
        self._stm_clean = False
        try:
            result = self.client.observe_sequence(sid, events, learn_at_end=True, idempotency_key=key)
        except KeyAlreadyUsed as exc:
            # Keys are unique per unit and only applied requests store theirs, so this unit was already
            # learned, in another session (e.g. before the trainer's crash). The pattern must exist.
            self._stm_clean = True  # this request was not applied
            expected = pattern_name(events)
            if self.client.pattern(self.node_id, expected) is None:
                raise ProtocolError(
                    f"node {self.node_id!r}: key {key!r} is recorded as applied, but pattern {expected} is not in "
                    f"the knowledge base on {self.client.base_url}; was the key reused for another unit?"
                ) from exc
            log.info("node %s: unit %s was already applied in another session (key conflict)", self.node_id, key)
            return expected
        self._stm_clean = True  # a learn always clears the STM
        return result.final_learned_pattern or ""

    def _learn_verified(self, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        sid = self._ensure_clean()
        self._observe_verified(sid, events, hook)
        return self._learn_once(sid, events, expected, hook)

    def _observe_verified(self, sid: str, events: list[list[str]], hook: PhaseHook) -> None:
        """Put exactly ``events`` into the (empty) STM; repair a lost answer by clear + resend."""
        repaired = False
        for _ in range(self.client.settings.retry_max_attempts):
            hook("observe", sid)
            self._stm_clean = False
            try:
                self.client.observe_sequence(sid, events)
            except MaybeApplied as exc:
                log.info("node %s: observe-sequence answer lost (%s); clearing the STM and resending",
                         self.node_id, exc)
                self.client.clear_stm(sid)
                self._stm_clean, repaired = True, True
                continue
            # After a repair, check before learning: a late copy of the lost request would show here
            if not repaired or self.client.stm(sid) == events:
                return
            log.warning("node %s: STM after a repaired observe-sequence is not the unit; clearing again", self.node_id)
            self.client.clear_stm(sid)
            self._stm_clean = True
        raise ServerUnavailable(
            f"node {self.node_id!r}: observe-sequence on {self.client.base_url} kept losing its answer "
            f"({self.client.settings.retry_max_attempts} tries); the connection to the server is unreliable"
        )

    def _learn_once(self, sid: str, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        """Send learn until it is known to have been applied exactly once."""
        for _ in range(self.client.settings.retry_max_attempts):
            hook("learn", sid)
            try:
                name = self.client.learn(sid).pattern_name
            except MaybeApplied as exc:
                log.info("node %s: learn answer lost (%s); reading the STM to decide", self.node_id, exc)
                if _learn_applied(self.client, self.node_id, sid, events, expected):
                    self._stm_clean = True
                    return expected
                continue  # STM still holds the unit: the learn did not happen; send it again
            self._stm_clean = True
            return name
        raise ServerUnavailable(
            f"node {self.node_id!r}: learn on {self.client.base_url} kept losing its answer "
            f"({self.client.settings.retry_max_attempts} tries); the connection to the server is unreliable"
        )


def _learn_applied(client: KatoClient, node_id: str, session_id: str, events: list[list[str]], expected: str) -> bool:
    """After an unanswered learn: True if it was applied, False if not; raise when undecidable.

    A vanished session means a redo is needed: the unit is redone only when the pattern is absent
    (then the learn was surely not applied). The redo is signalled by SessionNotFound, which learn_unit
    handles.
    """
    try:
        if not session_id:  # no session was recorded (e.g. a journal without one): same as a vanished one
            raise SessionNotFound(f"no session id recorded for the learn of {expected}", session_id)
        stm = client.stm(session_id)
    except SessionNotFound as exc:
        if client.pattern(node_id, expected) is None:
            raise  # not applied, and the session is gone: learn_unit redoes the unit
        raise AmbiguousEffect(
            f"node {node_id!r}: a learn of {expected} on session {session_id} went unanswered and the session "
            f"then vanished on {client.base_url}; the pattern exists, but it may come from an earlier unit with "
            "the same content, so whether this learn was applied cannot be decided from server state. "
            "Count the unit as possibly learned (its frequency may be one too high or correct)"
        ) from exc
    if stm == []:
        return True  # learn always clears the STM, and nothing else touched this session
    if stm == events:
        return False
    raise ProtocolError(
        f"node {node_id!r}: after an unanswered learn, session {session_id} on {client.base_url} holds "
        f"{stm!r}, neither empty nor the unit {events!r}; another client may be using the session"
    )


def unit_took_effect(client: KatoClient, node_id: str, session_id: str, events: Sequence[Sequence[str]],
                     phase: str) -> bool:
    """After the trainer's own crash (verify mode): did the unit's learn take effect?

    Args:
        phase: the last phase journaled for the unit through ``on_phase``. With "observe" no learn was
            sent, so the answer is False. With "learn" the session's STM decides: empty means True, the
            unit's events mean False. If the session is gone, ``GET /pattern`` decides: an absent pattern
            means False, and a present one raises AmbiguousEffect.

    Keys mode needs no such check: resend the unit with the same key.
    """
    if phase == "observe":
        return False
    if phase != "learn":
        raise ValueError(
            f"phase must be 'observe' or 'learn' (verify mode), not {phase!r}; in keys mode resend the unit "
            "with the same key: the server answers the stored response"
        )
    sorted_events = [sort_event(e) for e in events]
    try:
        return _learn_applied(client, node_id, session_id, sorted_events, pattern_name(sorted_events))
    except SessionNotFound:
        return False  # raised only when the pattern is absent
