"""Inputs that used to train nothing in silence: a text field holding a dict, a list, numbers or bytes; nested
fields; a resume position past the end of the data; a bad record in a JSON file. Through the CLI on a real server
process (conftest's session ``server``), and the pure parts (field lookup, decoding, reason counting) alone."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runs import train_command

from streamtrain.cli import main
from streamtrain.config import DatasetConfig, RunConfig
from streamtrain.data.readerror import find_bad_record
from streamtrain.data.stream import DatasetStream
from streamtrain.data.textfilter import FIRST_RECORDS, FirstRecords, TextFilter, decode_bytes, field_value
from streamtrain.errors import DatasetError
from streamtrain.records.checkpoint import Checkpoint, CheckpointStore, Counters, FilterReasons, StreamPosition
from streamtrain.records.journal import JournalState
from streamtrain.resume import progress_of
from streamtrain.runstate import Outcome, RunState

LAYERS = [{"chunk_size": 4}, {"chunk_size": 2}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(folder: Path, run_name: str, server_url: str, dataset: dict[str, Any], **top: Any) -> Path:
    """A run config file as a user writes one (JSON), next to its data."""
    config = {"run_name": run_name, "server_url": server_url, "checkpoint_dir": "ck", "layers": LAYERS,
              "checkpoint_every_seconds": None, "dataset": dataset, **top}
    path = folder / f"{run_name}.json"
    path.write_text(json.dumps(config))
    return path


def train_cli(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["train", "--config", str(config), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def sentence(i: int) -> str:
    return f"record number {i} says hello to the memory server"


# -- the pure parts ---------------------------------------------------------------------------------------------


def test_field_value_reaches_nested_fields_and_prefers_a_literal_dotted_key() -> None:
    record = {"meta": {"body": "nested", "inner": {"deep": "deeper"}}, "meta.title": "flat", "n": 3,
              "tags": ["a", "b"], "a": {"b.c": "dotted key inside"}, "gone": None}
    assert field_value(record, "meta.body") == "nested"
    assert field_value(record, "meta.inner.deep") == "deeper"
    assert field_value(record, "meta.title") == "flat"  # a flattened column, as datasets' flatten() names it
    assert field_value(record, "a.b.c") == "dotted key inside"
    assert field_value(record, "meta") == {"body": "nested", "inner": {"deep": "deeper"}}
    for absent in ("meta.nope", "nope", "n.x", "tags.0", "gone", "gone.x"):
        assert field_value(record, absent) is None, absent
    # a literal key that is null (datasets fills a column absent from a record with null) yields to the path
    assert field_value({"meta.body": None, "meta": {"body": "nested"}}, "meta.body") == "nested"
    assert field_value({"meta.body": "literal", "meta": {"body": "nested"}}, "meta.body") == "literal"


def test_text_filter_gives_each_reason() -> None:
    f = TextFilter(field="t", min_chars=3, encoding="utf-8")
    assert f.text({"t": "  abc  "}) == ("  abc  ", None)
    assert f.text({"t": " ab "}) == (None, "too_short")
    assert f.text({"t": None}) == (None, "missing")
    assert f.text({"other": "abc"}) == (None, "missing")
    for wrong in ({"body": "abc"}, ["abc"], 123, 4.5, True):
        assert f.text({"t": wrong}) == (None, "wrong_type"), wrong
    assert f.text({"t": "café".encode()}) == ("café", None)
    assert f.text({"t": "café".encode("latin-1")}) == (None, "undecodable")
    assert TextFilter("t", 1, "latin-1").text({"t": "café".encode("latin-1")}) == ("café", None)
    assert f.text({"t": b"ab"}) == (None, "too_short")  # decoded first, then measured
    assert decode_bytes(bytearray(b"\xff"), "utf-8") is None and decode_bytes(memoryview(b"ok"), "utf-8") == "ok"


def _first_records(records: list[dict[str, Any]], **dataset: Any) -> FirstRecords:
    cfg = DatasetConfig(path="json", **dataset)
    watch, filt = FirstRecords(cfg), TextFilter.of(cfg)
    for r in records:
        if watch.watching:
            watch.take(r, filt.text(r)[1])
    watch.check()
    return watch


def test_first_records_stop_a_wrong_type_and_name_what_to_set() -> None:
    dicts = [{"meta": {"body": sentence(i), "title": "t"}} for i in range(FIRST_RECORDS)]
    with pytest.raises(DatasetError, match=r"(?s)text_field 'meta'.*holds a dict in 100 of them, with the keys "
                                           r"\['body', 'title'\].*dataset.text_field.*'meta.body'"):
        _first_records(dicts, text_field="meta")
    with pytest.raises(DatasetError, match=r"(?s)holds a list in 3 of them.*join the list.*\['body'\]"):
        _first_records([{"t": ["a", "b"], "body": "x y z"}] * 3, text_field="t")
    with pytest.raises(DatasetError, match=r"(?s)holds an int in 2 of them.*\['body'\]"):
        _first_records([{"t": 1, "body": "x"}, {"t": 2, "body": "y"}], text_field="t")
    with pytest.raises(DatasetError, match=r"(?s)do not decode as 'utf-8'.*binary_encoding.*latin-1"):
        _first_records([{"text": "é".encode("latin-1")}] * 5)
    with pytest.raises(DatasetError, match=r"(?s)no text field 'text'.*absent \(or null\).*\['meta.body', 'n'\]"):
        _first_records([{"meta": {"body": "x"}, "n": i} for i in range(FIRST_RECORDS + 5)])


def test_first_records_let_a_dataset_that_only_begins_oddly_run() -> None:
    # one record with text among the first ones is enough, wherever it is
    assert _first_records([{"t": {"a": 1}}] * (FIRST_RECORDS - 1) + [{"t": "text"}], text_field="t").passed
    # blank lines and nulls at the start of a dataset are no config problem
    _first_records([{"text": ""}] * 50 + [{"text": None}] * 60)
    # only the first FIRST_RECORDS records are watched
    watch = _first_records([{"text": ""}] * FIRST_RECORDS + [{"text": 5}] * 10)
    assert watch.seen == FIRST_RECORDS and not watch.reasons["wrong_type"]


def test_reason_counts_stay_exact_across_a_resume_from_a_checkpoint_with_filtered_records_above_it() -> None:
    """Filtered records read ahead of an unfinished sample are counted only once the mark passes them; a crash
    then a resume from that checkpoint reads them again, and counts them then: once, in total."""
    reasons = {1: "missing", 2: "missing", 4: "wrong_type", 5: "too_short", 6: "too_short", 8: "undecodable"}
    state = RunState(levels=1)
    state.dispatch(0)
    state.finish(Outcome(0, learns=[1]))
    for i in (1, 2):
        state.filtered(i, reasons[i])
    state.dispatch(3)  # in flight: the mark stays at 3
    for i in (4, 5, 6):
        state.filtered(i, reasons[i])
    state.dispatch(7)
    state.finish(Outcome(7, learns=[1]))  # finished above the mark
    counters = state.snapshot_counters()
    assert counters.filter_reasons == FilterReasons(missing=2) and counters.samples_filtered == 2
    ckpt_position = state.position()
    assert ckpt_position.raw_offset == 3 and ckpt_position.done_above == [7]

    # "crash": a new state from that checkpoint; the stream reads from 3 again
    ckpt = Checkpoint(sequence=1, run_name="r", config=RunConfig(run_name="r", dataset=DatasetConfig(path="json")),
                      position=ckpt_position, counters=counters, reason="interval", started_at="2024-01-01T00:00:00Z",
                      created_at="2024-01-01T00:00:00Z", elapsed_seconds=0)
    resumed = progress_of(1, ckpt, JournalState()).run_state(1)
    resumed.dispatch(3)
    for i in (4, 5, 6):
        resumed.filtered(i, reasons[i])
    resumed.skip_to(8)  # 7 is finished above: skipped
    resumed.filtered(8, reasons[8])
    resumed.finish(Outcome(3, learns=[1]))
    resumed.skip_to(9)
    final = resumed.snapshot_counters()
    assert final.filter_reasons == FilterReasons(missing=2, wrong_type=1, too_short=2, undecodable=1)
    assert final.samples_filtered == final.filter_reasons.total == len(reasons) and final.samples_trained == 3


def test_a_checkpoint_without_reason_counts_still_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints written before the reasons were counted load (all zero); inspect says the rest is not itemized."""
    cfg = RunConfig(run_name="old", dataset=DatasetConfig(path="json"), checkpoint_dir=tmp_path)
    ckpt = Checkpoint(sequence=1, run_name="old", config=cfg, position=StreamPosition(raw_offset=50),
                      counters=Counters(samples_trained=40, samples_filtered=10), reason="end",
                      started_at="2024-01-01T00:00:00Z", created_at="2024-01-01T00:00:00Z", elapsed_seconds=1)
    data = json.loads(ckpt.model_dump_json())
    del data["counters"]["filter_reasons"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ckpt-00000001.json").write_text(json.dumps(data))
    loaded = CheckpointStore(tmp_path / "old").latest()
    assert loaded is not None and loaded.counters.filter_reasons == FilterReasons()
    assert main(["inspect", str(tmp_path / "old")]) == 0
    assert "missing=0 wrong_type=0 too_short=0 undecodable=0 (and 10 not itemized" in capsys.readouterr().out


def test_find_bad_record_counts_lines_across_files(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": sentence(i)} for i in range(30)])
    rows = [json.dumps({"text": sentence(i)}) for i in range(40)]
    rows[25] = '{"text": "a lone \\udc00 surrogate"}'
    (tmp_path / "b.jsonl").write_text("\n".join(rows[:10]) + "\n\n   \n" + "\n".join(rows[10:]) + "\n")
    cfg = DatasetConfig(path="json", data_files=[str(a), str(tmp_path / "b.jsonl")])
    files = [str(a), str(tmp_path / "b.jsonl")]
    for position in (0, 31, 55):
        bad = find_bad_record(cfg, files, position)
        assert bad is not None and (bad.raw_index, bad.record, bad.line) == (55, 25, 28), position
    assert find_bad_record(cfg, files, 56) is None
    # a text file whose line 3 is not UTF-8
    (tmp_path / "t.txt").write_bytes(b"one\n\ntr\xe8s\nfour\n")
    bad = find_bad_record(DatasetConfig(path="text"), [str(tmp_path / "t.txt")], 1)
    assert bad is not None and (bad.raw_index, bad.line) == (2, 3)


# -- through the CLI, on a real server process --------------------------------------------------------------------

WRONG_FIELDS = {
    # name: (the rows, the text_field that holds no text, what the message says, the text_field that works)
    "dict": ([{"meta": {"body": sentence(i), "title": f"t{i}"}} for i in range(600)], "meta",
             r"holds a dict in 100 of them, with the keys \['body', 'title'\].*'meta.body'", "meta.body"),
    "list": ([{"tokens": sentence(i).split(), "body": sentence(i)} for i in range(600)], "tokens",
             r"holds a list in 100 of them.*join the list.*\['body'\]", "body"),
    "number": ([{"score": i, "body": sentence(i)} for i in range(600)], "score",
               r"holds an int in 100 of them.*\['body'\]", "body"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_FIELDS))
def test_a_text_field_of_the_wrong_type_stops_the_run_before_it_pins_anything(
        kind: str, server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All 600 records would be filtered: the run stops at its 100th record (exit 1) naming the field, the type and
    what to set; it pinned nothing, so the corrected text_field trains every record (no must-match refusal)."""
    rows, wrong, says, right = WRONG_FIELDS[kind]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = write_config(tmp_path, f"wrong-{kind}", server.url, {"path": "json", "data_files": str(data),
                                                                  "text_field": wrong})
    code, out, err = train_cli(config, capsys, "-v")
    assert code == 1, out + err
    assert re.search(rf"(?s)error: dataset 'json': none of the first 100 records has usable text in text_field "
                     rf"'{wrong}' \(100 wrong type\): it {says}.*Nothing was trained", err), err
    assert "Traceback" not in err and out == ""
    ckpt = CheckpointStore(tmp_path / "ck" / f"wrong-{kind}").latest()
    assert ckpt is not None and not ckpt.has_progress and ckpt.reason == "error"

    config.write_text(config.read_text().replace(f'"text_field": "{wrong}"', f'"text_field": "{right}"'))
    code, out, err = train_cli(config, capsys)
    assert code == 0, err
    assert "whole run: 600 trained, 0 filtered, 0 failed" in out and "(resumed)" not in out


def test_a_binary_column_is_decoded(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Parquet binary column of UTF-8 text trains as text. One of Latin-1 bytes stops the run, naming
    binary_encoding; with binary_encoding = "latin-1" it trains, and the knowledge base holds the accented words."""
    from streamtrain.analysis import Decoder, connect, top_patterns

    texts = [f"café crème number {i} for the server" for i in range(600)]
    pq.write_table(pa.table({"text": pa.array([t.encode() for t in texts], pa.binary())}), tmp_path / "utf8.parquet")
    config = write_config(tmp_path, "binary-utf8", server.url,
                          {"path": "parquet", "data_files": str(tmp_path / "utf8.parquet")})
    code, out, err = train_cli(config, capsys)
    assert code == 0, err
    assert "whole run: 600 trained, 0 filtered, 0 failed" in out

    pq.write_table(pa.table({"text": pa.array([t.encode("latin-1") for t in texts], pa.large_binary())}),
                   tmp_path / "latin1.parquet")
    dataset = {"path": "parquet", "data_files": str(tmp_path / "latin1.parquet")}
    config = write_config(tmp_path, "binary-latin1", server.url, dataset)
    code, out, err = train_cli(config, capsys)
    assert code == 1 and "bytes that do not decode as 'utf-8'" in err and "binary_encoding" in err, err
    config = write_config(tmp_path, "binary-latin1", server.url, {**dataset, "binary_encoding": "latin-1"})
    code, out, err = train_cli(config, capsys)
    assert code == 0 and "whole run: 600 trained, 0 filtered" in out, err
    cfg = CheckpointStore(tmp_path / "ck" / "binary-latin1").latest().config
    with connect(server.url) as conn:
        texts_learned = [row["text"] for row in top_patterns(conn.client, cfg, 0, n=50, decoder=Decoder(conn.client, cfg))]
    assert any("café crème" in t for t in texts_learned), texts_learned


def test_nested_fields_by_dotted_path(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """text_field = "meta.body" reaches a nested field (JSON objects, Parquet structs); a flattened column named
    "meta.body" is taken first where it has a value."""
    rows = [{"meta": {"body": sentence(i), "lang": "en"}, "meta.body": None if i % 3 else f"flat {sentence(i)}"}
            for i in range(60)]
    data = write_jsonl(tmp_path / "nested.jsonl", rows)
    config = write_config(tmp_path, "nested", server.url,
                          {"path": "json", "data_files": str(data), "text_field": "meta.body"})
    code, out, err = train_cli(config, capsys)
    assert code == 0 and "whole run: 60 trained, 0 filtered" in out, err
    cfg = DatasetConfig(path="json", data_files=str(data), text_field="meta.body")
    with DatasetStream(cfg) as stream:
        assert [t for _, t in stream][:4] == [f"flat {sentence(0)}", sentence(1), sentence(2), f"flat {sentence(3)}"]

    pq.write_table(pa.table({"meta": [{"body": sentence(i), "n": i} for i in range(40)]}), tmp_path / "s.parquet")
    config = write_config(tmp_path, "struct", server.url,
                          {"path": "parquet", "data_files": str(tmp_path / "s.parquet"), "text_field": "meta.body"})
    code, out, err = train_cli(config, capsys)
    assert code == 0 and "whole run: 40 trained, 0 filtered" in out, err


def mixed_rows(n: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Records with every JSON reason mixed in, and how many of each: the ground truth."""
    rng = random.Random(18)
    rows, truth = [], {"trained": 0, "missing": 0, "wrong_type": 0, "too_short": 0}
    for i in range(n):
        kind = "trained" if i < 3 else rng.choice(["trained", "trained", "missing", "wrong_type", "too_short"])
        truth[kind] += 1
        rows.append({"trained": {"text": sentence(i)}, "missing": {"other": i}, "too_short": {"text": " hi "},
                     "wrong_type": {"text": rng.choice([{"body": "x"}, ["a", "b"], i])}}[kind])
    return rows, truth


def test_the_reasons_are_counted_in_the_summary_the_checkpoint_and_inspect(
        server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, truth = mixed_rows(300)
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = write_config(tmp_path, "mixed", server.url,
                          {"path": "json", "data_files": str(data), "min_chars": 5}, num_workers=2, checkpoint_every=5)
    # in three calls: the reasons of each call add up
    for limit in ("100", "210"):
        assert train_cli(config, capsys, "--max-samples", limit)[0] == 0
    code, out, err = train_cli(config, capsys)
    assert code == 0, err
    filtered = truth["missing"] + truth["wrong_type"] + truth["too_short"]
    assert (f"whole run: {truth['trained']} trained, {filtered} filtered ({truth['missing']} missing the field, "
            f"{truth['wrong_type']} wrong type, {truth['too_short']} too short), 0 failed") in out, out
    ckpt = CheckpointStore(tmp_path / "ck" / "mixed").latest()
    assert ckpt.counters.filter_reasons == FilterReasons(missing=truth["missing"], wrong_type=truth["wrong_type"],
                                                         too_short=truth["too_short"])
    assert main(["inspect", str(tmp_path / "ck" / "mixed")]) == 0
    shown = capsys.readouterr().out
    assert (f"filtered:    missing={truth['missing']} wrong_type={truth['wrong_type']} "
            f"too_short={truth['too_short']} undecodable=0\n") in shown, shown

    # undecodable bytes, and the TrainResult of train() itself
    from streamtrain.config import load_config
    from streamtrain.trainer import train

    good, bad = b"good text for the server", "caf\xe9 au lait".encode("latin-1")
    pq.write_table(pa.table({"text": pa.array([good, bad, good, None, bad, good, b"ab"], pa.binary())}),
                   tmp_path / "b.parquet")
    result = train(load_config(write_config(tmp_path, "undecodable", server.url,
                                            {"path": "parquet", "data_files": str(tmp_path / "b.parquet"),
                                             "min_chars": 3})), progress=False)
    assert result.filter_reasons == FilterReasons(missing=1, too_short=1, undecodable=2)
    assert result.samples_trained == 3 and result.samples_filtered == 4


def slow_then_filtered_rows(blocks: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Blocks of a long sample (many requests), five filtered records (each reason) and four short samples: while
    the long one is in flight, the short ones finish and a checkpoint stands below the filtered records."""
    rows: list[dict[str, Any]] = []
    for b in range(blocks):
        rows.append({"text": " ".join(sentence(b * 100 + k) for k in range(25))})
        rows += [{"other": b}, {"text": " hi "}, {"text": {"body": "x"}}, {"text": [b]}, {"text": None}]
        rows += [{"text": sentence(b * 100 + 50 + k)} for k in range(4)]
    truth = {"trained": 5 * blocks, "missing": 2 * blocks, "wrong_type": 2 * blocks, "too_short": blocks}
    return rows, truth


def test_the_reason_counts_stay_exact_through_killed_trainers(server, tmp_path: Path, zygote) -> None:
    """Trainers SIGKILLed just after a checkpoint that stands below filtered records (read ahead of a long sample
    still in flight), each resumed: the run ends with exactly the counts of the data, none lost or doubled."""
    from streamtrain.config import load_config

    rows, truth = slow_then_filtered_rows(30)
    data = write_jsonl(tmp_path / "blocks.jsonl", rows)
    config = write_config(tmp_path, "killed", server.url, {"path": "json", "data_files": str(data), "min_chars": 5},
                          num_workers=3, checkpoint_every=2, client={"learn_batch": False})
    cfg = load_config(config)
    cfg_path = tmp_path / "child.json"
    cfg_path.write_text(cfg.model_dump_json())
    log, killed = tmp_path / "child.log", 0

    def newest() -> int:
        return max((int(p.name[5:13]) for p in cfg.run_dir.glob("ckpt-*.json")), default=0)

    for _ in range(6):
        before = newest()
        proc = zygote.spawn(train_command(cfg_path), log)
        deadline = time.monotonic() + 60
        while proc.poll() is None and newest() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed += 1
    assert killed >= 4, f"only {killed} kills landed before the run finished"
    proc = zygote.spawn(train_command(cfg_path), log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    c = CheckpointStore(cfg.run_dir).latest().counters
    assert c.filter_reasons == FilterReasons(missing=truth["missing"], wrong_type=truth["wrong_type"],
                                             too_short=truth["too_short"])
    assert c.samples_trained == truth["trained"] and c.samples_filtered == c.filter_reasons.total


def _checkpoint_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("ckpt-*.json"))}


def test_a_resume_past_the_end_of_the_data_is_refused(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint edited to resume at 5000 of 600 records, and data truncated under a checkpoint with an exact
    stream state: each is refused before training, naming both numbers; the checkpoints stay as they were."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": sentence(i)} for i in range(600)])
    config = write_config(tmp_path, "past-end", server.url, {"path": "json", "data_files": str(data)})
    assert train_cli(config, capsys, "--max-samples", "300")[0] == 0
    run_dir = tmp_path / "ck" / "past-end"

    # hand-edited: the stored stream state no longer matches, so the stream skips, and finds no record 4999
    newest = max(run_dir.glob("ckpt-*.json"))
    edited = json.loads(newest.read_text())
    edited["position"]["raw_offset"] = 5000
    newest.write_text(json.dumps(edited))
    before = _checkpoint_files(run_dir)
    code, out, err = train_cli(config, capsys)
    assert code == 1 and out == "", out
    assert re.search(r"(?s)cannot resume run 'past-end': .*ckpt-\d+\.json resumes at raw position 5000, but "
                     r"dataset 'json' ends at raw position 600 \(it holds 600 records\).*checkpoint is as it was.*"
                     r"What to do: restore the data", err), err
    assert _checkpoint_files(run_dir) == before and "Traceback" not in err

    # a run that ended at its max_samples (exact stream state at 300), its data then cut to 200 records; the
    # checkpoint's record of the files is dropped, as an older or foreign checkpoint has none
    edited["position"]["raw_offset"] = 300
    edited["dataset"] = None
    newest.write_text(json.dumps(edited))
    assert edited["position"]["state_dict"] is not None
    write_jsonl(data, [{"text": sentence(i)} for i in range(200)])
    before = _checkpoint_files(run_dir)
    code, out, err = train_cli(config, capsys)
    assert code == 1 and "resumes at raw position 300, but dataset 'json' ends at raw position 200" in err, err
    assert _checkpoint_files(run_dir) == before


def test_a_run_that_ends_where_its_data_ends_resumes_as_finished(server, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The other side: data that ends exactly at the resume position is no error, whether the run ended at the
    end of its data (trusted) or at its max_samples (checked: record 599 exists)."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": sentence(i)} for i in range(600)])
    config = write_config(tmp_path, "at-end", server.url, {"path": "json", "data_files": str(data)})
    assert train_cli(config, capsys, "--max-samples", "600")[0] == 0
    for _ in range(2):  # after max_samples, then after the end of the data
        code, out, err = train_cli(config, capsys)
        assert code == 0 and "raw position 600 -> 600 (resumed)" in out and "600 trained, 0 filtered" in out, err


