"""Learn-batch and learn-batches write the learns of a request together (one statement per table, the counts added
up first): the database and the answers must be those of the same learns made one by one through sessions
(observe-sequence + learn, the KATO path), whatever repeats inside a request, across requests and across nodes."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from streamtrain.server import create_app
from streamtrain.server.service import BatchItem, batch_fingerprint
from streamtrain.server.store import dumps, events_json

TABLES = {"kbs": "kb_id", "patterns": "kb_id, name", "symbols": "kb_id, symbol"}


def dump(db: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(db)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall() for t, order in TABLES.items()}
    finally:
        conn.close()


def items_of(seed: int, n: int) -> list[tuple[str, list[list[str]]]]:
    """Random learns over a small vocabulary: patterns repeat (in one request and across requests), symbols repeat
    inside a pattern, some items hold one symbol (no pattern); "lvl-1" and "lvl_1" share one knowledge base."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(12)]
    nodes = ["lvl0", "lvl-1", "lvl_1", "other"]
    pool = [[sorted(rng.choices(vocab, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))] for _ in range(25)]
    return [(rng.choice(nodes), rng.choice(pool)) for _ in range(n)]


def predictions(c: TestClient, node: str, stm: list[list[str]]) -> list[tuple]:
    sid = c.post("/sessions", json={"node_id": node, "config": {"process_predictions": False}}).json()["session_id"]
    c.post(f"/sessions/{sid}/observe-sequence", json={"observations": [{"strings": e} for e in stm]})
    preds = c.get(f"/sessions/{sid}/predictions").json()["predictions"]
    c.delete(f"/sessions/{sid}")
    return [(p["name"], p["frequency"], p["potential"]) for p in preds]


def one_by_one(c: TestClient, items: list[tuple[str, list[list[str]]]]) -> list[str]:
    sessions: dict[str, str] = {}
    names = []
    for node, events in items:
        if node not in sessions:
            sessions[node] = c.post("/sessions", json={"node_id": node,
                                                        "config": {"process_predictions": False}}).json()["session_id"]
        sid = sessions[node]
        r = c.post(f"/sessions/{sid}/observe-sequence",
                   json={"observations": [{"strings": e} for e in events], "learn_at_end": True})
        assert r.status_code == 200, r.text
        names.append(r.json()["final_learned_pattern"] or "")
    for sid in sessions.values():
        c.delete(f"/sessions/{sid}")
    return names


def test_batches_leave_the_database_of_learns_one_by_one(tmp_path):
    items = items_of(1, 300)
    stm = [["w1"], ["w2", "w3"]]
    with TestClient(create_app(tmp_path / "ref.sqlite3")) as ref:
        # Indexes loaded before the learns: kept current by the learns (predictions compared at the end).
        before = [predictions(ref, node, stm) for node in ("lvl0", "lvl_1")]
        expected = one_by_one(ref, items)
        ref_predictions = [predictions(ref, node, stm) for node in ("lvl0", "lvl_1", "other")]
    with TestClient(create_app(tmp_path / "batches.sqlite3")) as c:
        assert [predictions(c, node, stm) for node in ("lvl0", "lvl_1")] == before
        got: list[str] = []
        # learn-batches: requests of 1 to 6 batches of 1 to 12 items, one batch repeated (replayed) in a request
        i = request = 0
        rng = random.Random(2)
        while i < len(items):
            batches, names_at = [], []
            for b in range(rng.randint(1, 6)):
                part = items[i:i + rng.randint(1, 12)]
                if not part:
                    break
                batches.append({"key": f"r{request}-{b}", "items": [{"node_id": n, "events": e} for n, e in part]})
                names_at.append(len(batches) - 1)
                i += len(part)
            batches.append(batches[0])
            r = c.post("/learn-batches", json={"batches": batches})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert results[-1] == {**results[0], "replayed": True}
            for k in names_at:
                assert results[k]["replayed"] is False
                got.extend(results[k]["patterns"])
            request += 1
        assert got == expected
        assert [predictions(c, node, stm) for node in ("lvl0", "lvl_1", "other")] == ref_predictions
    assert dump(tmp_path / "batches.sqlite3") == dump(tmp_path / "ref.sqlite3")


def test_learn_batch_leaves_the_database_of_learns_one_by_one(tmp_path):
    items = items_of(3, 200)
    with TestClient(create_app(tmp_path / "ref.sqlite3")) as ref:
        expected = one_by_one(ref, items)
    with TestClient(create_app(tmp_path / "batch.sqlite3")) as c:
        got = []
        for i in range(0, len(items), 37):
            r = c.post("/learn-batch", json={"items": [{"node_id": n, "events": e} for n, e in items[i:i + 37]]},
                       headers={"Idempotency-Key": f"k{i}"})
            assert r.status_code == 200, r.text
            got.extend(r.json()["patterns"])
        assert got == expected
    assert dump(tmp_path / "batch.sqlite3") == dump(tmp_path / "ref.sqlite3")


# any text a JSON string can carry (lone surrogates too: json.loads makes them from "\\ud800" escapes)
_events = st.lists(st.lists(st.text(st.characters(codec=None)), max_size=4), max_size=6)
_valid_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1)    # what the request model accepts


@given(_events)
def test_pattern_data_is_json_dumps_text(events):
    """pattern_data is written without json.dumps (too slow per learn): the stored text must be json.dumps's."""
    assert events_json(events) == dumps(events)


@given(st.lists(st.tuples(_valid_text, st.lists(st.lists(_valid_text, max_size=3), min_size=1, max_size=4)),
                min_size=1, max_size=3))
def test_batch_fingerprint_is_that_of_json_dumps(items):
    """Batch keys stored by earlier versions keep their fingerprints: a resent batch is replayed, not refused."""
    batch = [BatchItem(node_id=node, events=events) for node, events in items]
    canon = json.dumps([[i.node_id, i.events] for i in batch], ensure_ascii=False, separators=(",", ":"))
    assert batch_fingerprint(batch) == hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()
