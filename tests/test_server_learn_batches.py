"""POST /learn-batches (embedded server extension): several keyed batches in one request, each applied at most once
per key. The contract in-process (ASGI), /health during a maximal request through a real server process."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from health import AnnouncingServer, health_while_a_request_waits_for_the_store

from streamtrain.client import KatoClient
from streamtrain.errors import KeyAlreadyUsed
from streamtrain.patterns import pattern_name
from streamtrain.server import create_app
from streamtrain.server.app import DEFAULT_MAX_BATCH_ITEMS


def batch(key: str, *items: tuple[str, list[list[str]]]) -> dict:
    return {"key": key, "items": [{"node_id": node, "events": events} for node, events in items]}


A = batch("a", ("L0", [["b", "a"], ["c"]]), ("L1", [["x"], ["y"]]))
B = batch("b", ("L0", [["d"], ["e"]]), ("L0", [["solo"]]))
C = batch("c", ("L1", [["x"], ["y"]]), ("L0", [["b", "a"], ["c"]]))


def names_of(b: dict) -> list[str]:
    return [pattern_name([sorted(e) for e in it["events"]]) if sum(map(len, it["events"])) >= 2 else ""
            for it in b["items"]]


def kb(c: TestClient) -> dict[str, dict[str, int]]:
    out = {}
    for n in c.get("/nodes").json()["nodes"]:
        page = c.get(f"/nodes/{n['node_id']}/patterns").json()
        out[n["node_id"]] = {p["name"]: p["frequency"] for p in page["patterns"]}
    return out


@pytest.fixture()
def c(tmp_path):
    with TestClient(create_app(tmp_path / "kb.sqlite3", max_batch_items=10)) as client:
        yield client


def test_advertised_with_the_other_extensions(c):
    assert c.get("/").json()["extensions"] == ["nodes", "learn-batch", "learn-batches"]


def test_each_batch_applied_once_per_key(c):
    """The same request twice: the second is all replayed, with the same names, and the KB is unchanged."""
    first = c.post("/learn-batches", json={"batches": [A, B, C]})
    assert first.status_code == 200, first.text
    assert first.json() == {"status": "ok", "results": [
        {"key": "a", "patterns": names_of(A), "replayed": False},
        {"key": "b", "patterns": names_of(B), "replayed": False},
        {"key": "c", "patterns": names_of(C), "replayed": False}]}
    assert names_of(B)[1] == ""      # under 2 symbols: no pattern, as /learn-batch answers
    after_first = kb(c)
    assert after_first["L0"][names_of(A)[0]] == 2 and after_first["L1"][names_of(A)[1]] == 2   # A and C: 2 learns
    again = c.post("/learn-batches", json={"batches": [A, B, C]})
    assert again.status_code == 200
    assert again.json()["results"] == [{**r, "replayed": True} for r in first.json()["results"]]
    assert kb(c) == after_first


def test_a_batch_replays_when_sent_among_other_batches(c):
    """The fingerprint is the batch's items alone: sent alone first, then among new batches, it is replayed and
    the new ones applied; a batch repeated inside one request is applied once too."""
    assert c.post("/learn-batches", json={"batches": [B]}).json()["results"][0]["replayed"] is False
    r = c.post("/learn-batches", json={"batches": [A, B, A]}).json()["results"]
    assert [(x["key"], x["replayed"]) for x in r] == [("a", False), ("b", True), ("a", True)]
    assert r[1]["patterns"] == names_of(B) and r[0]["patterns"] == r[2]["patterns"] == names_of(A)
    assert kb(c) == {"L0": {names_of(A)[0]: 1, names_of(B)[0]: 1}, "L1": {names_of(A)[1]: 1}}


def test_a_reused_key_refuses_the_whole_request(c):
    """A key stored with other items: 422 IDEMPOTENCY_KEY_REUSED naming it, and nothing of the request is applied (not even
    the new batches before it). The same within one request."""
    assert c.post("/learn-batches", json={"batches": [A]}).status_code == 200
    before = kb(c)
    reused = batch("a", ("L0", [["other"], ["items"]]))
    for batches in ([B, reused], [reused], [B, batch("z", ("L0", [["p"], ["q"]])), batch("z", ("L0", [["r"], ["s"]]))]):
        r = c.post("/learn-batches", json={"batches": batches})
        assert r.status_code == 422, r.text
        key = batches[-1]["key"]
        assert r.json()["error"] == {"code": "IDEMPOTENCY_KEY_REUSED", "key": key, "message": r.json()["detail"]}
        assert repr(key) in r.json()["detail"]
        assert kb(c) == before
    # nothing of those requests was stored either: B still applies
    assert c.post("/learn-batches", json={"batches": [B]}).json()["results"][0]["replayed"] is False


def test_batch_keys_live_beside_idempotency_keys_without_colliding(c):
    """A batch key and an Idempotency-Key of the same text are different keys."""
    r = c.post("/learn-batch", json={"items": A["items"]}, headers={"Idempotency-Key": "a"})
    assert r.status_code == 200
    r = c.post("/learn-batches", json={"batches": [batch("a", ("L0", [["m"], ["n"]]))]})
    assert r.status_code == 200 and r.json()["results"][0]["replayed"] is False


def test_item_limit_counts_every_batch_before_anything_else(c):
    """More items over all batches than --max-batch-items: 413 naming the limit, before validation (an invalid
    item in it changes nothing) and with nothing applied; exactly the limit is accepted."""
    items = [("L0", [[f"s{i}"], ["t"]]) for i in range(4)]
    over = [batch("o1", *items), batch("o2", *items), batch("o3", *items[:2]), {"key": "", "items": "nope"}]
    over[2]["items"].append({"node_id": "L0", "events": "invalid"})
    r = c.post("/learn-batches", json={"batches": over})
    assert r.status_code == 413
    assert "11 items" in r.json()["detail"] and "at most 10 per request (--max-batch-items)" in r.json()["detail"]
    assert c.get("/nodes").json()["nodes"] == []
    exact = [batch("e1", *items), batch("e2", *items), batch("e3", *items[:2])]
    r = c.post("/learn-batches", json={"batches": exact})
    assert r.status_code == 200 and sum(len(x["patterns"]) for x in r.json()["results"]) == 10


@pytest.mark.parametrize("body", [
    {"batches": []},
    {"batches": [{"key": "k", "items": []}]},
    {"batches": [{"key": "", "items": [{"node_id": "n", "events": [["a"], ["b"]]}]}]},
    {"batches": [{"key": "k" * 201, "items": [{"node_id": "n", "events": [["a"], ["b"]]}]}]},
    {"batches": [{"items": [{"node_id": "n", "events": [["a"], ["b"]]}]}]},
    {"batches": [{"key": "k", "items": [{"node_id": "n", "events": [["a"], ["b"]]}]},
                 {"key": "k2", "items": [{"node_id": "", "events": [["a"]]}]}]},
    {"batches": [{"key": "k", "items": [{"node_id": "n", "events": []}]}]},
    {"items": [{"node_id": "n", "events": [["a"], ["b"]]}]},
])
def test_invalid_request_is_422_and_applies_nothing(c, body):
    r = c.post("/learn-batches", json=body)
    assert r.status_code == 422 and isinstance(r.json()["detail"], list), r.text
    assert c.get("/nodes").json()["nodes"] == []


def test_a_lone_surrogate_is_422_and_applies_nothing(c):
    """A lone surrogate escape ("\\ud800"): json.loads reads it, no database row can hold it (it failed the request
    with a 500, which stops a training run on every retry); pydantic's parser refuses it: 422, nothing applied."""
    body = b'{"batches":[{"key":"sur","items":[{"node_id":"L0","events":[["\\ud800"],["x"]]}]}]}'
    r = c.post("/learn-batches", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid", r.text
    assert c.get("/nodes").json()["nodes"] == []


def test_key_of_200_characters_is_accepted(c):
    r = c.post("/learn-batches", json={"batches": [batch("k" * 200, ("n", [["a"], ["b"]]))]})
    assert r.status_code == 200


def test_not_offered_without_idempotency(tmp_path):
    """It cannot be exact without keys: 404 like any unknown path, and not advertised."""
    with TestClient(create_app(tmp_path / "kb.sqlite3", idempotency=False)) as c:
        assert c.get("/").json()["extensions"] == ["nodes", "learn-batch"]
        r = c.post("/learn-batches", json={"batches": [A]})
        assert r.status_code == 404
        assert c.get("/nodes").json()["nodes"] == []


def test_client_learn_batches(tmp_path):
    """KatoClient.learn_batches: the names per batch; resent, the same names and nothing applied; a reused key is
    KeyAlreadyUsed (a ProtocolError with status 422) naming the key."""
    with TestClient(create_app(tmp_path / "kb.sqlite3")) as http, KatoClient("http://testserver", http=http) as client:
        assert client.supports_learn_batches
        batches = [("k1", [("L0", [["b", "a"], ["c"]]), ("L1", [["x"], ["y"]])]), ("k2", [("L0", [["solo"]])])]
        names = client.learn_batches(batches)
        assert names == [names_of(A), [""]]
        assert client.learn_batches(batches) == names
        assert client.export_knowledge_base() == {"L0": {names[0][0]: 1}, "L1": {names[0][1]: 1}}
        with pytest.raises(KeyAlreadyUsed) as err:
            client.learn_batches([("k1", [("L0", [["other"], ["x"]])])])
        assert err.value.status_code == 422 and err.value.error_code == "IDEMPOTENCY_KEY_REUSED"
        assert err.value.key == "k1"


def test_client_without_idempotency_is_not_offered_learn_batches(tmp_path):
    with TestClient(create_app(tmp_path / "kb.sqlite3", idempotency=False)) as http, \
            KatoClient("http://testserver", http=http) as client:
        assert client.supports_learn_batch is False and client.supports_learn_batches is False


# ------------------------------------------------------------------------------------------ a real process
def test_health_answers_while_a_maximal_request_waits_for_the_store(tmp_path):
    """A learn-batches request of the largest accepted size (items over several batches) is applied in a worker
    thread: while it waits for SQLite's write lock (held by the test), /health keeps answering; once the lock is
    free every batch is applied. One item more is a 413. (health.py: decided without a clock.)"""
    def body(tag: str, n: int) -> dict:
        per = n // 4
        sizes = [per, per, per, n - 3 * per]
        return {"batches": [{"key": f"{tag}-{b}",
                             "items": [{"node_id": f"big-{tag}-L{i % 3}", "events": [[f"{tag}{b}i{i}s{j}"]
                                                                                    for j in range(8)]}
                                       for i in range(size)]}
                            for b, size in enumerate(sizes)]}

    with AnnouncingServer(tmp_path / "kb.sqlite3", tmp_path / "marks") as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        over = c.post("/learn-batches", json=body("o", DEFAULT_MAX_BATCH_ITEMS + 1))
        assert over.status_code == 413, over.text
        assert f"at most {DEFAULT_MAX_BATCH_ITEMS}" in over.json()["detail"]
        assert c.get("/nodes").json()["nodes"] == []

        payload = json.dumps(body("m", DEFAULT_MAX_BATCH_ITEMS)).encode()
        status, answer = health_while_a_request_waits_for_the_store(srv, "/learn-batches", payload)
        assert status == 200, answer[:2000]
        results = json.loads(answer)["results"]
        assert [r["replayed"] for r in results] == [False] * 4
        assert sum(len(r["patterns"]) for r in results) == DEFAULT_MAX_BATCH_ITEMS
        stats = [c.get(f"/nodes/big-m-L{k}/stats").json()["pattern_count"] for k in range(3)]
        assert sum(stats) == DEFAULT_MAX_BATCH_ITEMS


def test_batch_keys_expire_with_the_idempotency_ttl(tmp_path, clock):
    """A batch key lives as long as an Idempotency-Key (--idempotency-ttl): replayed within it, applied again (as
    a new key) after it."""
    with TestClient(create_app(tmp_path / "kb.sqlite3", idempotency_ttl=100, clock=clock)) as c:
        assert c.post("/learn-batches", json={"batches": [A]}).json()["results"][0]["replayed"] is False
        clock.advance(99)
        assert c.post("/learn-batches", json={"batches": [A]}).json()["results"][0]["replayed"] is True
        assert kb(c)["L0"][names_of(A)[0]] == 1
        clock.advance(2)
        assert c.post("/learn-batches", json={"batches": [A]}).json()["results"][0]["replayed"] is False
        assert kb(c)["L0"][names_of(A)[0]] == 2
