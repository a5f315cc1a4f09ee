"""The FastAPI application: KATO 3.10.1's HTTP API (paths, fields, status codes, error bodies) plus
idempotency keys and the /nodes extensions.

Requests are serialized: the Guardrails middleware holds one lock from the moment a request is let in until its
answer starts, and every handler does its work synchronously on the event loop, except a learn-batch, which is
parsed and applied in a worker thread while the lock is held. That gives per-session (and per-database)
serialization, makes an idempotency key check and the commit of its effects one atomic step, and keeps the event
loop free meanwhile: `GET /health` (which reads through its own SQLite connection and takes no lock) answers while
a large batch is applied, and the other requests wait their turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from streamtrain.patterns import PREFIX
from streamtrain.server import session_config as sc
from streamtrain.server.engine import Engine, Session, body_fingerprint, iso
from streamtrain.server.store import Store

log = logging.getLogger(__name__)

KATO_VERSION = "3.10.1"
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Items of one POST /learn-batch. The trainer sends one sample per batch and splits a sample of more than
# streamtrain.client.LEARN_BATCH_PART items (10,000) into parts, so this stays well above what it sends.
DEFAULT_MAX_BATCH_ITEMS = 20_000
# Namespace of the batch keys of POST /learn-batches in the idempotency table (never an Idempotency-Key's).
BATCH_KEY_PREFIX = "batch:"


# ------------------------------------------------------------------------------------------ schemas
class ObservationData(BaseModel):
    strings: list[str] = Field(default_factory=list)
    vectors: list[list[float]] = Field(default_factory=list)
    emotives: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ObservationItem(ObservationData):
    unique_id: Optional[str] = None


class ObservationSequence(BaseModel):
    observations: list[ObservationItem]
    learn_after_each: bool = False
    learn_at_end: bool = False
    clear_stm_between: bool = False


class BatchItem(BaseModel):
    node_id: str = Field(min_length=1)
    events: list[list[str]] = Field(min_length=1)


class LearnBatch(BaseModel):
    items: list[BatchItem] = Field(min_length=1)


class KeyedBatch(BaseModel):
    key: str = Field(min_length=1, max_length=200)
    items: list[BatchItem] = Field(min_length=1)


class LearnBatches(BaseModel):
    batches: list[KeyedBatch] = Field(min_length=1)


class CreateSession(BaseModel):
    node_id: str
    metadata: Optional[dict[str, Any]] = {}
    ttl_seconds: Optional[int] = None
    config: Optional[dict[str, Any]] = None


# ------------------------------------------------------------------------------------------ plumbing
def render(payload: Any) -> bytes:
    # Same encoding as Starlette's JSONResponse.
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(render(payload), status_code=status, media_type="application/json")


class _Answer(Exception):
    """A finished response raised out of a dependency (404, idempotent replay, key conflict)."""

    def __init__(self, status: int, body: bytes, media_type: str = "application/json") -> None:
        self.status, self.body, self.media_type = status, body, media_type


def session_not_found(session_id: str) -> _Answer:
    return _Answer(404, render({"error": {"code": "SESSION_NOT_FOUND",
                                          "message": f"Session {session_id} not found or expired",
                                          "session_id": session_id}}))


@dataclass(frozen=True)
class Guard:
    key: str | None = None
    fingerprint: str = ""
    request: str = ""


NO_GUARD = Guard()


class _Rollback(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body


class Server:
    """State shared by the routes: the store, the engine and the idempotency settings."""

    def __init__(self, store: Store, *, idempotency: bool, idempotency_ttl: float) -> None:
        self.store = store
        self.engine = Engine(store)
        self.idempotency = idempotency
        self.idempotency_ttl = idempotency_ttl

    def stored_answer(self, g: Guard) -> _Answer | None:
        row = self.store.get_key(g.key)
        if row is None or row[4] < time.time() - self.idempotency_ttl:
            return None
        if row[0] == g.fingerprint:
            return _Answer(row[2], zlib.decompress(row[3]))
        detail = (f"Idempotency-Key {g.key!r} was already used for a different request ({row[1]} with another "
                  f"body); this request ({g.request}) was not applied. Send a new request with a new key.")
        return _Answer(422, render({"detail": detail, "error": {"code": "IDEMPOTENCY_KEY_REUSED", "message": detail}}))

    def mutate(self, g: Guard, session_id: str | None, fn: Callable[[], tuple[int, Any]]) -> Response:
        """Run `fn` (returns status, payload) in one transaction; a 2xx answer is committed together with
        the idempotency key, anything else is rolled back (nothing applied, key not stored)."""
        if g.key:
            hit = self.stored_answer(g)
            if hit is not None:
                return Response(hit.body, status_code=hit.status, media_type=hit.media_type)
        try:
            with self.store.transaction():
                status, payload = fn()
                body = render(payload)
                if not 200 <= status < 300:
                    raise _Rollback(status, body)
                if g.key:
                    self.store.put_key(g.key, g.fingerprint, g.request, status, body, time.time())
        except _Rollback as r:
            # Every 4xx answer is decided before the request learns anything: the session may be stale,
            # the knowledge-base caches are not.
            self.engine.forget(session_id, knowledge=False)
            return Response(r.body, status_code=r.status, media_type="application/json")
        except BaseException:
            self.engine.forget(session_id)
            raise
        try:
            self.engine.sweep(self.idempotency_ttl)
        except Exception:  # housekeeping must never fail a request that was applied
            log.warning("sweeping expired sessions/keys failed", exc_info=True)
        return Response(body, status_code=status, media_type="application/json")

    def learn_item(self, node_id: str, events: list[list[str]]) -> str:
        """One learn-batch item: `events` (sorted inside each event) learned as one pattern of the node, without a
        session, emotives or metadata. "PTRN|<sha1>", or "" under 2 symbols."""
        name = self.engine.learn_pattern(self.engine.kb_id(node_id), node_id, events, [], {})
        return PREFIX + name if name else ""

    def learn_batches(self, batches: list[ParsedBatch]) -> Response:
        """POST /learn-batches: each batch applied at most once per key, all in one transaction. Every key is looked
        up before anything is learned, so a reused key refuses the whole request with nothing applied."""
        now = time.time()
        stored: dict[str, list[str]] = {}     # key -> names: stored earlier (live), or applied by this request
        fingerprint: dict[str, str] = {}      # key -> the fingerprint its batch has in the store or in this request
        for b in batches:
            if b.key not in fingerprint:
                row = self.store.get_key(BATCH_KEY_PREFIX + b.key)
                if row is not None and row[4] >= now - self.idempotency_ttl:
                    stored[b.key] = json.loads(zlib.decompress(row[3]))["patterns"]
                    fingerprint[b.key] = row[0]
                else:
                    fingerprint[b.key] = b.fingerprint
            if fingerprint[b.key] != b.fingerprint:
                return json_response({
                    "detail": f"Batch key {b.key!r} was already used for a batch with other items; this request was "
                              "not applied (none of its batches). Send that batch under a new key.",
                    "error": {"code": "KEY_REUSED", "key": b.key}}, 422)

        def apply() -> tuple[int, Any]:
            results = []
            for b in batches:
                names = stored.get(b.key)
                if names is not None:
                    results.append({"key": b.key, "patterns": names, "replayed": True})
                    continue
                names = stored[b.key] = [self.learn_item(node_id, events) for node_id, events in b.items]
                self.store.put_key(BATCH_KEY_PREFIX + b.key, b.fingerprint, "POST /learn-batches", 200,
                                   render({"patterns": names}), now)
                results.append({"key": b.key, "patterns": names, "replayed": False})
            return 200, {"status": "ok", "results": results}
        return self.mutate(NO_GUARD, None, apply)

# ------------------------------------------------------------------------------------------ request logic
def _hex_ids(n: int) -> list[str]:
    """n random 32-hex-digit ids (one urandom call instead of n uuid4s)."""
    raw = os.urandom(16 * n).hex()
    return [raw[32 * i:32 * (i + 1)] for i in range(n)]


def reject_vectors(vectors: list, index: int | None = None) -> tuple[int, Any] | None:
    if vectors:   # DEVIATION vectors: no vector store in the embedded server
        detail = {"error": "VectorsNotSupported",
                  "message": "The embedded server does not support vector observations; send strings only "
                             "or use a KATO deployment with Qdrant"}
        if index is not None:
            detail["observation_index"] = index
        return 400, {"detail": detail}
    return None


def do_observe(eng: Engine, s: Session, obs: ObservationData) -> tuple[int, Any]:
    bad = reject_vectors(obs.vectors)
    if bad:
        return bad
    cfg = s.effective_config()
    auto = eng.observe(s, obs.strings, obs.vectors, obs.emotives, obs.metadata, cfg, predict=True)
    stm_length = len(s.stm)
    eng.save_session(s)
    return 200, {"status": "okay", "session_id": s.session_id, "processor_id": s.node_id,
                 "stm_length": stm_length, "time": s.time, "unique_id": f"obs-{_hex_ids(1)[0]}",
                 "auto_learned_pattern": auto}


def do_observe_sequence(eng: Engine, s: Session, seq: ObservationSequence) -> tuple[int, Any]:
    for i, item in enumerate(seq.observations):
        bad = reject_vectors(item.vectors, i)
        if bad:
            return bad
    cfg = s.effective_config()
    initial = len(s.stm)
    results, learned = [], []
    last = len(seq.observations) - 1
    ids = _hex_ids(len(seq.observations))
    for i, item in enumerate(seq.observations):
        if seq.clear_stm_between and i > 0:
            s.stm = []
        auto = eng.observe(s, item.strings, item.vectors, item.emotives, item.metadata, cfg, predict=(i == last))
        if auto:
            learned.append(auto)
        if seq.learn_after_each and s.stm:
            learned.append(eng.learn(s))
        results.append({"status": "okay", "sequence_position": i, "stm_length": len(s.stm), "time": s.time,
                        "unique_id": item.unique_id or f"seq-obs-{ids[i]}", "auto_learned_pattern": auto})
    final = None
    if seq.learn_at_end and s.stm:
        final = eng.learn(s)         # "" when under 2 symbols, as KATO reports it
        learned.append(final)
    final_len = len(s.stm)
    eng.save_session(s)
    return 200, {"status": "completed", "processor_id": s.node_id,
                 "observations_processed": len(seq.observations), "initial_stm_length": initial,
                 "final_stm_length": final_len, "results": results, "auto_learned_patterns": learned,
                 "final_learned_pattern": final, "isolated": seq.clear_stm_between}


def do_learn(eng: Engine, s: Session) -> tuple[int, Any]:
    if not s.stm:
        return 400, {"detail": "Cannot learn from empty STM"}
    name = eng.learn(s)
    eng.save_session(s)
    return 200, {"status": "learned", "pattern_name": name, "session_id": s.session_id,
                 "processor_id": None, "message": f"Learned pattern {name} from 0 events"}


# Routes that take no lock: they touch no state a request changes (/health reads through its own connection).
UNLOCKED_PATHS = frozenset({"/health", "/"})


def bearer_ok(header: bytes, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the scheme name in any case (RFC 7235), compared in constant time."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


class Guardrails:
    """ASGI middleware: bearer token (every route but /health), the request body size limit, and the lock that
    serializes requests (see the module docstring)."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int, fast=None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body_bytes
        self.fast = fast      # fast(scope, headers, body) -> (status, json bytes) | None (None: use the app)
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:   # in-process tests may run several loops in turn
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _call_locked(self, scope, receive, send):
        """The app under the lock, released as soon as the answer starts (a client slow to read its answer must
        not hold every other request up)."""
        lock = self.lock()
        await lock.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                lock.release()

        async def send_and_release(message):
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            return await self.app(scope, receive, send_and_release)
        finally:
            release()

    async def _send_json(self, send, status: int, payload: Any, headers: list | None = None) -> None:
        body = render(payload)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] != "/health":
            if not bearer_ok(headers.get(b"authorization", b""), self.token):
                return await self._send_json(
                    send, 401, {"detail": "Missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                          "with the token the server was started with (--token)"},
                    [(b"www-authenticate", b"Bearer")])
        too_big = {"detail": f"Request body exceeds the server limit of {self.max_body} bytes (--max-body-bytes); "
                             "send smaller batches"}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return await self._send_json(send, 413, too_big)
            except ValueError:
                return await self._send_json(send, 400, {"detail": "Invalid Content-Length header"})
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            # Buffer the (bounded) body so a chunked upload is limited too, then replay it to the app.
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await self._send_json(send, 413, too_big)
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            if body and b"json" in headers.get(b"content-type", b""):
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    return await self._send_json(send, 400, {
                        "detail": f"Request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 4]!r}); "
                                  "send JSON encoded as UTF-8"})
            if self.fast is not None:
                async with self.lock():
                    answer = self.fast(scope, headers, body)
                if answer is not None:
                    status, payload = answer
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(payload)).encode())]})
                    await send({"type": "http.response.body", "body": payload})
                    return
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self._call_locked(scope, replay, send)
        if scope["path"] in UNLOCKED_PATHS:
            return await self.app(scope, receive, send)
        return await self._call_locked(scope, receive, send)


