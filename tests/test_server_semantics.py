"""Pure semantic unit tests of the embedded server (in-process FastAPI TestClient): behaviour the golden
file does not cover, deliberate fixes of KATO bugs, the symbol index, the extensions."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from streamtrain.patterns import pattern_name
from streamtrain.server import create_app


@pytest.fixture()
def app(tmp_path):
    return create_app(tmp_path / "kb.sqlite3")


@pytest.fixture()
def c(app):
    with TestClient(app) as client:
        yield client


def session(c, node="sem", **config):
    r = c.post("/sessions", json={"node_id": node, "config": {"process_predictions": False, **config}})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def learn(c, sid, *events):
    r = c.post(f"/sessions/{sid}/observe-sequence",
               json={"observations": [{"strings": e} for e in events], "learn_at_end": True})
    assert r.status_code == 200
    return r.json()["final_learned_pattern"]


def test_single_symbol_with_apostrophe_predicts(c):
    """KATO 3.10.1 recurses ~21 s and answers 500 here (kato-api.md §7.1)."""
    sid = session(c)
    learn(c, sid, ["don't"], ["go"])
    learn(c, sid, ["don't"], ["stop", "x"])
    learn(c, sid, ["go"], ["don't"])
    r = c.post(f"/sessions/{sid}/config", json={"process_predictions": True})
    assert r.status_code == 200
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["don't"]}).status_code == 200
    r = c.get(f"/sessions/{sid}/predictions")
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert sorted(p["future"] for p in preds) == [["go"], ["stop", "x"]]       # flat, fast-path shape
    assert all(p["present"] == ["don't"] and p["matches"] == ["don't"] for p in preds)
    assert preds[0]["potential"] >= preds[1]["potential"]
    cog = c.get(f"/sessions/{sid}/cognition-data").json()["cognition_data"]
    assert len(cog["predictions"]) == 2


def test_symbol_index_and_early_stop_match_full_scan(app, c):
    rng = random.Random(3)
    vocab = [f"s{i}" for i in range(40)]
    sid = session(c, node="index")
    for _ in range(150):
        events = [rng.sample(vocab, rng.randint(1, 3)) for _ in range(rng.randint(2, 5))]
        learn(c, sid, *events)
    eng = app.state.server.engine
    kb = eng.kb_id("index")
    checked = 0
    for _ in range(15):
        stm = [sorted(rng.sample(vocab, rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        if sum(map(len, stm)) < 2:
            continue
        for threshold, max_predictions in ((0.1, 20), (0.1, 3), (0.3, 20), (0.6, 2), (0.0, 5)):
            kw = dict(recall_threshold=threshold, max_predictions=max_predictions, use_token_matching=True)
            a = eng.predict(kb, stm, **kw)
            b = eng.predict(kb, stm, use_index=False, **kw)
            c_ = eng.predict(kb, stm, use_index=False, early_stop=False, **kw)
            assert a == b == c_
            checked += 1
    assert checked >= 40


def test_threshold_zero_scores_every_pattern(app, c):
    sid = session(c, node="zero", recall_threshold=0.0)
    learn(c, sid, ["a"], ["b"])
    learn(c, sid, ["p"], ["q"])          # shares nothing with the STM below
    c.post(f"/sessions/{sid}/observe-sequence", json={"observations": [{"strings": ["a"]}, {"strings": ["b"]}]})
    preds = c.get(f"/sessions/{sid}/predictions").json()["predictions"]
    assert {p["name"] for p in preds} == {pattern_name([["a"], ["b"]])[5:], pattern_name([["p"], ["q"]])[5:]}
    unrelated = next(p for p in preds if p["sequence"] == [["p"], ["q"]])
    assert unrelated["fragmentation"] == -1.0 and unrelated["matches"] == []
    c.post(f"/sessions/{sid}/config", json={"recall_threshold": 0.1})
    preds = c.get(f"/sessions/{sid}/predictions").json()["predictions"]
    assert [p["sequence"] for p in preds] == [[["a"], ["b"]]]


def test_stm_is_capped_at_1000_events(c):
    sid = session(c)
    r = c.post(f"/sessions/{sid}/observe-sequence",
               json={"observations": [{"strings": [f"t{i}"]} for i in range(1005)]}).json()
    assert r["final_stm_length"] == 1005            # KATO reports the length before its save trims it
    stm = c.get(f"/sessions/{sid}/stm").json()
    assert stm["length"] == 1000 and stm["stm"][0] == ["t5"] and stm["stm"][-1] == ["t1004"]


def test_session_ttl_expiry_and_extend(app_client, clock):
    """Time moves on the app's injected clock, not by waiting."""
    c = app_client(clock=clock)
    sid = c.post("/sessions", json={"node_id": "ttl", "ttl_seconds": 1}).json()["session_id"]
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}).status_code == 200
    clock.advance(1.2)
    assert c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}).status_code == 404
    assert c.get(f"/sessions/{sid}/exists").json() == {"exists": False, "expired": False, "session_id": sid}
    sid = c.post("/sessions", json={"node_id": "ttl"}).json()["session_id"]
    assert c.post(f"/sessions/{sid}/extend", params={"ttl_seconds": 120}).json()["ttl_seconds"] == 120
    assert c.get(f"/sessions/{sid}").json()["ttl_seconds"] in (3599, 3600)     # the next access slides back


