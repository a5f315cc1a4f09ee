"""Smoke test of the embedded server: sessions, observe, learn, SIGKILL and restart, extensions (a real subprocess
of its own: it asserts on every node of the server); the idempotency-key replay in-process."""

from __future__ import annotations

import httpx
import pytest

from streamtrain.patterns import pattern_name
from streamtrain.server import EmbeddedServer


@pytest.fixture()
def own_server(tmp_path):
    """A server process for one test: it is killed and restarted, and /nodes must list only this test's node."""
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        yield srv


def test_session_observe_learn_and_restart(own_server):
    server = own_server
    c = httpx.Client(base_url=server.url, timeout=10)
    root = c.get("/").json()
    assert root["version"] == "3.10.1" and root["idempotency"] is True

    r = c.post("/sessions", json={"node_id": "smoke-node", "config": {"process_predictions": False}})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert sid.startswith("session-")
    assert c.get(f"/sessions/{sid}/exists").json()["exists"] is True

    r = c.post(f"/sessions/{sid}/observe", json={"strings": ["b", "a"]})
    assert r.json()["stm_length"] == 1 and r.json()["time"] == 1
    r = c.post(f"/sessions/{sid}/observe-sequence",
               json={"observations": [{"strings": ["c"]}, {"strings": ["d", "e"]}], "learn_at_end": True})
    body = r.json()
    expected = pattern_name([["a", "b"], ["c"], ["d", "e"]])
    assert body["final_learned_pattern"] == expected
    assert c.get(f"/sessions/{sid}/stm").json()["stm"] == []

    c.post(f"/sessions/{sid}/observe", json={"strings": ["x", "y"]})
    killed = server.pid
    server.kill()            # SIGKILL: the session and its STM must survive
    server.restart()
    assert server.pid is not None and server.pid != killed      # a new process answers
    c2 = httpx.Client(base_url=server.url, timeout=10)
    assert c2.get(f"/sessions/{sid}/stm").json()["stm"] == [["x", "y"]]
    learn = c2.post(f"/sessions/{sid}/learn").json()
    assert learn["pattern_name"] == pattern_name([["x", "y"]])

    nodes = c2.get("/nodes").json()["nodes"]
    assert nodes == [{"node_id": "smoke-node", "kb_id": "smoke_node_kato", "pattern_count": 2,
                      "total_frequency": 2}]
    pats = c2.get("/nodes/smoke-node/patterns").json()
    assert pats["total"] == 2 and [p["name"] for p in pats["patterns"]] == sorted(p["name"] for p in pats["patterns"])
    stats = c2.get("/nodes/smoke-node/stats").json()
    assert stats["distinct_symbols"] == 7 and stats["pattern_count"] == 2

    assert c2.delete(f"/sessions/{sid}").status_code == 200
    missing = c2.post(f"/sessions/{sid}/observe", json={"strings": ["z"]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_idempotency_key_replays_the_first_answer(app_client):
    c = app_client()
    sid = c.post("/sessions", json={"node_id": "idem"}).json()["session_id"]
    h = {"Idempotency-Key": "k-1"}
    first = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}, headers=h)
    again = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}, headers=h)
    assert again.status_code == 200 and again.content == first.content
    assert c.get(f"/sessions/{sid}/stm").json()["length"] == 1
    other = c.post(f"/sessions/{sid}/observe", json={"strings": ["b"]}, headers=h)
    assert other.status_code == 422 and "k-1" in other.json()["detail"]
