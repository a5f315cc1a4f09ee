"""What goes over the wire: every request body and answer of KATO's API and of the embedded server's extensions.

The client side (``client/``) and the embedded server (``server/``) both import this module; it holds pydantic
models and plain functions, no HTTP library. What a request may carry is in ``limits.py``.

* **Request bodies** are pydantic models (``LearnBatches``, ``ObservationSequence``, ...). The embedded server
  validates every body with them; the client builds the same body as plain dicts with the function next to each
  model (``learn_batches_body``, ...) and ``encode`` turns it into bytes once per call, however often it is resent:
  no model is built per outgoing event. ``tests/test_wire_contract.py`` checks that what the client sends is
  exactly what the models describe (no field more, none renamed).
* **Answers** are ``WireModel`` s: extra fields are allowed, because KATO answers more than a client reads. The
  client validates every 2xx body into one; the test checks the embedded server sends every field they name and
  that recorded answers of a real KATO 3.10.1 (``tests/golden``) validate.
* **Errors**: ``{"detail": ..., "error": {"code": ..., ...}}`` (``ErrorAnswer``), one code per condition
  (``SESSION_NOT_FOUND``, ``IDEMPOTENCY_KEY_REUSED``).
* ``ENDPOINTS`` lists each route with its request and answer model.

A learn request of the trainer, ``POST /learn-batches`` (an extension of the embedded server; to a real KATO the
trainer sends one observe-sequence with ``learn_at_end`` per pattern instead). Several samples, each a batch under
its own key (the trainer's are ``sb1-`` and 40 hex digits), each item one pattern to learn on a node, a level of the
hierarchy: the names learned on one level are the symbols of the next::

    POST /learn-batches
    {"batches": [
      {"key": "sb1-sample-7", "items": [
        {"node_id": "run-L0", "events": [["to"], ["be"], ["or"]]},
        {"node_id": "run-L0", "events": [["not"], ["to"], ["be"]]},
        {"node_id": "run-L1", "events": [["PTRN|a96cd07fee2efb2fefabc50b6d0c602ac4adfc85"],
                                         ["PTRN|fbdc068043147d29d90a497bd630baa8e051de5b"]]}]},
      {"key": "sb1-sample-8", "items": [{"node_id": "run-L0", "events": [["that"], ["is"]]}]}]}

    200 {"status": "ok", "results": [
      {"key": "sb1-sample-7", "patterns": ["PTRN|a96cd07fee2efb2fefabc50b6d0c602ac4adfc85",
                                           "PTRN|fbdc068043147d29d90a497bd630baa8e051de5b",
                                           "PTRN|f0e06bfc73b410d35309c76ddfc11d02ab00f29e"], "replayed": false},
      {"key": "sb1-sample-8", "patterns": ["PTRN|4d1161080461666aebb185cc242dd913b9f3cc27"], "replayed": true}]}

One name per item, in order: ``"PTRN|" + sha1`` of the events, each event sorted (``""`` under 2 symbols).
``replayed``: the key was applied before with the same items (here sample 8, by an earlier request): its stored
names are answered and nothing is learned again, so a request is resent after any lost answer. A key applied before
with *other* items refuses the whole request, nothing of it applied::

    422 {"detail": "Batch key 'sb1-sample-8' was already used ...",
         "error": {"code": "IDEMPOTENCY_KEY_REUSED", "message": "Batch key ...", "key": "sb1-sample-8"}}

More items than the server's ``--max-batch-items`` (``limits.DEFAULT_MAX_BATCH_ITEMS``), all batches together, is a
413 naming the limit; an invalid body a 422 with FastAPI's validation errors. ``KatoClient.learn_batches`` sends it
(``learn_batches_body``) and returns each batch's ``patterns``; the trainer packs whole samples into one request up
to ``limits.TRAINER_MAX_ITEMS`` items. ``tests/test_wire_contract.py`` sends this very example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .jsonbytes import compact_json

__all__ = [
    "ENDPOINTS",
    "IDEMPOTENCY_KEY_REUSED",
    "KEY_REUSED_CODES",
    "SESSION_NOT_FOUND",
    "BatchItem",
    "CognitionData",
    "CognitionResult",
    "ConfigUpdate",
    "CreateSession",
    "Endpoint",
    "ErrorAnswer",
    "ErrorInfo",
    "ExtendResult",
    "Health",
    "KeyedBatch",
    "KeyedBatchResult",
    "LearnBatch",
    "LearnBatchResult",
    "LearnBatches",
    "LearnBatchesResult",
    "LearnResult",
    "NodeInfo",
    "NodeList",
    "NodePattern",
    "NodePatternsPage",
    "NodeStats",
    "ObservationData",
    "ObservationItem",
    "ObservationSequence",
    "ObserveResult",
    "ObserveSequenceResult",
    "PatternAnswer",
    "PatternInfo",
    "PatternLookup",
    "PredictionsResult",
    "SequenceItem",
    "ServiceInfo",
    "SessionConfig",
    "SessionExists",
    "SessionInfo",
    "StatusResult",
    "StmResult",
    "WireModel",
    "config_body",
    "encode",
    "learn_batch_body",
    "learn_batches_body",
    "observation_body",
    "observation_sequence_body",
    "session_body",
]

Events = Sequence[Sequence[str]]
Item = tuple[str, Events]  # (node_id, events): one pattern to learn on that node


def encode(body: Any) -> bytes:
    """The JSON bytes of a request body: compact, UTF-8, NaN and infinities as ``null`` (refused by the server, not
    read as NaN). A keyed request's body must be the same bytes when it is sent again after a crash (the server
    fingerprints them), so this encoding never changes."""
    return compact_json(body, nan="null")


# ==================================================================================================== errors
#: KATO's 404 for a session that is gone (``{"error": {"code", "message", "session_id"}}``).
SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
#: 422: a key (an ``Idempotency-Key`` header, or a learn-batches batch key) was already applied to another request
#: or other items; nothing of this request was applied.
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
#: Every code that means it: an embedded server of an older streamtrain answered learn-batches with ``KEY_REUSED``.
KEY_REUSED_CODES = frozenset({IDEMPOTENCY_KEY_REUSED, "KEY_REUSED"})


class WireModel(BaseModel):
    """An answer. Extra fields allowed: KATO returns more than a training client reads."""

    model_config = ConfigDict(extra="allow")


class ErrorInfo(WireModel):
    code: str
    message: str | None = None
    key: str | None = None  # IDEMPOTENCY_KEY_REUSED: the key


class ErrorAnswer(WireModel):
    """A structured error answer. FastAPI's own errors (a 422 of validation) have only ``detail``."""

    detail: Any = None
    error: ErrorInfo | None = None


