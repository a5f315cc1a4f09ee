"""The embedded server is safe by default (issue 10), shown through real server processes on loopback:

* the trainer's own server requires a random bearer token, handed over in the environment (never argv): an
  intruder gets 401 while the run trains; the token is in no file of the run folder, nor in `inspect`;
* `server_token` never reaches a checkpoint, the journal, a log or repr(); it can come from the environment;
* `streamtrain serve` takes its token from $STREAMTRAIN_SERVER_TOKEN, --token-file or --token, refuses a bad
  port, a taken port, or (tested in test_server_bad_input) a non-loopback host without a token;
* idle, silent and half-sent connections are closed within a few seconds;
* /health answers while a maximal learn-batch waits for the store; a larger one gets 413 naming the limit;
* the bearer scheme is case-insensitive; an unknown node is a 404.

Contract checks with no process behaviour (the client's split of a huge batch, the bearer scheme, the unknown
node) run in-process: create_app through TestClient.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from health import AnnouncingServer, health_while_a_request_waits_for_the_store
from runs import make_config, train_command

from streamtrain.client import KatoClient, kato
from streamtrain.config import SERVER_TOKEN_ENV, LayerConfig, RunConfig
from streamtrain.errors import ProtocolError
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.server import EmbeddedServer, create_app
from streamtrain.server.app import DEFAULT_MAX_BATCH_ITEMS
from streamtrain.server.cli import TOKEN_ENV
from streamtrain.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp_path: Path, corpus: Path, run_name: str, **overrides) -> RunConfig:
    """The trainer tests' small run (runs.make_config), two levels, 60 records, server_url as given (default none)."""
    url = overrides.pop("server_url", None)
    fields: dict = {"layers": [LayerConfig(chunk_size=6), LayerConfig(chunk_size=4)], "max_samples": 60, **overrides}
    return make_config(tmp_path, corpus, run_name, url, **fields)