def test_clear_all_wipes_only_this_nodes_kb(c):
    a = session(c, node="wipe")
    b = session(c, node="keep")
    learn(c, a, ["x"], ["y"])
    learn(c, b, ["x"], ["y"])
    c.post(f"/sessions/{a}/observe", json={"strings": ["z"]})
    assert c.post(f"/sessions/{a}/clear-all").json() == {"status": "cleared", "session_id": a, "scope": "all"}
    assert c.get(f"/sessions/{a}/stm").json()["stm"] == []
    assert c.get("/nodes/wipe/stats").json()["pattern_count"] == 0
    assert c.get("/nodes/keep/stats").json()["pattern_count"] == 1


def test_nodes_extensions(c):
    s1 = session(c, node="a-b")
    s2 = session(c, node="a_b")      # KATO maps both to kb a_b_kato
    names = {learn(c, s1, ["m"], [f"n{i}"]) for i in range(5)}
    names.add(learn(c, s2, ["m"], ["n0"]))
    nodes = c.get("/nodes").json()["nodes"]
    entry = [n for n in nodes if n["kb_id"] == "a_b_kato"]
    assert entry == [{"node_id": "a-b", "kb_id": "a_b_kato", "pattern_count": 5, "total_frequency": 6}]
    assert [n["kb_id"] for n in nodes] == sorted(n["kb_id"] for n in nodes)
    page1 = c.get("/nodes/a_b/patterns", params={"limit": 3}).json()
    page2 = c.get("/nodes/a_b/patterns", params={"offset": 3, "limit": 3}).json()
    got = [p["name"] for p in page1["patterns"] + page2["patterns"]]
    assert page1["total"] == 5 and got == sorted(names) and len(got) == 5
    assert page1["kb_id"] == "a_b_kato" and page1["node_id"] == "a_b"
    freq = {p["name"]: p["frequency"] for p in page1["patterns"] + page2["patterns"]}
    assert freq[pattern_name([["m"], ["n0"]])] == 2
    stats = c.get("/nodes/a-b/stats").json()
    assert stats == {"node_id": "a-b", "kb_id": "a_b_kato", "pattern_count": 5, "total_frequency": 6,
                     "distinct_symbols": 6}
    for path in ("/nodes/unknown/stats", "/nodes/unknown/patterns"):
        r = c.get(path)
        assert r.status_code == 404 and "'unknown' is unknown on this server" in r.json()["detail"]


def test_vectors_are_rejected_clearly(c):
    sid = session(c)
    r = c.post(f"/sessions/{sid}/observe", json={"vectors": [[0.5, 0.5]]})
    assert r.status_code == 400 and r.json()["detail"]["error"] == "VectorsNotSupported"
    assert c.get(f"/sessions/{sid}/stm").json()["stm"] == []


def test_invalid_config_at_creation_is_rejected_not_dropped(c):
    r = c.post("/sessions", json={"node_id": "cfg", "config": {"recall_threshold": 5, "max_pattern_length": 2}})
    assert r.status_code == 400
    assert r.json()["detail"]["validation_errors"] == {"recall_threshold": "Must be a number between 0.0 and 1.0"}


def test_fast_alignment_equals_difflib_reference():
    import difflib

    from rapidfuzz.distance import LCSseq

    from streamtrain.server.predictions import alignment_blocks, matching_blocks, reference_alignment

    rng = random.Random(11)
    for _ in range(3000):
        a = [rng.choice("abcdefghij"[:rng.randint(3, 10)]) for _ in range(rng.randint(1, 12))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(2, 10))]
        b2j: dict[str, list[int]] = {}
        for j, x in enumerate(b):
            b2j.setdefault(x, []).append(j)
        blocks = matching_blocks(a, b2j, len(b))
        ref = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()[:-1]
        assert blocks == [tuple(x) for x in ref]
        assert alignment_blocks(a, b2j, len(b), LCSseq.similarity(a, b)) == blocks
        got = reference_alignment(a, b, 0.0)
        matches, past, present, _missing, extras, nblocks = got
        m = sum(x[2] for x in blocks)
        assert len(matches) == m and nblocks == len(blocks)
        assert len(extras) == len(b) - m          # what predict() uses for the snr


def test_sessions_expire_on_the_injected_clock(tmp_path):
    """Session expiry follows the app's clock: each access slides it by the session's TTL; past it, KATO's 404."""
    now = [1_000_000.0]
    with TestClient(create_app(tmp_path / "kb.sqlite3", clock=lambda: now[0])) as c:
        r = c.post("/sessions", json={"node_id": "ttl", "ttl_seconds": 50})
        sid = r.json()["session_id"]
        now[0] += 49
        assert c.get(f"/sessions/{sid}/stm").status_code == 200        # slides the expiry to now + 50
        now[0] += 49
        assert c.post(f"/sessions/{sid}/observe", json={"strings": ["a"]}).status_code == 200
        now[0] += 51
        r = c.post(f"/sessions/{sid}/observe", json={"strings": ["b"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "SESSION_NOT_FOUND"
        assert c.get(f"/sessions/{sid}/exists").json()["exists"] is False
