"""The wire models: KATO's (and the embedded server's) answers as pydantic models, one per response body.

Extra fields are kept (``extra="allow"``): KATO returns more than a training client reads. Field comments name
what only the embedded server sends. ``KatoClient`` (``client.py``) validates each 2xx body into one of these.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CognitionData",
    "CognitionResult",
    "ExtendResult",
    "Health",
    "KeyedBatchResult",
    "LearnBatchResult",
    "LearnBatchesResult",
    "LearnResult",
    "NodeInfo",
    "NodeList",
    "NodePattern",
    "NodePatternsPage",
    "NodeStats",
    "ObserveResult",
    "ObserveSequenceResult",
    "PatternInfo",
    "PredictionsResult",
    "SequenceItem",
    "ServiceInfo",
    "SessionConfig",
    "SessionExists",
    "SessionInfo",
    "StatusResult",
    "StmResult",
    "WireModel",
]


class WireModel(BaseModel):
    """Extra fields allowed: KATO returns more than a training client reads."""

    model_config = ConfigDict(extra="allow")


class ServiceInfo(WireModel):
    service: str = ""
    version: str = ""
    status: str = ""
    session_support: bool = True
    idempotency: bool = False  # only the embedded server sends it; a real KATO has none
    extensions: list[str] = []  # the embedded server's extra endpoints ("nodes", "learn-batch")
    database_id: str | None = None  # the embedded server's id of its database file (a real KATO has none)
    idempotency_ttl_seconds: float | None = None  # the embedded server's key lifetime (--idempotency-ttl)
    idempotency_keys_since: float | None = None  # every key it created since this time (epoch s) is still stored


class Health(WireModel):
    status: str


class SessionInfo(WireModel):
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


class SessionConfig(WireModel):
    session_id: str
    config: dict[str, Any]


class StatusResult(WireModel):
    status: str
    session_id: str | None = None


class ObserveResult(WireModel):
    status: str
    session_id: str | None = None
    stm_length: int
    time: int
    unique_id: str | None = None
    auto_learned_pattern: str | None = None


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


class LearnResult(WireModel):
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


class PatternInfo(WireModel):
    name: str
    pattern_data: list[list[str]]
    length: int | None = None
    frequency: int
    kb_id: str | None = None  # the response's node_id, which is the kb_id


class NodeInfo(WireModel):
    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int


class NodePattern(WireModel):
    name: str
    pattern_data: list[list[str]]
    frequency: int


class NodePatternsPage(WireModel):
    node_id: str
    kb_id: str
    total: int
    offset: int
    limit: int
    patterns: list[NodePattern]


class NodeStats(WireModel):
    node_id: str
    kb_id: str
    pattern_count: int
    total_frequency: int
    distinct_symbols: int


class NodeList(WireModel):
    nodes: list[NodeInfo]


class LearnBatchResult(WireModel):
    status: str
    patterns: list[str]


class KeyedBatchResult(WireModel):
    key: str
    patterns: list[str]
    replayed: bool  # answered from the server's store: this key was applied before (by this or another request)


class LearnBatchesResult(WireModel):
    status: str
    results: list[KeyedBatchResult]


class CognitionData(WireModel):
    short_term_memory: list[list[str]]
    time: int  # the session's observation counter: +1 per observation, unchanged by a learn, 0 after clear-stm


class CognitionResult(WireModel):
    cognition_data: CognitionData
    session_id: str | None = None
    node_id: str | None = None
