"""Crash durability: SIGKILL the server between and during learns, restart it on the same database, and
check that every learn that was answered 200 is there with the right frequency (and sessions survive)."""

from __future__ import annotations

import random
import threading
from collections import Counter

import httpx
import pytest
from soak import SOAK

from streamtrain.patterns import pattern_name
from streamtrain.server import EmbeddedServer


def chunk(i: int) -> list[list[str]]:
    """Content number i; contents repeat (i % 7) so frequencies above 1 are exercised."""
    k = i % 7
    return [[f"w{k}"], [f"x{k}", "y"], [f"z{k}"]]


def frequencies(c: httpx.Client, node: str) -> dict[str, int]:
    out, offset = {}, 0
    while True:
        page = c.get(f"/nodes/{node}/patterns", params={"offset": offset, "limit": 1000}).json()
        assert page["patterns"] or offset >= page["total"], f"an empty page at {offset} of {page['total']}"
        out.update({p["name"]: p["frequency"] for p in page["patterns"]})
        offset += len(page["patterns"])
        if offset >= page["total"]:
            return out


@pytest.mark.soak
def test_sigkill_during_and_between_learns(tmp_path):
    rounds = 12 if SOAK else 4
    per_round = 300 if SOAK else 100
    node = "durable-node"
    answered: Counter[str] = Counter()       # learns that answered 200
    uncertain: Counter[str] = Counter()      # learns in flight when the server died
    rng = random.Random(7)
    i = 0
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        c = httpx.Client(base_url=srv.url, timeout=10)
        sid = c.post("/sessions", json={"node_id": node, "config": {"process_predictions": False}}).json()["session_id"]
        for rnd in range(rounds):
            during = rnd % 2 == 0
            killer = None
            if during:   # kill at a random moment while requests are flowing
                killer = threading.Timer(rng.uniform(0.02, 0.15), srv.kill)
                killer.start()
            for _ in range(per_round):
                events = chunk(i)
                i += 1
                name = pattern_name(events)
                try:
                    r = c.post(f"/sessions/{sid}/observe-sequence",
                               json={"observations": [{"strings": e} for e in events], "learn_at_end": True})
                except httpx.HTTPError:
                    uncertain[name] += 1
                    break
                assert r.status_code == 200, r.text
                assert r.json()["final_learned_pattern"] == name
                answered[name] += 1
            if killer is not None:
                killer.join()
            else:
                srv.kill()          # between learns: nothing in flight
            srv.restart()
            c = httpx.Client(base_url=srv.url, timeout=10)
            freq = frequencies(c, node)
            for name, n in answered.items():
                assert freq.get(name, 0) >= n, f"round {rnd}: {name} answered {n} times, stored {freq.get(name)}"
                assert freq[name] <= n + uncertain[name]
            assert set(freq) <= set(answered) | set(uncertain)
            # The session and its STM survived: learn_at_end left it empty.
            assert c.get(f"/sessions/{sid}/stm").json() == {"stm": [], "session_id": sid, "length": 0}
            # The in-flight learns are now decided (each stored count was checked to lie within bounds).
            answered = Counter(freq)
            uncertain.clear()
        stats = c.get(f"/nodes/{node}/stats").json()
        assert stats["total_frequency"] == sum(answered.values())
        assert stats["pattern_count"] == len(answered)


def test_session_state_survives_sigkill(tmp_path):
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        c = httpx.Client(base_url=srv.url, timeout=10)
        sid = c.post("/sessions", json={"node_id": "n", "ttl_seconds": 600,
                                        "config": {"max_pattern_length": 3, "stm_mode": "ROLLING"}}).json()["session_id"]
        for s in (["a"], ["b", "c"], ["d"], ["e"]):
            r = c.post(f"/sessions/{sid}/observe", json={"strings": s, "emotives": {"joy": 0.5}})
        before = c.get(f"/sessions/{sid}/stm").json()
        assert before["stm"] == [["d"], ["e"]] and r.json()["time"] == 4
        killed = srv.pid
        srv.kill()               # returns once the process is reaped: nothing to wait for
        srv.restart()
        assert srv.pid is not None and srv.pid != killed
        c = httpx.Client(base_url=srv.url, timeout=10)
        assert c.get(f"/sessions/{sid}/stm").json() == before
        cfg = c.get(f"/sessions/{sid}/config").json()["config"]
        assert cfg["max_pattern_length"] == 3 and cfg["stm_mode"] == "ROLLING"
        r = c.post(f"/sessions/{sid}/observe", json={"strings": ["f"]}).json()
        assert r["time"] == 5 and r["auto_learned_pattern"] == pattern_name([["d"], ["e"], ["f"]])
        got = c.get(f"/sessions/{sid}").json()
        assert got["ttl_seconds"] in (599, 600)


def _patterns_in_main_file(db) -> int:
    """Patterns in the database file itself, ignoring its WAL (what a checkpoint has folded in)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM patterns").fetchone()[0]
    except sqlite3.OperationalError:  # no table yet in the main file
        return 0
    finally:
        conn.close()


def test_wal_is_folded_in_while_the_server_runs(tmp_path):
    """Learns reach the database file itself shortly after their commit, by the background checkpoint thread
    (the writer's own auto-checkpoint is a backstop at a size these few learns never reach)."""
    import time

    db = tmp_path / "kb.sqlite3"
    with EmbeddedServer(db) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for i in range(20):
            c.post("/learn-batch", json={"items": [{"node_id": "fold", "events": chunk(i + 100 * j)}
                                                   for j in range(5)]}).raise_for_status()
        learned = len(frequencies(c, "fold"))
        deadline = time.monotonic() + 15
        while _patterns_in_main_file(db) < learned and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.pid is not None  # still running: the file was written by the running server
        assert _patterns_in_main_file(db) == learned
