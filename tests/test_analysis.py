"""streamtrain.analysis against a real embedded server (a subprocess on loopback), on a hierarchy built by hand.

The hierarchy is learned the way the trainer learns it (one symbol per event; level-1 symbols are level-0
pattern names), so the expected names and decodings follow from ``patterns.pattern_name`` alone.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path

import pytest

from streamtrain import analysis
from streamtrain.client import KatoClient
from streamtrain.config import DatasetConfig, LayerConfig, RunConfig
from streamtrain.errors import ServerUnavailable
from streamtrain.patterns import pattern_name
from streamtrain.records.checkpoint import Checkpoint, CheckpointStore, Counters, StreamPosition
from streamtrain.server import EmbeddedServer

SENTENCES = [
    ["the", "cat", "sat"],
    ["on", "the", "mat", "."],
    ["the", "cat", "sat"],  # learned twice: frequency 2
    ["a", "dog", "ran", "far"],
]


def events(tokens: list[str]) -> list[list[str]]:
    return [[t] for t in tokens]


def make_config(tmp_path: Path, run_name: str = "an") -> RunConfig:
    return RunConfig(
        run_name=run_name,
        dataset=DatasetConfig(path="parquet", data_files=str(tmp_path / "*.parquet")),
        layers=[LayerConfig(chunk_size=3), LayerConfig(chunk_size=2)],  # chunks = SENTENCES[0], SENTENCES[1]
        checkpoint_dir=tmp_path / "ckpt",
    )


def learn(client: KatoClient, node: str, evs: list[list[str]]) -> str:
    sid = client.create_session(node, {"process_predictions": False}).session_id
    try:
        return client.observe_sequence(sid, evs, learn_at_end=True).final_learned_pattern
    finally:
        client.delete_session_quietly(sid)


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory):
    """A server holding level 0 (the sentences) and level 1 (two pairs of level-0 names) of run 'an'."""
    tmp = tmp_path_factory.mktemp("analysis")
    config = make_config(tmp)
    with EmbeddedServer(tmp / "kb.sqlite3") as server, KatoClient(server.url) as client:
        l0 = [learn(client, config.node_id(0), events(s)) for s in SENTENCES]
        l1 = [learn(client, config.node_id(1), [[l0[0]], [l0[1]]]), learn(client, config.node_id(1), [[l0[3]], [l0[1]]])]
        yield config, client, l0, l1


def test_learned_names_are_the_planned_ones(kb):
    _, _, l0, l1 = kb
    assert l0[0] == pattern_name(events(SENTENCES[0])) == l0[2]
    assert l1[0] == pattern_name([[l0[0]], [l0[1]]])


def test_kb_summary_counts_patterns_learns_and_symbols(kb):
    config, client, _, _ = kb
    rows = analysis.kb_summary(client, config)
    assert [r["level"] for r in rows] == [0, 1]
    assert rows[0]["node"] == "an-L0"
    assert rows[0]["patterns"] == 3 and rows[0]["total_frequency"] == 4
    assert rows[0]["distinct_symbols"] == len({t for s in SENTENCES for t in s})
    assert rows[1]["patterns"] == 2 and rows[1]["total_frequency"] == 2
    assert rows[1]["distinct_symbols"] == 3  # the names of sentences 0, 1 and 3


def test_kb_differences_between_runs_on_one_server(kb, tmp_path):
    config, client, l0, _ = kb
    other = make_config(tmp_path, run_name="other")
    learn(client, other.node_id(0), events(SENTENCES[0]))
    assert analysis.kb_by_level(client, other) == {0: {l0[0]: 1}, 1: {}}
    rows = analysis.kb_differences(client, config, other)
    assert {"level": 0, "name": l0[0], "an": 2, "other": 1} in rows
    assert {"level": 0, "name": l0[1], "an": 1, "other": 0} in rows
    assert len(rows) == 3 + 2  # levels 0 (3 patterns) and 1 (2 patterns) all differ
    assert analysis.kb_differences(client, config, config) == []


def test_frequency_distribution(kb):
    config, client, _, _ = kb
    assert analysis.pattern_frequencies(client, config, 0) == [2, 1, 1]
    assert analysis.frequency_distribution(client, config, 0) == [
        {"level": 0, "frequency": 1, "patterns": 2},
        {"level": 0, "frequency": 2, "patterns": 1},
    ]


def test_decode_through_the_hierarchy_with_a_cache(kb):
    config, client, _, l1 = kb
    decoder = analysis.Decoder(client, config)
    assert analysis.decode_pattern(client, config, 1, l1[0], decoder) == ["the", "cat", "sat", "on", "the", "mat", "."]
    assert decoder.lookups == 3  # the level-1 pattern and its two level-0 parts
    assert decoder.text(1, l1[0]) == "the cat sat on the mat."
    assert decoder.tokens(1, l1[1].removeprefix("PTRN|")) == ["a", "dog", "ran", "far", "on", "the", "mat", "."]
    assert decoder.lookups == 5  # one new level-1 pattern, one new level-0 pattern; 'on the mat .' was cached


def test_decode_unknown_name_or_level_is_a_clear_error(kb):
    config, client, l0, _ = kb
    decoder = analysis.Decoder(client, config)
    with pytest.raises(LookupError, match="an-L1"):
        decoder.tokens(1, l0[0])  # a level-0 name asked for on level 1
    with pytest.raises(ValueError, match="outside the run's hierarchy"):
        decoder.tokens(5, l0[0])


def test_top_patterns_are_ranked_and_decoded(kb):
    config, client, l0, _ = kb
    rows = analysis.top_patterns(client, config, 0, n=2)
    assert rows[0]["name"] == l0[0] and rows[0]["frequency"] == 2 and rows[0]["text"] == "the cat sat"
    assert rows[1]["frequency"] == 1 and len(rows) == 2
    top1 = analysis.top_patterns(client, config, 1, n=5)
    assert {r["text"] for r in top1} == {"the cat sat on the mat.", "a dog ran far on the mat."}


def test_predictions_are_decoded_and_traceable_to_their_pattern(kb):
    config, client, l0, _ = kb
    rows = analysis.predict(client, config, ["the", "cat"], top=5)
    first = rows[0]
    assert first["name"] == l0[0] == pattern_name(events(["the", "cat", "sat"]))
    assert (first["past"], first["present"], first["future"]) == ("", "the cat", "sat")
    assert first["frequency"] == 2 and first["potential"] > rows[1]["potential"]
    # traceable: the named pattern, looked up on the node, is the text shown
    stored = client.pattern(config.node_id(0), first["name"])
    assert analysis.tokens_to_text([e[0] for e in stored.pattern_data]) == first["pattern"] == "the cat sat"
    second = rows[1]  # 'the' also occurs in 'on the mat .'
    assert second["name"] == l0[1] and (second["past"], second["present"], second["future"]) == ("on", "the", "mat.")
    assert len(rows) == 2  # 'a dog ran far' shares no token with the prompt


def test_predictions_on_level_1_observe_the_planned_names(kb):
    config, client, l0, l1 = kb
    # 'the cat sat' is one level-0 chunk; its name is the level-1 symbol, and l1[0] continues it
    rows = analysis.predict(client, config, ["the", "cat", "sat"], level=1)
    assert [r["name"] for r in rows] == [l1[0]]
    assert (rows[0]["present"], rows[0]["future"]) == ("the cat sat", "on the mat.")


def test_predict_rejects_an_empty_prompt(kb):
    config, client, _, _ = kb
    with pytest.raises(ValueError, match="no symbols on level 0"):
        analysis.predict(client, config, [])


def test_tokens_to_text():
    assert analysis.tokens_to_text(["Hello", ",", "world", "!", "(", "yes", ")"]) == "Hello, world! (yes)"
    assert analysis.tokens_to_text(["Hello", ",", " world"], "gpt2") == "Hello, world"


def test_config_diff_lists_must_match_and_may_change(tmp_path):
    a = make_config(tmp_path)
    b = a.model_copy(update={"max_samples": 400, "layers": [LayerConfig(chunk_size=3), LayerConfig(chunk_size=3)]})
    rows = analysis.config_diff(a, b)
    assert {"field": "layers[1].chunk_size", "policy": "must_match", "old": 2, "new": 3} in rows
    assert {"field": "max_samples", "policy": "may_change", "old": None, "new": 400} in rows
    assert len(rows) == 2
    assert analysis.config_diff(a, a) == []


def test_checkpoint_table_shows_valid_and_damaged_files(tmp_path):
    config = make_config(tmp_path)
    store = CheckpointStore(config.run_dir, keep=5)
    now = datetime.now(timezone.utc)
    for seq, (reason, pos) in enumerate([("interval", 7), ("end", 20)], 1):
        store.save(Checkpoint(sequence=seq, run_name=config.run_name, config=config,
                              position=StreamPosition(raw_offset=pos), counters=Counters(samples_trained=pos),
                              reason=reason, started_at=now, created_at=now, elapsed_seconds=1.0))
    (config.run_dir / "ckpt-00000003.json").write_text('{"torn": ', encoding="utf-8")
    rows = analysis.checkpoint_table(config)
    assert [(r["sequence"], r["valid"], r["reason"], r["position"]) for r in rows] == [
        (1, True, "interval", 7), (2, True, "end", 20), (3, False, None, None)]
    assert "ckpt-00000003.json" in rows[2]["error"]
    # a config diff between two checkpoint files (paths) works too
    assert analysis.config_diff(config.run_dir / rows[0]["file"], config.run_dir / rows[1]["file"]) == []
    json.loads((config.run_dir / rows[1]["file"]).read_text())  # the table never rewrote a file


def test_connect_to_a_dead_url_fails_fast_with_one_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once the socket closes
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ServerUnavailable) as info:
        analysis.connect(url, wait_seconds=1.0)
    message = str(info.value)
    assert url in message and "streamtrain serve" in message and "None" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_connect_to_a_live_url_and_embedded(tmp_path):
    with analysis.connect(None, tmp_path / "db" / "kb.sqlite3") as conn:
        assert conn.embedded and conn.client.health().status
        with analysis.connect(conn.url, wait_seconds=2) as other:
            assert not other.embedded and other.client.nodes() == []
    assert conn.server is None


def test_kb_statistics_on_a_server_without_the_nodes_extension_say_so(tmp_path):
    """A real KATO has no /nodes listing; any HTTP server answering 404 stands in for it here."""
    import functools
    import http.server
    import threading

    from streamtrain.errors import ProtocolError

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with KatoClient(url) as client:
            with pytest.raises(ProtocolError, match="/nodes extension") as info:
                analysis.kb_summary(client, make_config(tmp_path))
            assert url in str(info.value) and "HTTP 404" in str(info.value)
            with pytest.raises(ProtocolError, match="/nodes extension"):
                analysis.top_patterns(client, make_config(tmp_path), 0)
    finally:
        server.shutdown()
        server.server_close()