def _json_body(body: bytes) -> Any:
    """The request body as JSON, or FastAPI's 422 for invalid JSON."""
    try:
        return json.loads(body)
    except ValueError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
                                       "msg": "JSON decode error", "input": {},
                                       "ctx": {"error": getattr(e, "msg", str(e))}}]) from None


def _validated(model: type[BaseModel], data: Any) -> Any:
    """`data` as `model`, or FastAPI's 422 validation body (the same as a declared body parameter gives)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False)]) from None


def _too_many(what: str, count: int, max_items: int) -> Response:
    return json_response({"detail": f"{what} holds {count} items; this server accepts at most {max_items} per "
                                    "request (--max-batch-items): send the items in several batches"}, 413)


def _sorted_items(items: list[BatchItem]) -> list[tuple[str, list[list[str]]]]:
    return [(item.node_id, [sorted(e) for e in item.events]) for item in items]


def parse_batch(body: bytes, max_items: int) -> list[tuple[str, list[list[str]]]] | Response:
    """A learn-batch body as (node_id, events sorted inside each event) pairs, or the error answer: 413 over
    `max_items` items (counted before any item is validated), 422 with FastAPI's validation body otherwise."""
    data = _json_body(body)
    raw = data.get("items") if isinstance(data, dict) else None
    if isinstance(raw, list) and len(raw) > max_items:
        return _too_many("learn-batch", len(raw), max_items)
    return _sorted_items(_validated(LearnBatch, data).items)


