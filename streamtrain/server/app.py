"""The FastAPI application: KATO 3.10.1's HTTP API (paths, fields, status codes, error bodies) plus idempotency keys
and the extensions (/nodes, /learn-batch, /learn-batches). The request bodies and answers are `streamtrain.wire`'s.

One request path: the Guardrails middleware (token, body limits, the lock that serializes requests; guardrails.py),
then the app's router and the route below. The busiest routes (observe, observe-sequence, learn) are plain Starlette
routes that read their own body with service.read_body instead of declaring it: FastAPI's dependency and body
machinery costs more than the rest of such a request, and read_body/validated give FastAPI's exact errors in
FastAPI's order (docs/server.md, Performance).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from streamtrain.disk import free_bytes, mount_point
from streamtrain.server import session_config as sc
from streamtrain.server.defaults import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    KATO_VERSION,
)
from streamtrain.server.guardrails import Guardrails
from streamtrain.server.service import (
    FinishedAnswer,
    Guard,
    Server,
    do_learn,
    do_observe,
    do_observe_sequence,
    json_response,
    parse_batch,
    parse_batches,
    read_body,
    validated,
)
from streamtrain.server.session import Session, average_emotives, iso
from streamtrain.server.store import Store, storage_code, storage_failure
from streamtrain.wire import CreateSession, ObservationData, ObservationSequence

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_IDEMPOTENCY_TTL", "DEFAULT_MAX_BATCH_ITEMS", "DEFAULT_MAX_BODY_BYTES", "KATO_VERSION",
           "create_app"]


def create_app(db_path: str | Path | None = None, *, idempotency: bool = True,
               idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL, token: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
               sync: str = "normal", store: Store | None = None, clock: Callable[[], float] = time.time) -> FastAPI:
    """The server as an ASGI app over the SQLite file `db_path` (or an already opened `store`). `clock`: the time in
    seconds since the epoch (session and key expiry, timestamps); tests pass their own."""
    if store is None:
        if db_path is None:
            raise ValueError("create_app needs db_path or store")
        store = Store(db_path, sync=sync)
    srv = Server(store, idempotency=idempotency, idempotency_ttl=idempotency_ttl, clock=clock)
    eng = srv.engine
    # FastAPI's native OpenTelemetry off: nothing here configures a provider, and checking costs every request.
    app = FastAPI(title="streamtrain embedded KATO-compatible server", version=KATO_VERSION,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.server = srv

    @app.exception_handler(FinishedAnswer)
    async def _answer(request: Request, exc: FinishedAnswer) -> Response:
        return Response(exc.body, status_code=exc.status, media_type=exc.media_type)

    @app.exception_handler(sqlite3.Error)
    async def _storage(request: Request, exc: sqlite3.Error) -> Response:
        """A write the disk refused (full, read-only, failing): 507 with the reason, the database and its disk,
        never a bare 500. The request's transaction was rolled back: nothing of it was applied."""
        code = storage_code(exc)
        if code is None:
            raise exc
        reason = storage_failure(exc, store.path, code)
        log.error("%s %s answered 507: %s", request.method, request.url.path, reason)
        return json_response({"detail": reason, "error": {
            "code": code, "message": reason, "path": str(store.path), "mount": str(mount_point(store.path)),
            "free_bytes": free_bytes(store.path)}}, 507)

    # ---- dependencies (async: they run on the loop, never in a thread pool)
    async def guard(request: Request) -> Guard:
        return await srv.guard(request)

    async def mutating_session(session_id: str, g: Guard = Depends(guard)) -> tuple[Session, Guard]:
        return srv.session(session_id), g

    async def reading_session(session_id: str) -> Session:
        s = srv.session(session_id)
        eng.persist_expiry(s)
        return s

    # ---- service
    extensions = ["nodes", "learn-batch"] + (["learn-batches"] if srv.idempotency else [])

    @app.get("/")
    async def root() -> Response:
        return json_response({"service": "KATO API", "version": KATO_VERSION,
                              "description": "Embedded KATO-compatible memory server (streamtrain)",
                              "docs": "/docs", "health": "/health", "status": "running",
                              "uptime_seconds": eng.clock() - eng.started, "architecture": "modular",
                              "session_support": True, "idempotency": srv.idempotency,
                              # how long a key is honoured, and since when every key is still stored: a trainer
                              # resuming steps in doubt after days checks that their keys still decide them
                              **({"idempotency_ttl_seconds": srv.idempotency_ttl,
                                  "idempotency_keys_since": eng.store.keys_swept_before} if srv.idempotency else {}),
                              "database_id": eng.store.database_id,
                              "extensions": extensions})

    @app.get("/health")
    async def health() -> Response:
        now = eng.clock()
        # its own connection and no lock: answers at once while a learn-batch is applied in a worker thread
        active = store.active_sessions(now)
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
        return json_response(session_body(s, int(s.expires_at - eng.clock())))

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
            eng.extend_session(s, ttl_seconds)
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

    # ---- STM / learn
    @app.get("/sessions/{session_id}/stm")
    async def get_stm(s: Session = Depends(reading_session)) -> Response:
        return json_response({"stm": s.stm, "session_id": s.session_id, "length": len(s.stm)})

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
    async def get_pattern(request: Request, pattern_id: str, node_id: str | None = None) -> Response:
        kb = eng.kb_id(node_of(request, node_id))
        p = eng.get_pattern(kb, pattern_id)
        if p is None:
            return json_response({"pattern": {"status": "error", "message": f"Pattern {pattern_id} not found"},
                                  "node_id": kb})
        return json_response({"pattern": {"status": "okay", "pattern": p}, "node_id": kb})

    @app.get("/symbols/stats")
    async def symbol_stats(request: Request, node_id: str | None = None) -> Response:
        kb = eng.kb_id(node_of(request, node_id))
        return json_response({"symbols": eng.symbol_stats(kb), "node_id": kb})

    # ---- extensions (not in KATO)
    @app.get("/nodes")
    async def nodes() -> Response:
        return json_response({"nodes": eng.nodes()})

    def unknown_node(node_id: str) -> Response | None:
        if eng.kb_known(node_id):
            return None
        kb = eng.kb_id(node_id)
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
            return 200, {"status": "learned", "patterns": srv.learn_items(items)}  # wire.LearnBatchResult
        return await run_in_threadpool(srv.mutate, g, None, fn)

    if srv.idempotency:   # without keys a batch could not be exact: not offered (404, not advertised)
        @app.post("/learn-batches")
        async def learn_batches(request: Request) -> Response:
            """Several keyed batches in one request and one transaction, each applied at most once per key (a
            batch whose key is stored with the same items is answered from the store, "replayed"). A key stored
            with other items refuses the whole request (422 IDEMPOTENCY_KEY_REUSED). At most `max_batch_items` items over all
            batches (413). An Idempotency-Key header is not needed and not used: every batch carries its key.
            Parsed, validated and applied in a worker thread under the request lock, like /learn-batch."""
            batches = await run_in_threadpool(parse_batches, await request.body(), max_batch_items)
            if isinstance(batches, Response):
                return batches
            return await run_in_threadpool(srv.learn_batches, batches)

    # ---- the busiest routes: observe, observe-sequence, learn. Plain Starlette routes at the head of the router:
    # FastAPI's dependency and body machinery costs more than the rest of such a request. Each reads its own body
    # with read_body/validated, which give FastAPI's exact errors in FastAPI's order (the JSON, the key, the
    # session, the model), and runs through the same guard, session lookup and mutate as every other route.
    async def observe(request: Request) -> Response:
        data = await read_body(request, lenient_for=ObservationData)
        g = await srv.guard(request)
        s = srv.session(request.path_params["session_id"])
        obs = validated(ObservationData, data)
        return srv.mutate(g, s.session_id, lambda: do_observe(eng, s, obs))

    async def observe_sequence(request: Request) -> Response:
        data = await read_body(request, lenient_for=ObservationSequence)
        g = await srv.guard(request)
        s = srv.session(request.path_params["session_id"])
        seq = validated(ObservationSequence, data)
        return srv.mutate(g, s.session_id, lambda: do_observe_sequence(eng, s, seq))

    async def learn(request: Request) -> Response:
        g = await srv.guard(request)
        s = srv.session(request.path_params["session_id"])
        return srv.mutate(g, s.session_id, lambda: do_learn(eng, s))

    app.router.routes[:0] = [Route("/sessions/{session_id}/observe-sequence", observe_sequence, methods=["POST"]),
                             Route("/sessions/{session_id}/observe", observe, methods=["POST"]),
                             Route("/sessions/{session_id}/learn", learn, methods=["POST"])]

    app.add_middleware(Guardrails, token=token, max_body_bytes=max_body_bytes)

    return app
