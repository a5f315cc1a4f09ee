"""What the routes do, apart from HTTP: reading a body the way FastAPI reads a declared body parameter, idempotency
keys (`Server.guard`, `Server.mutate`), and the session actions and batches. The request bodies and the answers the
client reads are the models of `streamtrain.wire`, which the client imports too.

Every mutating request runs through `Server.mutate`: one transaction, committed with its idempotency key when the
answer is 2xx, rolled back otherwise.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from streamtrain.jsonbytes import compact_json
from streamtrain.patterns import PREFIX
from streamtrain.server.engine import Engine
from streamtrain.server.guardrails import render
from streamtrain.server.session import Session
from streamtrain.server.store import Store
from streamtrain.wire import (
    IDEMPOTENCY_KEY_REUSED,
    SESSION_NOT_FOUND,
    BatchItem,
    ErrorAnswer,
    ErrorInfo,
    LearnBatch,
    LearnBatches,
    ObservationData,
    ObservationSequence,
)

log = logging.getLogger(__name__)

# Namespace of the batch keys of POST /learn-batches in the idempotency table (never an Idempotency-Key's).
BATCH_KEY_PREFIX = "batch:"


# ------------------------------------------------------------------------------------------ plumbing
def json_response(payload: Any, status: int = 200) -> Response:
    return Response(render(payload), status_code=status, media_type="application/json")


class FinishedAnswer(Exception):
    """A finished response raised out of a dependency (404, idempotent replay, key conflict)."""

    def __init__(self, status: int, body: bytes, media_type: str = "application/json") -> None:
        self.status, self.body, self.media_type = status, body, media_type


def session_not_found(session_id: str) -> FinishedAnswer:
    return FinishedAnswer(404, render({"error": {"code": SESSION_NOT_FOUND,
                                          "message": f"Session {session_id} not found or expired",
                                          "session_id": session_id}}))


def key_reused(detail: str, key: str) -> dict[str, Any]:
    """The 422 of a key (an Idempotency-Key, a learn-batches batch key) already applied to another request."""
    return ErrorAnswer(detail=detail, error=ErrorInfo(code=IDEMPOTENCY_KEY_REUSED, message=detail, key=key)
                       ).model_dump(exclude_none=True)


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

    def __init__(self, store: Store, *, idempotency: bool, idempotency_ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.engine = Engine(store, clock=clock)
        self.idempotency = idempotency
        self.idempotency_ttl = idempotency_ttl

    def stored_answer(self, g: Guard) -> FinishedAnswer | None:
        if g.key is None:
            return None
        row = self.store.get_key(g.key)
        if row is None or row[4] < self.engine.clock() - self.idempotency_ttl:
            return None
        if row[0] == g.fingerprint:
            return FinishedAnswer(row[2], zlib.decompress(row[3]))
        detail = (f"Idempotency-Key {g.key!r} was already used for a different request ({row[1]} with another "
                  f"body); this request ({g.request}) was not applied. Send a new request with a new key.")
        return FinishedAnswer(422, render(key_reused(detail, g.key)))

    async def guard(self, request: Request) -> Guard:
        """The request's Idempotency-Key (the NO_GUARD without one, or with idempotency off); raises the stored
        answer of a replay, or the 422 of a key used for another request. Checked BEFORE the session lookup: a
        replay answers even when the session is gone."""
        if not self.idempotency:
            return NO_GUARD
        key = request.headers.get("idempotency-key")
        if not key:
            return NO_GUARD
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        g = Guard(key, body_fingerprint(request.method, path, body), f"{request.method} {path}")
        hit = self.stored_answer(g)
        if hit is not None:
            raise hit
        return g

    def session(self, session_id: str) -> Session:
        """The live session (its expiry slid), or raises KATO's 404."""
        s = self.engine.get_session(session_id)
        if s is None:
            raise session_not_found(session_id)
        return s

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
                    self.store.put_key(g.key, g.fingerprint, g.request, status, body, self.engine.clock())
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

    def learn_items(self, items: list[tuple[str, list[list[str]]]]) -> list[str]:
        """Learn-batch items: each item's events (sorted inside each event) learned as one pattern of its node, in order,
        without a session, emotives or metadata; "PTRN|<sha1>" each, or "" under 2 symbols. One statement per table
        for them all (Engine.learn_patterns)."""
        return [PREFIX + name if name else "" for name in self.engine.learn_patterns(items)]

    def learn_batches(self, batches: list[ParsedBatch]) -> Response:
        """POST /learn-batches: each batch applied at most once per key, all in one transaction. Every key is looked
        up before anything is learned, so a reused key refuses the whole request with nothing applied."""
        now = self.engine.clock()
        stored: dict[str, list[str]] = {}     # key -> names: stored earlier (live), or applied by this request
        fingerprint: dict[str, str] = {}      # key -> the fingerprint its batch has in the store or in this request
        held = self.store.get_keys(sorted({BATCH_KEY_PREFIX + b.key for b in batches}))
        for b in batches:
            if b.key not in fingerprint:
                row = held.get(BATCH_KEY_PREFIX + b.key)
                if row is not None and row[4] >= now - self.idempotency_ttl:
                    stored[b.key] = json.loads(zlib.decompress(row[3]))["patterns"]
                    fingerprint[b.key] = row[0]
                else:
                    fingerprint[b.key] = b.fingerprint
            if fingerprint[b.key] != b.fingerprint:
                return json_response(key_reused(
                    f"Batch key {b.key!r} was already used for a batch with other items; this request was not "
                    "applied (none of its batches). Send that batch under a new key.", b.key), 422)

        def apply() -> tuple[int, Any]:
            # The items of every batch applied by this request (the first of each key not stored), learned together.
            applied: dict[str, tuple[int, int]] = {}      # key -> its items' slice in `items`
            items: list[tuple[str, list[list[str]]]] = []
            for b in batches:
                if b.key not in stored and b.key not in applied:
                    applied[b.key] = (len(items), len(items) + len(b.items))
                    items.extend(b.items)
            names = self.learn_items(items)
            keys = []
            # plain dicts: models here cost 30x as much per request (wire.LearnBatchesResult is the shape;
            # tests/test_wire_contract.py checks it)
            results: list[dict[str, Any]] = []
            for b in batches:
                if b.key in applied and b.key not in stored:
                    lo, hi = applied[b.key]
                    stored[b.key] = names[lo:hi]
                    keys.append((BATCH_KEY_PREFIX + b.key, b.fingerprint, "POST /learn-batches", 200,
                                 compact_json({"patterns": stored[b.key]}), now))
                    results.append({"key": b.key, "patterns": stored[b.key], "replayed": False})
                else:
                    results.append({"key": b.key, "patterns": stored[b.key], "replayed": True})
            self.store.put_keys(keys)
            return 200, {"status": "ok", "results": results}
        return self.mutate(NO_GUARD, None, apply)

