"""The session record and the small pieces of KATO 3.10.1's semantics shared by the engine, the predictions and the
routes (emotive averaging, metadata accumulation, timestamps). Imports nothing of the server but the session
config's defaults and the store's JSON encoding, so every other module can use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from streamtrain.server import session_config as sc
from streamtrain.server.store import dumps

STM_CAP = 1000          # session_manager.py:53-79: STM and accumulators trimmed at save
PERSISTENCE = 5         # global emotive window (the per-session value is ignored by KATO)
DEFAULT_TTL = 3600


@dataclass
class Session:
    session_id: str
    node_id: str
    kb_id: str
    created_at: float
    expires_at: float
    ttl_seconds: int
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)      # overrides only
    stm: list[list[str]] = field(default_factory=list)
    emotives_acc: list[dict[str, float]] = field(default_factory=list)
    metadata_acc: list[dict[str, Any]] = field(default_factory=list)
    time: int = 0
    percept: dict[str, Any] = field(default_factory=dict)
    # Predictions computed by the last observe (process_predictions); memory only, for cognition-data.
    predictions: list[dict[str, Any]] = field(default_factory=list)
    persisted_expiry: float = 0.0

    def effective_config(self) -> dict[str, Any]:
        return sc.effective(self.config)

    def state_json(self) -> str:
        return dumps({"metadata": self.metadata, "config": self.config, "stm": self.stm,
                      "emotives_acc": self.emotives_acc, "metadata_acc": self.metadata_acc,
                      "time": self.time, "percept": self.percept})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def accumulate_metadata(acc: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for md in acc:
        for k, v in md.items():
            out.setdefault(k, set()).add(str(v))
    return {k: sorted(v) for k, v in out.items()}


def average_emotives(acc: list[dict[str, float]]) -> dict[str, float]:
    """Each emotive's mean over the dicts that hold it (a session's accumulator, a pattern's stored emotives)."""
    sums: dict[str, list[float]] = {}
    for e in acc:
        for k, v in e.items():
            sums.setdefault(k, []).append(v)
    return {k: float(sum(v) / len(v)) for k, v in sums.items()}