# ==================================================================================================== service
class ServiceInfo(WireModel):
    """``GET /``."""

    service: str = ""
    version: str = ""
    status: str = ""
    session_support: bool = True
    idempotency: bool = False  # only the embedded server sends it; a real KATO has none
    extensions: list[str] = []  # the embedded server's extra endpoints ("nodes", "learn-batch", "learn-batches")
    database_id: str | None = None  # the embedded server's id of its database file (a real KATO has none)
    idempotency_ttl_seconds: float | None = None  # the embedded server's key lifetime (--idempotency-ttl)
    idempotency_keys_since: float | None = None  # every key it created since this time (epoch s) is still stored


class Health(WireModel):
    status: str


# ==================================================================================================== sessions
class CreateSession(BaseModel):
    """``POST /sessions``."""

    node_id: str
    metadata: dict[str, Any] | None = {}
    ttl_seconds: int | None = None
    config: dict[str, Any] | None = None


def session_body(node_id: str, config: Mapping[str, Any] | None, ttl_seconds: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"node_id": node_id}
    if config is not None:
        body["config"] = dict(config)
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return body


class SessionInfo(WireModel):
    """``POST /sessions``, ``GET /sessions/{id}``."""

    session_id: str
    node_id: str
    created_at: str | None = None
    expires_at: str | None = None
    ttl_seconds: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    session_config: dict[str, Any] = Field(default_factory=dict)


class SessionExists(WireModel):
    exists: bool
    expired: bool = False
    session_id: str


class ExtendResult(WireModel):
    status: str
    session_id: str
    ttl_seconds: int | None = None


class ConfigUpdate(BaseModel):
    """``POST /sessions/{id}/config``: ``{"config": {...}}``, or (KATO takes both) the bare config."""

    config: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        return data if isinstance(data, dict) and "config" in data else {"config": data}


def config_body(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"config": dict(config)}


class SessionConfig(WireModel):
    """``GET /sessions/{id}/config``."""

    session_id: str
    config: dict[str, Any]