# ------------------------------------------------------------------------------------------ request logic
def _hex_ids(n: int) -> list[str]:
    """n random 32-hex-digit ids (one urandom call instead of n uuid4s)."""
    raw = os.urandom(16 * n).hex()
    return [raw[32 * i:32 * (i + 1)] for i in range(n)]


def reject_vectors(vectors: list, index: int | None = None) -> tuple[int, Any] | None:
    if vectors:   # DEVIATION vectors: no vector store in the embedded server
        detail: dict[str, Any] = {
            "error": "VectorsNotSupported",
            "message": "The embedded server does not support vector observations; send strings only or use a KATO "
                       "deployment with Qdrant"}
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


def body_fingerprint(method: str, path: str, body: bytes) -> str:
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(b"\0")
    h.update(path.encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(body)
    return h.hexdigest()


# Reading a body the way FastAPI 0.165 reads a declared body parameter (fastapi/routing.py get_request_handler and
# dependencies/utils.py request_body_to_args), so that a route reading its own body answers FastAPI's exact errors:
# the JSON is parsed first (invalid JSON: 422 before any dependency runs), the model is validated last.
MISSING = object()


async def read_body(request: Request, lenient_for: type[BaseModel] | None = None) -> Any:
    """The body as FastAPI gives it to validation: MISSING when empty, the parsed JSON when the content type is JSON
    (application/json or +json), the raw bytes otherwise (strict content type). Invalid JSON raises FastAPI's 422.

    lenient_for: a body that is valid JSON for this model is taken whatever its content type (or without one), as
    the observe routes have always done; otherwise FastAPI's rule."""
    body = await request.body()
    if not body:
        return MISSING
    content_type = request.headers.get("content-type")
    if content_type == "application/json":       # nearly always: no need to parse the header
        return _json_body(body)
    if content_type:
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        if message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json")):
            return _json_body(body)
    if lenient_for is not None:
        try:
            data = json.loads(body)
            lenient_for.model_validate(data, from_attributes=True)
            return data
        except (ValueError, ValidationError):
            pass
    return body


def validated(model: type[BaseModel], data: Any) -> Any:
    """`data` (from read_body) as `model`, or FastAPI's 422 (a missing body: "Field required")."""
    if data is MISSING:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    return _validated(model, data)


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
        return model.model_validate(data, from_attributes=True)     # as FastAPI's TypeAdapter.validate_python
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False)]) from None


def _too_many(what: str, count: int, max_items: int) -> Response:
    return json_response({"detail": f"{what} holds {count} items; this server accepts at most {max_items} per "
                                    "request (--max-batch-items): send the items in several batches"}, 413)


def _sorted_items(items: list[BatchItem]) -> list[tuple[str, list[list[str]]]]:
    # an event of one symbol (level 0 and above without auto-learn: nearly all) is sorted already
    return [(item.node_id, [e if len(e) < 2 else sorted(e) for e in item.events]) for item in items]


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
    alone or among others has the same fingerprint. The JSON is ``dumps([[node_id, events], ...])``'s."""
    return hashlib.sha256(compact_json([[item.node_id, item.events] for item in items])).hexdigest()


def parse_batches(body: bytes, max_items: int) -> list[ParsedBatch] | Response:
    """A learn-batches body as ParsedBatch list, or the error answer: 413 when the items of all batches together
    exceed `max_items` (whether or not they are valid), 422 with FastAPI's validation body otherwise.

    A good body is parsed and validated in one pass by pydantic (2.5x faster than json.loads and validation: the
    bodies are large); any other goes the way FastAPI's own would, for the same answer. What only pydantic's strict
    parser refuses (a lone surrogate such as "\\ud800", which no database row can hold) is a 422 as well."""
    try:
        req = LearnBatches.model_validate_json(body)
    except ValidationError as strict:
        data = _json_body(body)
        raw = data.get("batches") if isinstance(data, dict) else None
        if isinstance(raw, list):  # items counted before they are validated
            total = sum(len(b["items"]) for b in raw if isinstance(b, dict) and isinstance(b.get("items"), list))
            if total > max_items:
                return _too_many(f"learn-batches ({len(raw)} batches)", total, max_items)
        _validated(LearnBatches, data)
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in strict.errors(include_url=False)]) from None
    total = sum(len(b.items) for b in req.batches)
    if total > max_items:
        return _too_many(f"learn-batches ({len(req.batches)} batches)", total, max_items)
    return [ParsedBatch(b.key, batch_fingerprint(b.items), _sorted_items(b.items)) for b in req.batches]


