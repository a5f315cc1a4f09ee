"""Every deliberate difference from KATO 3.10.1, in one place (read by tests/test_server_conformance.py
and mirrored in docs/server.md).

DEVIATIONS maps a golden case id (../shared/golden/kato-golden.json) to why this server answers that
case differently on purpose; BEHAVIOUR lists deviations no golden case exercises.
"""

from __future__ import annotations

DEVIATIONS: dict[str, str] = {
    "public-039-session": (
        "create-invalid-config: POST /sessions with an invalid config value (persistence 1000) answers 400 "
        "with the validation errors; KATO 3.10.1 silently drops the WHOLE config and creates the session "
        "with defaults (kato-api.md §7.2)"),
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
        "on the one-symbol fast path future_potentials is computed for this request; KATO returns a stale "
        "value left by the processor's last multi-symbol call (possibly another session)"),
    "idempotency-keys": "Idempotency-Key header honoured (extension; --no-idempotency turns it off)",
    "durable-kb": (
        "frequencies, emotives and metadata are durable (SQLite); KATO keeps them in Redis without persistence"),
}