class StatusResult(WireModel):
    """Delete, clear-stm, clear-all, config updates."""

    status: str
    session_id: str | None = None


# ==================================================================================================== observe
class ObservationData(BaseModel):
    """``POST /sessions/{id}/observe``: one event."""

    strings: list[str] = Field(default_factory=list)
    vectors: list[list[float]] = Field(default_factory=list)
    emotives: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


def observation_body(strings: Sequence[str], emotives: Mapping[str, float] | None,
                     metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"strings": list(strings)}
    if emotives:
        body["emotives"] = dict(emotives)
    if metadata:
        body["metadata"] = dict(metadata)
    return body


class ObserveResult(WireModel):
    status: str
    session_id: str | None = None
    stm_length: int
    time: int
    unique_id: str | None = None
    auto_learned_pattern: str | None = None


class ObservationItem(ObservationData):
    unique_id: str | None = None


class ObservationSequence(BaseModel):
    """``POST /sessions/{id}/observe-sequence``: several events, and what to learn (against a real KATO the trainer
    sends a step as one of these with ``learn_at_end``)."""

    observations: list[ObservationItem]
    learn_after_each: bool = False
    learn_at_end: bool = False
    clear_stm_between: bool = False


def observation_sequence_body(observations: Sequence[Sequence[str] | Mapping[str, Any]], *, learn_after_each: bool,
                              learn_at_end: bool, clear_stm_between: bool) -> dict[str, Any]:
    """An item is a list of strings or a whole observation (``ObservationItem``'s fields)."""
    items = [dict(o) if isinstance(o, Mapping) else {"strings": list(o)} for o in observations]
    return {"observations": items, "learn_after_each": learn_after_each, "learn_at_end": learn_at_end,
            "clear_stm_between": clear_stm_between}


class SequenceItem(WireModel):
    status: str
    sequence_position: int
    stm_length: int
    time: int
    unique_id: str | None = None
    auto_learned_pattern: str | None = None


class ObserveSequenceResult(WireModel):
    status: str
    observations_processed: int
    initial_stm_length: int
    final_stm_length: int
    results: list[SequenceItem] = Field(default_factory=list)
    auto_learned_patterns: list[str] = Field(default_factory=list)
    final_learned_pattern: str | None = None


# ==================================================================================================== learn, STM
class LearnResult(WireModel):
    """``POST /sessions/{id}/learn`` (no body): the STM learned as one pattern."""

    status: str
    pattern_name: str
    session_id: str | None = None


class StmResult(WireModel):
    stm: list[list[str]]
    session_id: str | None = None
    length: int | None = None


class PredictionsResult(WireModel):
    predictions: list[dict[str, Any]]
    future_potentials: list[dict[str, Any]] | None = None
    session_id: str | None = None
    count: int | None = None


class CognitionData(WireModel):
    short_term_memory: list[list[str]]
    time: int  # the session's observation counter: +1 per observation, unchanged by a learn, 0 after clear-stm


class CognitionResult(WireModel):
    cognition_data: CognitionData
    session_id: str | None = None
    node_id: str | None = None


# ==================================================================================================== knowledge base
class PatternInfo(WireModel):
    name: str
    pattern_data: list[list[str]]
    length: int | None = None
    frequency: int
    kb_id: str | None = None  # set by the client: the answer's node_id, which is the kb_id


class PatternLookup(WireModel):
    status: str  # "okay", or "error": not found (KATO answers 200)
    pattern: PatternInfo | None = None
    message: str | None = None


class PatternAnswer(WireModel):
    """``GET /pattern/{name}?node_id=``."""

    pattern: PatternLookup
    node_id: str | None = None  # the kb_id


class NodeInfo(WireModel):
    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int


class NodeList(WireModel):
    """``GET /nodes`` (extension)."""

    nodes: list[NodeInfo]


class NodePattern(WireModel):
    name: str
    pattern_data: list[list[str]]
    frequency: int


class NodePatternsPage(WireModel):
    """``GET /nodes/{node_id}/patterns?offset=&limit=`` (extension)."""

    node_id: str
    kb_id: str
    total: int
    offset: int
    limit: int
    patterns: list[NodePattern]


class NodeStats(WireModel):
    """``GET /nodes/{node_id}/stats`` (extension)."""

    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int
    distinct_symbols: int


