"""Idempotency-Key semantics of the embedded server: the contract in-process (create_app through TestClient,
expiry on an injected clock); concurrent connections and a crash against real server processes."""

from __future__ import annotations

import threading

import httpx
import pytest

from streamtrain.server import EmbeddedServer


@pytest.fixture()
def c(app_client):
    return app_client()


def new_session(c, node="idem-node") -> str:
    r = c.post("/sessions", json={"node_id": node, "config": {"process_predictions": False}})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def stm(c, sid):
    return c.get(f"/sessions/{sid}/stm").json()["stm"]


def test_sequential_replay_returns_first_answer_and_applies_once(c):
    sid = new_session(c)
    h = {"Idempotency-Key": "seq-1"}
    first = c.post(f"/sessions/{sid}/observe-sequence", headers=h,
                   json={"observations": [{"strings": ["a", "b"]}, {"strings": ["c"]}], "learn_at_end": True})
    assert first.status_code == 200
    for _ in range(3):
        again = c.post(f"/sessions/{sid}/observe-sequence", headers=h,
                       json={"observations": [{"strings": ["a", "b"]}, {"strings": ["c"]}], "learn_at_end": True})
        assert again.status_code == 200 and again.content == first.content
    name = first.json()["final_learned_pattern"]
    pat = c.get(f"/pattern/{name}", params={"node_id": "idem-node"}).json()["pattern"]["pattern"]
    assert pat["frequency"] == 1
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["z"]}).json()["time"] == 3


def test_same_key_different_body_or_path_is_422_and_applies_nothing(c):
    sid = new_session(c)
    h = {"Idempotency-Key": "conflict-1"}
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["x"]}, headers=h).status_code == 200
    r = c.post(f"/sessions/{sid}/observe", json={"strings": ["y"]}, headers=h)
    assert r.status_code == 422
    assert "conflict-1" in r.json()["detail"] and "different request" in r.json()["detail"]
    r = c.post(f"/sessions/{sid}/learn", headers=h)
    assert r.status_code == 422
    assert stm(c, sid) == [["x"]]


def test_eight_threads_one_key_apply_once(server):
    """Eight connections to a real server process send one key at once: applied once, one answer for all.
    (`server`: the session-wide default server of conftest.py; this test uses its own session.)"""
    c = httpx.Client(base_url=server.url, timeout=30)
    sid = new_session(c)
    barrier = threading.Barrier(8, timeout=30)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send():
        with httpx.Client(base_url=server.url, timeout=30) as own:
            barrier.wait()
            r = own.post(f"/sessions/{sid}/observe", json={"strings": ["once"]},
                         headers={"Idempotency-Key": "threads-1"})
            with lock:
                answers.append(r)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request was not answered within 60 s"
    assert [r.status_code for r in answers] == [200] * 8
    assert len({r.content for r in answers}) == 1
    assert stm(c, sid) == [["once"]]


def test_error_answers_are_not_stored(c):
    sid = new_session(c)
    h = {"Idempotency-Key": "learn-empty-1"}
    r = c.post(f"/sessions/{sid}/learn", headers=h)
    assert r.status_code == 400 and r.json() == {"detail": "Cannot learn from empty STM"}
    c.post(f"/sessions/{sid}/observe", json={"strings": ["p", "q"]})
    r = c.post(f"/sessions/{sid}/learn", headers=h)          # same key, same (empty) body: now it applies
    assert r.status_code == 200 and r.json()["pattern_name"].startswith("PTRN|")
    missing = c.post("/sessions/session-nope/observe", json={"strings": ["a"]}, headers={"Idempotency-Key": "nf"})
    assert missing.status_code == 404
    ok = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}, headers={"Idempotency-Key": "nf"})
    assert ok.status_code == 200            # the 404 did not claim the key


def test_replay_is_answered_before_the_session_lookup(c):
    sid = new_session(c)
    h = {"Idempotency-Key": "gone-1"}
    first = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}, headers=h)
    assert c.delete(f"/sessions/{sid}").status_code == 200
    again = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}, headers=h)
    assert again.status_code == 200 and again.content == first.content
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}).status_code == 404


def test_session_creation_replay_returns_the_same_session(c):
    body = {"node_id": "idem-create", "config": {"max_pattern_length": 3}}
    a = c.post("/sessions", json=body, headers={"Idempotency-Key": "create-1"}).json()
    b = c.post("/sessions", json=body, headers={"Idempotency-Key": "create-1"}).json()
    assert a == b
    nodes = [n for n in c.get("/nodes").json()["nodes"] if n["node_id"] == "idem-create"]
    assert len(nodes) == 1


def test_keys_survive_a_crash(tmp_path):
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        c = httpx.Client(base_url=srv.url, timeout=30)
        sid = new_session(c)
        h = {"Idempotency-Key": "crash-1"}
        first = c.post(f"/sessions/{sid}/observe", json={"strings": ["k"]}, headers=h)
        srv.kill()
        srv.restart()
        c = httpx.Client(base_url=srv.url, timeout=30)
        again = c.post(f"/sessions/{sid}/observe", json={"strings": ["k"]}, headers=h)
        assert again.content == first.content
        assert stm(c, sid) == [["k"]]


def test_keys_expire(app_client, clock):
    """A key older than the TTL (on the app's clock) no longer replays: the same request applies again."""
    c = app_client(idempotency_ttl=0.5, clock=clock)
    sid = new_session(c)
    h = {"Idempotency-Key": "short-1"}
    c.post(f"/sessions/{sid}/observe", json={"strings": ["e"]}, headers=h)
    clock.advance(0.4)
    c.post(f"/sessions/{sid}/observe", json={"strings": ["e"]}, headers=h)
    assert stm(c, sid) == [["e"]]                   # still within the TTL: a replay
    clock.advance(0.4)
    c.post(f"/sessions/{sid}/observe", json={"strings": ["e"]}, headers=h)
    assert stm(c, sid) == [["e"], ["e"]]


def test_no_idempotency_mode_applies_replays(app_client):
    c = app_client(idempotency=False)
    assert c.get("/").json()["idempotency"] is False
    sid = new_session(c)
    h = {"Idempotency-Key": "ignored-1"}
    for _ in range(2):
        assert c.post(f"/sessions/{sid}/observe", json={"strings": ["r", "s"]}, headers=h).status_code == 200
    assert stm(c, sid) == [["r", "s"], ["r", "s"]]
    name = c.post(f"/sessions/{sid}/learn", headers=h).json()["pattern_name"]
    c.post(f"/sessions/{sid}/observe-sequence", headers=h,
           json={"observations": [{"strings": ["r", "s"]}, {"strings": ["r", "s"]}], "learn_at_end": True})
    pat = c.get(f"/pattern/{name}", params={"node_id": "idem-node"}).json()["pattern"]["pattern"]
    assert pat["frequency"] == 2
