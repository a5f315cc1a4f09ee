"""POST /learn-batch (embedded server extension): the knowledge-base effect of per-chunk learns, in one request."""

from __future__ import annotations

import httpx
import pytest

from streamtrain.client import KatoClient
from streamtrain.patterns import pattern_name
from streamtrain.server import EmbeddedServer

UNITS = [[["b"], ["a"]], [["it's"], ["x", "c"]], [["b"], ["a"]], [["solo"]], [["q"], ["r"], ["s"]]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedServer(tmp_path_factory.mktemp("batch") / "kb.sqlite3") as srv:
        yield srv


def per_chunk(client: KatoClient, node: str, units) -> list[str]:
    """The same units the KATO way: a session, observe-sequence + learn per unit."""
    sid = client.create_session(node, {"process_predictions": False}).session_id
    names = [client.observe_sequence(sid, u, learn_at_end=True).final_learned_pattern or "" for u in units]
    client.delete_session(sid)
    return names


def test_batch_leaves_the_knowledge_base_of_per_chunk_learns(server):
    """Names, patterns and frequencies equal those of observe-sequence + learn per unit (sorting, repeats, <2 symbols)."""
    with KatoClient(server.url) as client:
        assert client.supports_learn_batch
        batch_names = client.learn_batch([("batch-a", u) for u in UNITS], idempotency_key="b-1")
        chunk_names = per_chunk(client, "chunk-a", UNITS)
        kb = client.export_knowledge_base()
    assert batch_names == chunk_names == [pattern_name([sorted(e) for e in u]) for u in UNITS]
    assert kb["batch-a"] == kb["chunk-a"] and kb["batch-a"][batch_names[0]] == 2 and "" not in kb["batch-a"]


def test_batch_spans_nodes_and_applies_once_per_key(server):
    """Items go to their own nodes; a replayed key returns the stored answer and adds nothing."""
    items = [("span-L0", [["a"], ["b"]]), ("span-L1", [["x"], ["y"]])]
    with KatoClient(server.url) as client:
        first = client.learn_batch(items, idempotency_key="b-span")
        again = client.learn_batch(items, idempotency_key="b-span")
        kb = client.export_knowledge_base()
    assert first == again
    assert kb["span-L0"] == {first[0]: 1} and kb["span-L1"] == {first[1]: 1}


def test_invalid_batch_is_422_and_applies_nothing(server):
    """A malformed item rejects the whole batch (validation before any learn)."""
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/learn-batch", json={"items": [{"node_id": "bad-batch", "events": [["a"], ["b"]]},
                                                      {"node_id": "bad-batch", "events": "nope"}]})
        assert r.status_code == 422
        assert http.get("/nodes/bad-batch/stats").status_code == 404   # the node was never created


def test_without_idempotency_the_trainer_is_not_offered_batches(server_without_idempotency):
    """A server playing a real KATO (no keys) is not used for batches: a batch could not be retried safely."""
    with KatoClient(server_without_idempotency.url) as client:
        assert not client.supports_learn_batch