# ==================================================================================================== learn-batch(es)
class BatchItem(BaseModel):
    """One pattern to learn: the events (each sorted by the server, as an observe would) on the node ``node_id``."""

    node_id: str = Field(min_length=1)
    events: list[list[str]] = Field(min_length=1)


class LearnBatch(BaseModel):
    """``POST /learn-batch`` (extension): the items learned in order, in one transaction; keyed by an
    ``Idempotency-Key`` header."""

    items: list[BatchItem] = Field(min_length=1)


def learn_batch_body(items: Sequence[Item]) -> dict[str, Any]:
    return {"items": [{"node_id": node, "events": [list(e) for e in events]} for node, events in items]}


class LearnBatchResult(WireModel):
    status: str  # "learned"
    patterns: list[str]  # one name per item, in order ("" under 2 symbols)


class KeyedBatch(BaseModel):
    key: str = Field(min_length=1, max_length=200)
    items: list[BatchItem] = Field(min_length=1)


class LearnBatches(BaseModel):
    """``POST /learn-batches`` (extension): several keyed batches in one request and one transaction, each applied
    at most once per key (the module's docstring shows one)."""

    batches: list[KeyedBatch] = Field(min_length=1)


def learn_batches_body(batches: Sequence[tuple[str, Sequence[Item]]]) -> dict[str, Any]:
    """``(key, [(node_id, events), ...])`` per batch. The events go as they are, lists or tuples of strings (the
    encoder writes both as arrays): copying each took 5% of the trainer's CPU."""
    return {"batches": [{"key": key, "items": [{"node_id": node, "events": events} for node, events in items]}
                        for key, items in batches]}


class KeyedBatchResult(WireModel):
    key: str
    patterns: list[str]
    replayed: bool  # answered from the server's store: this key was applied before (by this or another request)


class LearnBatchesResult(WireModel):
    status: str  # "ok"
    results: list[KeyedBatchResult]  # one per batch, in request order


# ==================================================================================================== the routes
@dataclass(frozen=True)
class Endpoint:
    """A route the client calls: its request body's model (None: no body) and its 2xx answer's."""

    method: str
    path: str  # {name}: one path segment
    request: type[BaseModel] | None
    answer: type[WireModel]
    kato: bool = True  # False: an extension of the embedded server (a real KATO has none)


ENDPOINTS = (
    Endpoint("GET", "/", None, ServiceInfo),
    Endpoint("GET", "/health", None, Health),
    Endpoint("POST", "/sessions", CreateSession, SessionInfo),
    Endpoint("GET", "/sessions/{session_id}", None, SessionInfo),
    Endpoint("DELETE", "/sessions/{session_id}", None, StatusResult),
    Endpoint("GET", "/sessions/{session_id}/exists", None, SessionExists),
    Endpoint("POST", "/sessions/{session_id}/extend", None, ExtendResult),
    Endpoint("GET", "/sessions/{session_id}/config", None, SessionConfig),
    Endpoint("POST", "/sessions/{session_id}/config", ConfigUpdate, StatusResult),
    Endpoint("POST", "/sessions/{session_id}/observe", ObservationData, ObserveResult),
    Endpoint("POST", "/sessions/{session_id}/observe-sequence", ObservationSequence, ObserveSequenceResult),
    Endpoint("POST", "/sessions/{session_id}/learn", None, LearnResult),
    Endpoint("POST", "/sessions/{session_id}/clear-stm", None, StatusResult),
    Endpoint("POST", "/sessions/{session_id}/clear-all", None, StatusResult),
    Endpoint("GET", "/sessions/{session_id}/stm", None, StmResult),
    Endpoint("GET", "/sessions/{session_id}/predictions", None, PredictionsResult),
    Endpoint("GET", "/sessions/{session_id}/cognition-data", None, CognitionResult),
    Endpoint("GET", "/pattern/{name}", None, PatternAnswer),
    Endpoint("GET", "/nodes", None, NodeList, kato=False),
    Endpoint("GET", "/nodes/{node_id}/patterns", None, NodePatternsPage, kato=False),
    Endpoint("GET", "/nodes/{node_id}/stats", None, NodeStats, kato=False),
    Endpoint("POST", "/learn-batch", LearnBatch, LearnBatchResult, kato=False),
    Endpoint("POST", "/learn-batches", LearnBatches, LearnBatchesResult, kato=False),
)
