"""Bad input to the embedded server: each gets its documented status, nothing is half-applied, and the server
keeps answering (the HTTP contract in-process: create_app through TestClient). Bad database files, hosts and a
second server on one database give a clear startup error (real processes: `streamtrain.server` and EmbeddedServer)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from streamtrain.errors import ServerUnavailable
from streamtrain.server import EmbeddedServer, create_app

LIMIT = 4096


@pytest.fixture()
def c(app_client):
    """The app as `--max-body-bytes 4096` serves it."""
    return app_client(max_body_bytes=LIMIT)


@pytest.fixture()
def sid(c):
    return c.post("/sessions", json={"node_id": "bad-node", "config": {"process_predictions": False}}).json()["session_id"]


def still_serving(c, sid):
    assert c.get("/health").status_code == 200
    r = c.post(f"/sessions/{sid}/observe", json={"strings": ["ok"]})
    assert r.status_code == 200, r.text
    return r.json()


def raw(c, sid, body: bytes, path="observe"):
    return c.post(f"/sessions/{sid}/{path}", content=body, headers={"content-type": "application/json"})


def test_malformed_json(c, sid):
    r = raw(c, sid, b'{"strings": ["a", ]')
    assert r.status_code == 422
    d = r.json()["detail"][0]
    assert d["type"] == "json_invalid" and d["loc"] == ["body", 18]
    assert still_serving(c, sid)["time"] == 1


def test_wrong_types(c, sid):
    r = c.post(f"/sessions/{sid}/observe", json={"strings": [1, 2]})
    assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [["body", "strings", 0],
                                                                               ["body", "strings", 1]]
    r = c.post(f"/sessions/{sid}/observe", json={"strings": ["a"], "emotives": {"joy": "lots"}})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "float_parsing"
    r = c.post(f"/sessions/{sid}/observe-sequence", json={"observations": {"strings": ["a"]}})
    assert r.status_code == 422
    r = c.post(f"/sessions/{sid}/config", json={"config": {"max_predictions": "ten"}})
    assert r.status_code == 400
    assert r.json()["detail"]["validation_errors"] == {"max_predictions": "Must be an integer between 1 and 10000"}
    r = c.post("/sessions", json={"node_id": "bad-node", "config": {"recall_threshold": "high"}})
    assert r.status_code == 400 and "recall_threshold" in r.json()["detail"]["validation_errors"]
    r = c.post("/sessions", json={"config": {}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "node_id"]
    assert still_serving(c, sid)["time"] == 1


def test_unknown_session(c):
    for method, path in [("POST", "observe"), ("GET", "stm"), ("POST", "learn"), ("GET", "predictions"),
                         ("POST", "clear-stm"), ("GET", "config")]:
        r = c.request(method, f"/sessions/session-missing/{path}", json={"strings": ["a"]})
        assert r.status_code == 404
        assert r.json() == {"error": {"code": "SESSION_NOT_FOUND",
                                      "message": "Session session-missing not found or expired",
                                      "session_id": "session-missing"}}
    r = c.get("/sessions/session-missing")
    assert r.status_code == 404 and r.json() == {"detail": "Session session-missing not found or expired"}
    assert c.get("/sessions/session-missing/exists").json()["exists"] is False


def test_non_utf8_bytes(c, sid):
    r = raw(c, sid, b'{"strings": ["\xff\xfe"]}')
    assert r.status_code == 400 and "UTF-8" in r.json()["detail"]
    for content_type in ("text/plain", None):     # not JSON by its header: the same 400, not a 500
        headers = {"Content-Type": content_type} if content_type else {}
        for path in (f"/sessions/{sid}/observe", "/sessions", "/learn-batch"):
            r = c.post(path, content=b'{"strings": ["\xff\xfe"]}', headers=headers)
            assert r.status_code == 400 and "UTF-8" in r.json()["detail"], (path, content_type, r.text)
    assert c.get(f"/sessions/{sid}/stm").json()["stm"] == []
    assert still_serving(c, sid)["time"] == 1


def test_oversized_body(c, sid):
    big = {"observations": [{"strings": ["x" * 100]} for _ in range(100)], "learn_at_end": True}
    r = c.post(f"/sessions/{sid}/observe-sequence", json=big)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"]

    def chunks():            # no Content-Length: the limit must hold for a streamed body too
        for _ in range(20):
            yield b" " * 512

    r = c.post(f"/sessions/{sid}/observe", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert c.get(f"/sessions/{sid}/stm").json()["stm"] == []
    assert still_serving(c, sid)["time"] == 1


def test_failing_item_applies_nothing(c, sid):
    c.post(f"/sessions/{sid}/observe", json={"strings": ["before"]})
    body = {"observations": [{"strings": ["a", "b"]}, {"strings": ["c", "d"]}, {"vectors": [[0.1, 0.2]]}],
            "learn_after_each": True}
    r = c.post(f"/sessions/{sid}/observe-sequence", json=body)
    assert r.status_code == 400 and r.json()["detail"]["observation_index"] == 2
    assert c.get(f"/sessions/{sid}/stm").json()["stm"] == [["before"]]
    assert c.get("/nodes/bad-node/stats").json()["pattern_count"] == 0
    assert still_serving(c, sid)["time"] == 2


def test_token_required(app_client):
    c = app_client(token="s3cret")
    assert c.get("/health").status_code == 200
    r = c.post("/sessions", json={"node_id": "n"})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.post("/sessions", json={"node_id": "n"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def run_server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamtrain.server", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)


def test_db_that_is_not_sqlite(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("plain notes, no SQLite header\n" * 100)
    p = run_server_cli("--db", str(junk))
    assert p.returncode != 0
    assert "not a database" in p.stderr and str(junk) in p.stderr
    assert "Traceback" not in p.stderr
    assert junk.read_text().startswith("plain notes")     # untouched
    with pytest.raises(ServerUnavailable, match="not a database"):
        EmbeddedServer(junk, startup_timeout=20).start()


def test_read_only_db(tmp_path):
    db = tmp_path / "kb.sqlite3"
    app = create_app(db)                                # a database with something in it, made in-process
    with TestClient(app) as c:
        assert c.post("/sessions", json={"node_id": "ro"}).status_code == 200
    app.state.server.store.close()
    os.chmod(db, 0o444)
    p = run_server_cli("--db", str(db))
    assert p.returncode != 0 and "read-only" in p.stderr and "Traceback" not in p.stderr


def test_missing_db_folder(tmp_path):
    p = run_server_cli("--db", str(tmp_path / "nope" / "kb.sqlite3"))
    assert p.returncode != 0 and "does not exist" in p.stderr


def test_non_loopback_host_without_token_is_refused_unless_opted_out(tmp_path):
    """Another interface without a token: refused with a one-line message; --allow-no-token serves it with a
    warning; loopback without a token stays allowed (KATO clients send none)."""
    p = run_server_cli("--db", str(tmp_path / "kb.sqlite3"), "--host", "0.0.0.0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: refusing to listen on 0.0.0.0 without a token")
    assert "--allow-no-token" in p.stderr and "--token-file" in p.stderr
    log = tmp_path / "server.log"
    with EmbeddedServer(tmp_path / "kb.sqlite3", host="0.0.0.0", log_path=log,
                        extra_args=["--allow-no-token"]) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
    assert "without a token (--allow-no-token)" in log.read_text()
    log2 = tmp_path / "server2.log"
    with EmbeddedServer(tmp_path / "kb.sqlite3", log_path=log2):
        pass
    assert "without a token" not in log2.read_text()


def test_second_server_on_the_same_db_is_refused(tmp_path):
    db = tmp_path / "kb.sqlite3"
    with EmbeddedServer(db) as srv:
        p = run_server_cli("--db", str(db))
        assert p.returncode != 0 and "already served by another process" in p.stderr
        assert str(srv.pid) in p.stderr
        assert httpx.get(srv.url + "/health").status_code == 200
    srv.start()                      # the lock went with the process
    srv.kill()
    srv.restart()                    # and with a SIGKILLed one too
    srv.stop()


def test_a_server_waits_for_the_one_a_killed_trainer_left(tmp_path):
    """--wait-for-db (what a trainer's EmbeddedServer passes): a second server waits for the database's holder to stop,
    then serves; the server of a SIGKILLed trainer stops itself within a second, so its successor starts."""
    import threading

    db = tmp_path / "kb.sqlite3"
    first = EmbeddedServer(db).start()
    second = EmbeddedServer(db, log_path=tmp_path / "second.log")
    started = threading.Thread(target=second.start)
    started.start()
    log = tmp_path / "second.log"
    deadline = time.monotonic() + 30
    while "waiting for it to stop" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        assert started.is_alive(), "the second server did not wait for the first"
        time.sleep(0.05)
    assert started.is_alive(), "the second server did not wait for the first"
    assert "waiting for it to stop" in log.read_text(), "the second server did not say it waits"
    first.stop()
    started.join(timeout=20)
    try:
        assert not started.is_alive() and second.pid is not None
        assert httpx.get(second.url + "/health").status_code == 200
    finally:
        second.stop()