@dataclass(frozen=True)
class ParsedBatch:
    key: str
    fingerprint: str
    items: list[tuple[str, list[list[str]]]]      # events sorted inside each event


def batch_fingerprint(items: list[BatchItem]) -> str:
    """sha256 of a canonical JSON of a batch's items alone (not of the request carrying it): the same batch sent
    alone or among others has the same fingerprint."""
    canon = json.dumps([[item.node_id, item.events] for item in items], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


def parse_batches(body: bytes, max_items: int) -> list[ParsedBatch] | Response:
    """A learn-batches body as ParsedBatch list, or the error answer: 413 when the items of all batches together
    exceed `max_items` (counted before anything is validated), 422 with FastAPI's validation body otherwise."""
    data = _json_body(body)
    raw = data.get("batches") if isinstance(data, dict) else None
    if isinstance(raw, list):
        total = sum(len(b["items"]) for b in raw if isinstance(b, dict) and isinstance(b.get("items"), list))
        if total > max_items:
            return _too_many(f"learn-batches ({len(raw)} batches)", total, max_items)
    req = _validated(LearnBatches, data)
    return [ParsedBatch(b.key, batch_fingerprint(b.items), _sorted_items(b.items)) for b in req.batches]


# ------------------------------------------------------------------------------------------ app
def create_app(db_path: str | Path | None = None, *, idempotency: bool = True,
               idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL, token: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
               sync: str = "normal", store: Store | None = None) -> FastAPI:
    """The server as an ASGI app over the SQLite file `db_path` (or an already opened `store`)."""
    if store is None:
        if db_path is None:
            raise ValueError("create_app needs db_path or store")
        store = Store(db_path, sync=sync)
    srv = Server(store, idempotency=idempotency, idempotency_ttl=idempotency_ttl)
    eng = srv.engine
    app = FastAPI(title="streamtrain embedded KATO-compatible server", version=KATO_VERSION)
    app.state.server = srv

    @app.exception_handler(_Answer)
    async def _answer(request: Request, exc: _Answer) -> Response:
        return Response(exc.body, status_code=exc.status, media_type=exc.media_type)

    # ---- dependencies (async: they run on the loop, never in a thread pool)
    async def guard(request: Request) -> Guard:
        if not srv.idempotency:
            return NO_GUARD
        key = request.headers.get("idempotency-key")
        if not key:
            return NO_GUARD
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        g = Guard(key, body_fingerprint(request.method, path, body), f"{request.method} {path}")
        hit = srv.stored_answer(g)      # BEFORE the session lookup: a replay answers even if it is gone
        if hit is not None:
            raise hit
        return g

    async def mutating_session(session_id: str, g: Guard = Depends(guard)) -> tuple[Session, Guard]:
        s = eng.get_session(session_id)
        if s is None:
            raise session_not_found(session_id)
        return s, g

    async def reading_session(session_id: str) -> Session:
        s = eng.get_session(session_id)
        if s is None:
            raise session_not_found(session_id)
        eng.persist_expiry(s)
        return s

    # ---- service
    extensions = ["nodes", "learn-batch"] + (["learn-batches"] if srv.idempotency else [])

    @app.get("/")
    async def root() -> Response:
        return json_response({"service": "KATO API", "version": KATO_VERSION,
                              "description": "Embedded KATO-compatible memory server (streamtrain)",
                              "docs": "/docs", "health": "/health", "status": "running",
                              "uptime_seconds": time.time() - eng.started, "architecture": "modular",
                              "session_support": True, "idempotency": srv.idempotency,
                              "database_id": eng.store.database_id,
                              "extensions": extensions})

    @app.get("/health")
    async def health() -> Response:
        now = time.time()
        # its own connection and no lock: answers at once while a learn-batch is applied in a worker thread
        active = store.reader().execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (now,)).fetchone()[0]
        return json_response({"status": "healthy", "processor_status": "healthy", "service_name": "kato",
                              "uptime_seconds": now - eng.started, "issues": [], "metrics_collected": 0,
                              "last_collection": now, "active_sessions": active, "timestamp": iso(now)})

    # ---- sessions
    def session_body(s: Session, ttl: int) -> dict[str, Any]:
        return {"session_id": s.session_id, "node_id": s.node_id, "created_at": iso(s.created_at),
                "expires_at": iso(s.expires_at), "ttl_seconds": ttl, "metadata": s.metadata,
                "session_config": s.effective_config()}

    @app.post("/sessions")
    async def create_session(req: CreateSession, g: Guard = Depends(guard)) -> Response:
        config = req.config or {}
        errors = sc.validate_create(config)   # DEVIATION create-invalid-config: 400, not a silent drop

        def fn():
            if errors:
                return 400, {"detail": {"error": "Configuration validation failed", "validation_errors": errors}}
            s = eng.create_session(req.node_id, req.metadata, req.ttl_seconds, sc.create_overrides(config))
            return 200, session_body(s, req.ttl_seconds if req.ttl_seconds is not None else 3600)
        return srv.mutate(g, None, fn)

    @app.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> Response:
        s = eng.get_session(session_id)
        if s is None:
            return json_response({"detail": f"Session {session_id} not found or expired"}, 404)
        eng.persist_expiry(s)
        return json_response(session_body(s, int(s.expires_at - time.time())))

    @app.delete("/sessions/{session_id}")
    async def delete_session(sg=Depends(mutating_session)) -> Response:
        s, g = sg

        def fn():
            eng.delete_session(s.session_id)
            return 200, {"status": "deleted", "session_id": s.session_id}
        return srv.mutate(g, s.session_id, fn)

    @app.get("/sessions/{session_id}/exists")
    async def session_exists(session_id: str) -> Response:
        return json_response({"exists": eng.session_exists(session_id), "expired": False,
                              "session_id": session_id})

    @app.post("/sessions/{session_id}/extend")
    async def extend(ttl_seconds: int = 3600, sg=Depends(mutating_session)) -> Response:
        s, g = sg

        def fn():
            s.expires_at = time.time() + ttl_seconds     # once; the next access slides back to the session ttl
            eng.save_session(s)
            return 200, {"status": "extended", "session_id": s.session_id, "ttl_seconds": ttl_seconds}
        return srv.mutate(g, s.session_id, fn)

    @app.get("/sessions/{session_id}/config")
    async def get_config(s: Session = Depends(reading_session)) -> Response:
        return json_response({"session_id": s.session_id, "config": s.effective_config()})

    @app.post("/sessions/{session_id}/config")
    async def set_config(request_data: dict[str, Any], sg=Depends(mutating_session)) -> Response:
        s, g = sg
        config_data = request_data.get("config", request_data)

        def fn():
            if not isinstance(config_data, dict):
                return 400, {"detail": {"error": "Configuration validation failed",
                                        "validation_errors": {"config": "Must be an object"}}}
            errors = sc.validate_update(config_data)
            if errors:
                return 400, {"detail": {"error": "Configuration validation failed", "validation_errors": errors}}
            s.config = sc.apply_update(s.config, config_data)
            eng.save_session(s)
            return 200, {"status": "okay", "message": "Configuration updated", "session_id": s.session_id}
        return srv.mutate(g, s.session_id, fn)

    # ---- observe
    @app.post("/sessions/{session_id}/observe")
    async def observe(obs: ObservationData, sg=Depends(mutating_session)) -> Response:
        s, g = sg
        return srv.mutate(g, s.session_id, lambda: do_observe(eng, s, obs))

    @app.post("/sessions/{session_id}/observe-sequence")
    async def observe_sequence(seq: ObservationSequence, sg=Depends(mutating_session)) -> Response:
        s, g = sg
        return srv.mutate(g, s.session_id, lambda: do_observe_sequence(eng, s, seq))

    # ---- STM / learn
    @app.get("/sessions/{session_id}/stm")
    async def get_stm(s: Session = Depends(reading_session)) -> Response:
        return json_response({"stm": s.stm, "session_id": s.session_id, "length": len(s.stm)})

    @app.post("/sessions/{session_id}/learn")
    async def learn(sg=Depends(mutating_session)) -> Response:
        s, g = sg
        return srv.mutate(g, s.session_id, lambda: do_learn(eng, s))

    @app.post("/sessions/{session_id}/clear-stm")
    async def clear_stm(sg=Depends(mutating_session)) -> Response:
        s, g = sg

        def fn():
            eng.clear_stm(s)
            eng.save_session(s)
            return 200, {"status": "cleared", "session_id": s.session_id}
        return srv.mutate(g, s.session_id, fn)

    @app.post("/sessions/{session_id}/clear-all")
    async def clear_all(sg=Depends(mutating_session)) -> Response:
        s, g = sg

        def fn():
            eng.clear_kb(s.kb_id)
            s.stm = []
            eng.save_session(s)
            return 200, {"status": "cleared", "session_id": s.session_id, "scope": "all"}
        return srv.mutate(g, s.session_id, fn)

    # ---- predictions and introspection
    @app.get("/sessions/{session_id}/predictions")
    async def predictions(s: Session = Depends(reading_session)) -> Response:
        preds, futures = eng.predictions(s)
        return json_response({"predictions": preds, "future_potentials": futures, "session_id": s.session_id,
                              "processor_id": None, "count": len(preds), "time": None, "unique_id": None})

    @app.get("/sessions/{session_id}/percept-data")
    async def percept_data(s: Session = Depends(reading_session)) -> Response:
        pd = s.percept or {"strings": [], "vectors": [], "emotives": {}, "path": [], "metadata": {}}
        return json_response({"percept_data": pd, "session_id": s.session_id, "node_id": s.node_id})

    @app.get("/sessions/{session_id}/cognition-data")
    async def cognition_data(s: Session = Depends(reading_session)) -> Response:
        from streamtrain.server.engine import average_emotives
        cd = {"predictions": s.predictions, "emotives": average_emotives(s.emotives_acc),
              "symbols": [sym for e in s.stm for sym in e], "command": "", "metadata": {}, "path": [],
              "strings": [], "vectors": [], "short_term_memory": s.stm, "time": s.time}
        return json_response({"cognition_data": cd, "session_id": s.session_id, "node_id": s.node_id})

    def node_of(request: Request, node_id: str | None) -> str:
        if node_id:
            return node_id
        if request.headers.get("x-test-id"):
            return f"test_{request.headers['x-test-id']}"
        return request.headers.get("x-node-id") or "default_node"

    @app.get("/pattern/{pattern_id}")
    async def get_pattern(request: Request, pattern_id: str, node_id: Optional[str] = None) -> Response:
        kb = eng.kb_id(node_of(request, node_id))
        p = eng.get_pattern(kb, pattern_id)
        if p is None:
            return json_response({"pattern": {"status": "error", "message": f"Pattern {pattern_id} not found"},
                                  "node_id": kb})
        return json_response({"pattern": {"status": "okay", "pattern": p}, "node_id": kb})

    @app.get("/symbols/stats")
    async def symbol_stats(request: Request, node_id: Optional[str] = None) -> Response:
        kb = eng.kb_id(node_of(request, node_id))
        return json_response({"symbols": eng.symbol_stats(kb), "node_id": kb})

    # ---- extensions (not in KATO)
    @app.get("/nodes")
    async def nodes() -> Response:
        return json_response({"nodes": eng.nodes()})

    def unknown_node(node_id: str) -> Response | None:
        kb = eng.kb_id(node_id)
        if store.conn.execute("SELECT 1 FROM kbs WHERE kb_id=?", (kb,)).fetchone() is not None:
            return None
        return json_response({"detail": f"Node {node_id!r} is unknown on this server (knowledge base {kb!r}): no "
                                        "session was created and no pattern learned for it. GET /nodes lists the "
                                        "known nodes."}, 404)

    @app.get("/nodes/{node_id}/patterns")
    async def node_patterns(node_id: str, offset: int = Query(0, ge=0),
                            limit: int = Query(1000, ge=1, le=100_000)) -> Response:
        return unknown_node(node_id) or json_response(eng.node_patterns(node_id, offset, limit))

    @app.get("/nodes/{node_id}/stats")
    async def node_stats(node_id: str) -> Response:
        return unknown_node(node_id) or json_response(eng.node_stats(node_id))

    @app.post("/learn-batch")
    async def learn_batch(request: Request, g: Guard = Depends(guard)) -> Response:
        """Learn each item's events as one pattern of its node, in order, in one transaction: the knowledge-base
        effect of a session's observe-sequence + learn per item, without the sessions. With an Idempotency-Key
        the whole batch is applied once. The trainer's fast path: one request per sample, every level.

        Parsed, validated and applied in a worker thread (the request lock is held, so nothing else touches the
        store meanwhile): the event loop stays free to answer /health. At most `max_batch_items` items (413)."""
        body = await request.body()
        items = await run_in_threadpool(parse_batch, body, max_batch_items)
        if isinstance(items, Response):
            return items

        def fn():
            return 200, {"status": "learned", "patterns": [srv.learn_item(node_id, events) for node_id, events in items]}
        return await run_in_threadpool(srv.mutate, g, None, fn)

    if srv.idempotency:   # without keys a batch could not be exact: not offered (404, not advertised)
        @app.post("/learn-batches")
        async def learn_batches(request: Request) -> Response:
            """Several keyed batches in one request and one transaction, each applied at most once per key (a
            batch whose key is stored with the same items is answered from the store, "replayed"). A key stored
            with other items refuses the whole request (422 KEY_REUSED). At most `max_batch_items` items over all
            batches (413). An Idempotency-Key header is not needed and not used: every batch carries its key.
            Parsed, validated and applied in a worker thread under the request lock, like /learn-batch."""
            batches = await run_in_threadpool(parse_batches, await request.body(), max_batch_items)
            if isinstance(batches, Response):
                return batches
            return await run_in_threadpool(srv.learn_batches, batches)

    # Hot path: the happy case of observe / observe-sequence / learn skips FastAPI's routing and dependency
    # machinery (about a third of a small request's CPU). Anything unusual (invalid JSON or body, query
    # string) falls through to the routes above, which produce KATO's exact error bodies.
    fast_re = re.compile(r"^/sessions/([^/]+)/(observe-sequence|observe|learn)$")

    def fast(scope, headers: dict, body: bytes) -> tuple[int, bytes] | None:
        if scope["method"] != "POST" or scope.get("query_string"):
            return None
        m = fast_re.match(scope["path"])
        if m is None:
            return None
        session_id, action = m.groups()
        model = None
        if action != "learn":
            try:
                data = json.loads(body)
                model = (ObservationSequence if action == "observe-sequence" else ObservationData).model_validate(data)
            except (ValueError, ValidationError):
                return None
        g = NO_GUARD
        key = headers.get(b"idempotency-key") if srv.idempotency else None
        if key:
            path = scope["path"]
            g = Guard(key.decode("latin-1"), body_fingerprint("POST", path, body), f"POST {path}")
            hit = srv.stored_answer(g)
            if hit is not None:
                return hit.status, hit.body
        s = eng.get_session(session_id)
        if s is None:
            miss = session_not_found(session_id)
            return miss.status, miss.body
        if action == "observe-sequence":
            resp = srv.mutate(g, session_id, lambda: do_observe_sequence(eng, s, model))
        elif action == "observe":
            resp = srv.mutate(g, session_id, lambda: do_observe(eng, s, model))
        else:
            resp = srv.mutate(g, session_id, lambda: do_learn(eng, s))
        return resp.status_code, resp.body

    app.add_middleware(Guardrails, token=token, max_body_bytes=max_body_bytes, fast=fast)

    return app
