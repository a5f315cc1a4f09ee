"""Every deliberate difference from KATO 3.10.1, in one place (read by tests/test_server_conformance.py
and mirrored in docs/server.md).

DEVIATIONS maps a golden case id (tests/golden/kato-golden.json) to why this server answers that
case differently on purpose; BEHAVIOUR lists deviations no golden case exercises.
"""

from __future__ import annotations

from typing import NamedTuple


class Deviation(NamedTuple):
    reason: str
    failure: str     # a substring of the golden checker's first-difference message for this case


DEVIATIONS: dict[str, Deviation] = {
    "public-039-session": Deviation(
        reason=("create-invalid-config: POST /sessions with an invalid config value (persistence 1000) answers "
                "400 with the validation errors; KATO 3.10.1 silently drops the WHOLE config and creates the "
                "session with defaults (kato-api.md §7.2)"),
        failure="step 0 POST /sessions: status: expected 200, got 400"),
}

BEHAVIOUR: dict[str, str] = {
    "apostrophe-single-symbol": (
        "predictions on a one-symbol STM whose symbol contains an apostrophe work; KATO recurses for ~21 s "
        "and answers 500, losing the observation (kato-api.md §7.1)"),
    "atomic-observe-sequence": (
        "observe-sequence is one transaction: if any item fails nothing of the request is applied; KATO keeps "
        "patterns learned by earlier items"),
    "vectors": (
        "observations with vectors get 400 {detail:{error:'VectorsNotSupported',...}}: no vector store"),
    "future-potentials-single-symbol": (
        "on the one-symbol fast path future_potentials is []; KATO returns a stale value left by the "
        "processor's last multi-symbol call (possibly from another session)"),
    "fragmentation-minus-one": (
        "with recall_threshold 0 a pattern with no matching block (fragmentation -1) adds 0 to potential; "
        "KATO 3.10.1 divides by zero (500)"),
    "tie-order": (
        "predictions of equal rank value are ordered by name (deterministic); KATO's tie order is arbitrary"),
    "malformed-json-unknown-session": (
        "a body that is not valid JSON gets 422 even when the session does not exist; KATO's middleware "
        "answers 404 first"),
    "non-utf8-body": (
        "a body that is not UTF-8 gets 400 naming the byte offset (under any content type); KATO answers 400 "
        "'There was an error parsing the body'"),
    "not-implemented": (
        "GET /status, GET /sessions/count, POST /sessions/{id}/finalize-training, the symbol affinity and "
        "monitoring endpoints and the WebSocket are not implemented (404)"),
    "observe-time-predictions": (
        "the predictions an observe computes (process_predictions, shown by cognition-data) are computed once "
        "per request, for its last observation, and kept in memory only (empty after a restart); KATO "
        "computes them after every observation and stores them in Redis"),
    "idempotency-keys": "Idempotency-Key header honoured (extension; --no-idempotency turns it off)",
    "extensions": (
        "GET /nodes, /nodes/{id}/patterns, /nodes/{id}/stats, POST /learn-batch and (with idempotency) POST "
        "/learn-batches, listed in GET /'s \"extensions\"; KATO has none of them"),
    "durable-kb": (
        "frequencies, emotives and metadata are durable (SQLite); KATO keeps them in Redis without persistence"),
}