def files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def inspect_output(path: Path) -> str:
    out = []
    for extra in ([], ["--json"]):
        p = subprocess.run([sys.executable, "-m", "streamtrain", "inspect", str(path), *extra],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out.append(p.stdout + p.stderr)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ the trainer's server
def test_trainers_own_server_turns_an_intruder_away_while_it_trains(demo_corpus, tmp_path):
    """A training process with the embedded server: its child server's command line holds no token, a request
    without the token gets 401 (clear-all included) while the run trains, /health stays open, the run ends with
    every sample trained, and the token is in no file of the run folder and not in `inspect` output."""
    cfg = run_config(tmp_path, demo_corpus, "guarded", max_samples=400, layers=[LayerConfig(chunk_size=2)] * 3)
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(cfg.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != SERVER_TOKEN_ENV}
    log = open(tmp_path / "child.log", "wb")
    child = subprocess.Popen(train_command(cfg_path), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None and time.monotonic() < deadline and child.poll() is None:
            for proc in psutil.Process(child.pid).children():
                try:
                    if "streamtrain.server" in proc.cmdline():
                        server = proc
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        assert server is not None, "the trainer started no embedded server"
        argv = server.cmdline()
        url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
        token = server.environ().get(TOKEN_ENV, "")
        assert len(token) >= 40, "the server got no generated token in its environment"
        assert not any(token in arg for arg in argv) and "--token" not in argv
        with httpx.Client(base_url=url, timeout=10) as intruder:
            while True:
                try:
                    if intruder.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and child.poll() is None, \
                    "the trainer's server never answered /health: " + (tmp_path / "child.log").read_text()[-3000:]
                time.sleep(0.05)
            trained_while_probed = False
            knock_until = time.monotonic() + 120
            while time.monotonic() < knock_until and child.poll() is None:
                created = intruder.post("/sessions", json={"node_id": cfg.node_id(0)})
                assert created.status_code == 401, created.text
                assert intruder.post("/sessions/anything/clear-all").status_code == 401
                assert intruder.get("/nodes").status_code == 401
                assert intruder.post("/learn-batch", json={"items": []}).status_code == 401
                assert intruder.get("/health").status_code == 200
                if (cfg.run_dir / "journal.jsonl").exists():
                    trained_while_probed = True
                    break
                time.sleep(0.05)
            assert trained_while_probed, "the run never started training while the intruder knocked"
            assert child.poll() is None, "the run ended before the intruder was turned away"
            # the token itself works, so the 401s above are the token check, not a broken server
            owner = intruder.get("/nodes", headers={"Authorization": f"Bearer {token}"})
            assert owner.status_code == 200
        assert child.wait(timeout=300) == 0, (tmp_path / "child.log").read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    latest = CheckpointStore(cfg.run_dir).latest()
    assert latest is not None and latest.reason == "end" and latest.position.raw_offset == 400
    assert files_holding(cfg.run_dir, token) == []
    assert token not in inspect_output(cfg.run_dir)
    assert token not in (tmp_path / "child.log").read_text()


def test_server_token_is_never_written_down(demo_corpus, tmp_path, monkeypatch):
    """A run against a token-protected server (token from the config, then from the environment): no
    checkpoint, journal line, log or `inspect` output holds the token; repr() hides it; a checkpoint's config
    round-trips and resumes without it."""
    secret = "s3cret-" + os.urandom(8).hex()
    # The token reaches the server through a file (not EmbeddedServer(token=...), which this process's trainer
    # would find by itself): the run must get it from its config, then from the environment.
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text(secret)
    token_file.chmod(0o600)
    with EmbeddedServer(tmp_path / "kb.sqlite3", extra_args=["--token-file", str(token_file)]) as srv:
        cfg = run_config(tmp_path, demo_corpus, "tokened", server_url=srv.url, server_token=secret, max_samples=30)
        assert secret not in repr(cfg) and secret not in str(cfg) and secret not in cfg.model_dump_json()
        assert "server_token" not in cfg.model_dump(mode="json")
        assert cfg.server_token_value() == secret
        assert train(cfg, progress=False).final_position == 30
        # the same run resumed with the token from the environment only
        monkeypatch.setenv(SERVER_TOKEN_ENV, secret)
        resumed = cfg.model_copy(update={"server_token": None, "max_samples": 60})
        from_env = RunConfig.model_validate({**resumed.model_dump(mode="json")})
        assert from_env.server_token_value() == secret
        result = train(from_env, progress=False)
        assert result.resumed and result.final_position == 60
        # without any token the server refuses, and the message says where the token comes from
        monkeypatch.delenv(SERVER_TOKEN_ENV)
        with pytest.raises(ProtocolError, match="401.*bearer token"):
            with KatoClient(srv.url) as anonymous:
                anonymous.create_session("x")
    assert files_holding(cfg.checkpoint_dir, secret) == []
    assert secret not in inspect_output(cfg.run_dir)
    found = CheckpointStore(cfg.run_dir).latest_with_path()
    assert found is not None and found[0].config.server_token is None
    assert "server_token" not in json.loads(found[1].read_text())["config"]


# ------------------------------------------------------------------------------------------ streamtrain serve
def serve_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamtrain", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_serve_takes_its_token_from_env_or_file_never_needing_argv(tmp_path):
    """$STREAMTRAIN_SERVER_TOKEN (how EmbeddedServer hands it over) and --token-file both protect the server;
    the scheme name is case-insensitive; the token is on no command line."""
    with EmbeddedServer(tmp_path / "a.sqlite3", token="from-env") as srv:
        assert "from-env" not in " ".join(psutil.Process(srv.pid).cmdline())
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/nodes").status_code == 401
            for scheme in ("Bearer", "bearer", "BEARER"):
                assert c.get("/nodes", headers={"Authorization": f"{scheme} from-env"}).status_code == 200
            assert c.get("/nodes", headers={"Authorization": "Basic from-env"}).status_code == 401
            assert c.get("/nodes", headers={"Authorization": "Bearer from-envX"}).status_code == 401
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    with EmbeddedServer(tmp_path / "b.sqlite3", extra_args=["--token-file", str(token_file)]) as srv:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/nodes").status_code == 401
            assert c.get("/nodes", headers={"Authorization": "Bearer from-file"}).status_code == 200


def test_serve_refuses_bad_token_sources_and_ports(tmp_path):
    db = str(tmp_path / "kb.sqlite3")
    p = serve_cli("--db", db, "--port", "99999")
    assert p.returncode == 2 and "99999 is not a TCP port" in p.stderr and "Traceback" not in p.stderr
    p = serve_cli("--db", db, "--token-file", str(tmp_path / "missing"))
    assert p.returncode == 2 and p.stderr.startswith("error: cannot read --token-file") and "Traceback" not in p.stderr
    (tmp_path / "empty").write_text("\n")
    p = serve_cli("--db", db, "--token-file", str(tmp_path / "empty"))
    assert p.returncode == 2 and "is empty" in p.stderr
    p = serve_cli("--db", db, "--token", "a", "--token-file", str(tmp_path / "empty"))
    assert p.returncode == 2 and "not both" in p.stderr


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = serve_cli("--db", str(tmp_path / "kb.sqlite3"), "--port", str(port))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use (another server?); stop that "
                                "process or choose another --port")


# ------------------------------------------------------------------------------------------ bounded connections
def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds` (reading whatever it sent first)."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def test_idle_silent_and_half_sent_connections_are_closed(tmp_path):
    """200 half-sent requests (headers cut off, or a declared body never sent), silent connections, idle
    keep-alive connections and a slowloris that keeps dripping header bytes: every one is closed within a few
    seconds (default limits: 5 s for headers, 5 s idle keep-alive), and the server still answers."""
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        port = srv.port
        started = time.monotonic()
        socks: dict[str, list[socket.socket]] = {"headers": [], "body": [], "silent": [], "idle": []}
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            socks["headers"].append(s)
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"node_id\"")
            socks["body"].append(s)
        for _ in range(20):
            socks["silent"].append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            socks["idle"].append(s)
        drip = socket.create_connection(("127.0.0.1", port))
        stop = threading.Event()

        def slowloris():
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100:
                if stop.wait(0.5):
                    return
                try:
                    drip.send(bytes([byte]))
                except OSError:
                    return
        dripper = threading.Thread(target=slowloris, daemon=True)
        dripper.start()
        # the server still answers new requests while all of these are open
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        bound = 15.0   # the limits are 5 s; the margin is for a loaded machine
        for kind, group in socks.items():
            for s in group:
                closed, got = _closed_within(s, max(0.5, bound - (time.monotonic() - started)))
                assert closed, f"a {kind} connection was still open after {time.monotonic() - started:.1f} s"
                if kind == "headers":
                    assert got.startswith(b"HTTP/1.1 408"), got[:80]
                if kind == "idle":
                    assert got.startswith(b"HTTP/1.1 200"), got[:80]
                s.close()
        closed, _ = _closed_within(drip, max(0.5, bound - (time.monotonic() - started)))
        stop.set()
        assert closed, "the slowloris connection was still open"
        drip.close()
        assert time.monotonic() - started < bound + 1
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------ bounded requests
def big_batch(n: int, tag: str) -> dict:
    """n items, each 8 events of one new symbol (every item a new pattern with new symbols: the slowest case)."""
    return {"items": [{"node_id": f"big-{tag}-L{i % 3}", "events": [[f"{tag}{i}s{j}"] for j in range(8)]}
                      for i in range(n)]}


def test_health_answers_while_a_maximal_batch_waits_for_the_store(tmp_path):
    """A learn-batch of the largest accepted size is applied in a worker thread: while it waits for SQLite's write
    lock (held by the test), /health keeps answering (on the event loop it would wait for the whole batch); once the
    lock is free the batch is applied whole. One item more is a 413 that names the limit, and nothing of it is
    applied. (health.py: decided without a clock.)"""
    with AnnouncingServer(tmp_path / "kb.sqlite3", tmp_path / "marks") as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        over = c.post("/learn-batch", json=big_batch(DEFAULT_MAX_BATCH_ITEMS + 1, "o"))
        assert over.status_code == 413, over.text
        assert f"at most {DEFAULT_MAX_BATCH_ITEMS}" in over.json()["detail"]
        assert c.get("/nodes").json()["nodes"] == []

        body = json.dumps(big_batch(DEFAULT_MAX_BATCH_ITEMS, "m")).encode()
        status, answer = health_while_a_request_waits_for_the_store(srv, "/learn-batch", body)
        assert status == 200 and len(json.loads(answer)["patterns"]) == DEFAULT_MAX_BATCH_ITEMS, answer[:2000]
        stats = [c.get(f"/nodes/big-m-L{k}/stats").json()["pattern_count"] for k in range(3)]
        assert sum(stats) == DEFAULT_MAX_BATCH_ITEMS


def test_client_splits_a_huge_batch_into_keyed_parts(app_client, monkeypatch):
    """A sample with more learns than one request may carry goes in parts, each keyed: sent again (a resume
    after a crash), nothing is applied twice."""
    monkeypatch.setattr(kato, "LEARN_BATCH_PART", 4)
    items = [(f"split-L{i % 2}", [[f"a{i}"], [f"b{i}"]]) for i in range(10)]
    http = app_client(max_batch_items=5)                # the app as `--max-batch-items 5` serves it
    with KatoClient(str(http.base_url), http=http) as client:
        names = client.learn_batch(items, idempotency_key="sample-1")
        again = client.learn_batch(items, idempotency_key="sample-1")
        kb = client.export_knowledge_base()
        too_many = http.post("/learn-batch", json={"items": [{"node_id": "x", "events": [["a"], ["b"]]}] * 6})
    assert names == again and len(names) == 10 and all(names)
    assert sum(len(v) for v in kb.values()) == 10 and set(f for v in kb.values() for f in v.values()) == {1}
    assert too_many.status_code == 413 and "at most 5 per request (--max-batch-items)" in too_many.json()["detail"]


# ------------------------------------------------------------------------------------------ small things
def test_bearer_scheme_is_case_insensitive_in_process(tmp_path):
    with TestClient(create_app(tmp_path / "kb.sqlite3", token="t0k")) as c:
        assert c.get("/health").status_code == 200
        for header, status in (("Bearer t0k", 200), ("bearer t0k", 200), ("BeArEr  t0k", 200),
                               ("Bearer", 401), ("t0k", 401), ("Basic t0k", 401), ("Bearer t0", 401)):
            assert c.get("/nodes", headers={"Authorization": header}).status_code == status, header
        r = c.get("/nodes")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_unknown_node_is_404_and_analysis_reads_it_as_empty(tmp_path, demo_corpus, app_client):
    """/nodes/{id}/stats and /patterns of a node the server never saw: 404 naming it (not zeros that look like a
    trained-but-empty node); the analysis helpers still show such a level as empty."""
    from streamtrain import analysis

    cfg = run_config(tmp_path, demo_corpus, "partial", layers=[LayerConfig(chunk_size=2)] * 3)
    http = app_client()
    with KatoClient(str(http.base_url), http=http) as client:
        client.learn_batch([(cfg.node_id(0), [["a"], ["b"]])], idempotency_key="k")
        for path in ("stats", "patterns"):
            r = http.get(f"/nodes/{cfg.node_id(1)}/{path}")
            assert r.status_code == 404 and f"'{cfg.node_id(1)}' is unknown" in r.json()["detail"]
        assert http.get(f"/nodes/{cfg.node_id(0)}/stats").json()["pattern_count"] == 1
        rows = analysis.kb_summary(client, cfg)
        assert [r["patterns"] for r in rows] == [1, 0, 0] and rows[2]["node"] == cfg.node_id(2)
        kb = analysis.kb_by_level(client, cfg)
        assert len(kb[0]) == 1 and kb[1] == {} and kb[2] == {}
        assert analysis.top_patterns(client, cfg, 2) == []