def test_a_lone_surrogate_is_reported_at_its_record_and_line(server, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON Lines file holding a lone surrogate escape, in the third block datasets reads of the second file:
    the error names its raw record, file and line, and says to repair it, from the start and after a resume
    from an exact stream state in the middle of that file."""
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": sentence(i)} for i in range(100)])
    rows = [json.dumps({"text": sentence(100 + i)}) for i in range(200)]
    rows[130] = '{"text": "a lone \\ud800 surrogate"}'
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join(rows[:7]) + "\n\n" + "\n".join(rows[7:]) + "\n")
    dataset = {"path": "json", "data_files": [str(first), str(second)], "load_kwargs": {"chunksize": 2000}}
    says = (rf"(?s)error: reading dataset 'json' failed at raw record 230: ArrowInvalid: .*surrogate.*That record is "
            rf"line 132 of {re.escape(str(second))} \(the file's record 130\).*What to do: repair that line")
    config = write_config(tmp_path, "surrogate", server.url, dataset)
    code, _, err = train_cli(config, capsys)
    assert code == 1 and re.search(says, err), err

    config = write_config(tmp_path, "surrogate-resumed", server.url, dataset)
    assert train_cli(config, capsys, "--max-samples", "160")[0] == 0
    assert CheckpointStore(tmp_path / "ck" / "surrogate-resumed").latest().position.state_dict is not None
    code, _, err = train_cli(config, capsys)
    assert code == 1 and re.search(says, err), err


def test_the_wrong_field_through_the_command_in_a_process(server, tmp_path: Path) -> None:
    """As a user runs it: `python -m streamtrain train --config F -v` exits 1 with the message, no traceback."""
    data = write_jsonl(tmp_path / "d.jsonl", WRONG_FIELDS["dict"][0][:150])
    config = write_config(tmp_path, "process", server.url,
                          {"path": "json", "data_files": "d.jsonl", "text_field": "meta"})
    proc = subprocess.run([sys.executable, "-m", "streamtrain", "train", "--config", str(config), "--no-progress",
                           "-v"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert data.exists() and proc.returncode == 1, proc.stderr
    assert "error: dataset 'json': none of the first 100 records has usable text in text_field 'meta'" in proc.stderr
    assert "'meta.body'" in proc.stderr and "Traceback" not in proc.stderr

