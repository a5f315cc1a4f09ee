"""What a user of a training tool expects to see: the whole run's history across resumes (metrics.jsonl), a
progress bar that ends at 100%, and a start-up that says what it waits for."""

from __future__ import annotations

import logging
import signal
import time

import pytest
from runs import SAMPLES, make_config, train_command

from streamtrain.cli import EXIT_INTERRUPTED, EXIT_OK, main
from streamtrain.config import ClientConfig
from streamtrain.errors import ServerUnavailable
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.records.metrics import read_metrics
from streamtrain.server import EmbeddedServer
from streamtrain.server.launcher import free_port
from streamtrain.trainer import train


def test_metrics_cover_every_call_and_inspect_shows_them(server, demo_corpus, tmp_path, capsys):
    # a few samples per request: interval checkpoints fall mid-run (128 would send the 30 samples at once)
    client = ClientConfig(outage_seconds=30, read_timeout=10, samples_per_request=4)
    cfg = make_config(tmp_path, demo_corpus, "history", server.url, max_samples=30, client=client)
    train(cfg, progress=False)
    train(cfg.with_overrides(max_samples=SAMPLES), progress=False)
    rows = read_metrics(cfg.run_dir)
    events = [(r.call, r.event) for r in rows if r.event != "progress"]
    assert events[0] == (1, "start") and events[-1] == (2, "end")
    assert (1, "end") in events and (2, "resume") in events
    assert rows[-1].position == SAMPLES and rows[-1].samples_trained == CheckpointStore(cfg.run_dir).latest().counters.samples_trained
    assert [r.elapsed_seconds for r in rows] == sorted(r.elapsed_seconds for r in rows)  # one clock across calls
    path = cfg.run_dir / "metrics.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"time": "2026-')  # a row cut by a crash
    assert len(read_metrics(cfg.run_dir)) == len(rows)
    assert main(["inspect", str(cfg.run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 call(s)" in out and "call 1 (start" in out and "call 2 (resume" in out


def test_a_finished_runs_bar_reaches_100_percent_and_shows_the_size(server, demo_corpus, tmp_path, capsys):
    """With max_samples the total is known; without, the Parquet files' metadata gives it; a stream that ends
    before max_samples still ends at 100%."""
    from streamtrain.data.datafiles import dataset_size, describe_dataset

    cfg = make_config(tmp_path, demo_corpus, "bar", server.url, max_samples=SAMPLES)
    config = tmp_path / "run.json"
    config.write_text(cfg.model_dump_json())
    assert main(["train", "--config", str(config)]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"{SAMPLES}/{SAMPLES}" in err and "100%" in err
    size = dataset_size(describe_dataset(cfg.dataset))
    assert size is not None and size > SAMPLES
    # a stream shorter than max_samples: a small file, asked for more than it holds
    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamtrain.config import DatasetConfig

    one = tmp_path / "short.parquet"
    pq.write_table(pa.table({"text": [f"record number {i} of a short file, long enough to train" for i in range(25)]}), one)
    short = make_config(tmp_path, demo_corpus, "bar-short", server.url, max_samples=10**6,
                        dataset=DatasetConfig(path="parquet", data_files=str(one), min_chars=20))
    n = dataset_size(describe_dataset(short.dataset))
    config.write_text(short.model_dump_json())
    assert main(["train", "--config", str(config)]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"{n}/{n}" in err and "100%" in err


def test_an_error_exit_does_not_talk_of_ctrl_c(demo_corpus, tmp_path, caplog):
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        cfg = make_config(tmp_path, demo_corpus, "no-ctrl-c", srv.url, max_samples=None, num_workers=2,
                          client=ClientConfig(outage_seconds=2, read_timeout=2, backoff_max=0.5))
        import threading

        threading.Timer(1.5, srv.kill).start()
        with caplog.at_level(logging.WARNING), pytest.raises(ServerUnavailable):
            train(cfg, progress=False)
    assert "Ctrl-C" not in caplog.text


def test_an_unreachable_server_is_announced_and_gives_up_in_its_budget(demo_corpus, tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = make_config(tmp_path, demo_corpus, "unreachable", url, client=ClientConfig(outage_seconds=3))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ServerUnavailable, match="did not answer within 3 s"):
        train(cfg, progress=False)
    assert time.monotonic() - started < 30
    waits = [r for r in caplog.records if "waiting for the server" in r.getMessage()]
    assert len(waits) >= 2 and url in waits[0].getMessage() and "Ctrl-C to stop" in waits[0].getMessage()
    assert not CheckpointStore(cfg.run_dir).paths()


def test_one_ctrl_c_stops_a_run_waiting_for_its_server(demo_corpus, tmp_path, zygote):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = make_config(tmp_path, demo_corpus, "waiting", url, client=ClientConfig(outage_seconds=120))
    path = tmp_path / "run.json"
    path.write_text(cfg.model_dump_json())
    log = tmp_path / "child.log"
    log.touch()
    child = zygote.spawn(train_command(path), log)  # `python -m streamtrain train --config run.json`, forked
    try:
        deadline = time.monotonic() + 60
        while b"waiting for the server" not in log.read_bytes():
            assert time.monotonic() < deadline and child.poll() is None, log.read_text()
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == EXIT_INTERRUPTED, log.read_text()[-3000:]
    finally:
        child.kill()
        child.wait()
    assert not CheckpointStore(cfg.run_dir).paths()
