"""Paths that must not strand a run: a project folder moved or copied as a whole, a resume after the server's key
lifetime, a full or read-only disk, and a history file that stays small however often checkpoints are written.
Each case runs through the CLI (in-process ``cli.main``, or ``python -m streamtrain`` where the process matters) on
a real server process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from runs import kb_by_level
from tiny_tokenizer import build_tokenizer_json

from streamtrain.checkpoint import CheckpointStore
from streamtrain.cli import EXIT_ERROR, EXIT_OK, main
from streamtrain.config import load_config
from streamtrain.metrics import MetricsLog, read_metrics
from streamtrain.server import EmbeddedServer

# -- a project folder moved as a whole ---------------------------------------------------------------------------

DATA_FILES = {
    "string": '"data/*.parquet"',
    "list": '["data/shakespeare-00-of-04.parquet", "data/shakespeare-01-of-04.parquet"]',
    "split table": '{ train = "data/*-00-of-04.parquet", test = ["data/shakespeare-01-of-04.parquet"] }',
}


def _project(root: Path, corpus: Path, data_files: str) -> Path:
    """A project folder as a user keeps one: the config, its data and its tokenizer.json beside it, all relative;
    its checkpoints (and the embedded server's knowledge base) in ck/ inside it."""
    (root / "data").mkdir(parents=True)
    for shard in sorted(corpus.glob("*.parquet"))[:2]:
        shutil.copy(shard, root / "data" / shard.name)
    build_tokenizer_json(root / "tok" / "tokenizer.json", vocab_size=300)
    build_tokenizer_json(root / "tok2" / "tokenizer.json", vocab_size=280)
    config = root / "run.toml"
    config.write_text(
        'run_name = "moved"\ncheckpoint_dir = "ck"\ncheckpoint_every = 10\ntokenizer = { hf = "tok/tokenizer.json" }\n'
        f"[dataset]\npath = \"parquet\"\ndata_files = {data_files}\nmin_chars = 20\n"
        "[[layers]]\nchunk_size = 6\n[[layers]]\nchunk_size = 3\n"
    )
    return config


def _train(config: Path, max_samples: int) -> int:
    return main(["train", "--config", str(config), "--max-samples", str(max_samples), "--no-progress"])


def _kb(config: Path) -> dict[int, dict[str, int]]:
    cfg = load_config(config)
    with EmbeddedServer(cfg.run_dir / "kb.sqlite3") as srv:
        return kb_by_level(srv.url, cfg)


@pytest.mark.parametrize("form", sorted(DATA_FILES))
def test_a_project_folder_moved_as_a_whole_resumes_exactly(form, demo_corpus, tmp_path, capsys):
    """Config, data, tokenizer.json and checkpoints copied to another place (another machine: the old folder is
    gone) resume from the copy, and the knowledge base is the one an uninterrupted run leaves."""
    first = _project(tmp_path / "site1" / "project", demo_corpus, DATA_FILES[form])
    assert _train(first, 30) == EXIT_OK
    shutil.copytree(tmp_path / "site1", tmp_path / "site2")
    (tmp_path / "site1").rename(tmp_path / "site1-gone")
    moved = tmp_path / "site2" / "project" / "run.toml"
    capsys.readouterr()
    assert _train(moved, 70) == EXIT_OK, capsys.readouterr().err
    assert "raw position 30 -> 70 (resumed)" in capsys.readouterr().out

    reference = _project(tmp_path / "ref" / "project", demo_corpus, DATA_FILES[form])
    assert _train(reference, 70) == EXIT_OK
    assert _kb(moved) == _kb(reference)


def test_a_moved_project_still_refuses_other_files(demo_corpus, tmp_path, capsys):
    """Moving allows the same files at the same places, no more: another tokenizer.json is refused naming both,
    changed data is refused naming the file; a data folder moved on its own (its files compared by content)
    resumes."""
    first = _project(tmp_path / "site1" / "project", demo_corpus, DATA_FILES["string"])
    assert _train(first, 30) == EXIT_OK
    shutil.move(tmp_path / "site1", tmp_path / "site2")
    project = tmp_path / "site2" / "project"
    config = project / "run.toml"
    original = config.read_text()
    capsys.readouterr()

    config.write_text(original.replace("tok/tokenizer.json", "tok2/tokenizer.json"))
    assert _train(config, 60) == EXIT_ERROR
    err = capsys.readouterr().err
    assert (f'tokenizer.hf: checkpoint="{tmp_path}/site1/project/tok/tokenizer.json" '
            f'current="{project}/tok2/tokenizer.json"') in err

    shard = sorted((project / "data").glob("*.parquet"))[0]
    saved = shard.read_bytes()
    shard.write_bytes(sorted(demo_corpus.glob("*.parquet"))[3].read_bytes())
    config.write_text(original)
    assert _train(config, 60) == EXIT_ERROR
    assert f"changed: {shard}" in capsys.readouterr().err
    shard.write_bytes(saved)

    (project / "data").rename(project / "shards")
    config.write_text(original.replace('"data/*.parquet"', '"shards/*.parquet"'))
    assert _train(config, 60) == EXIT_OK
    assert "raw position 30 -> 60 (resumed)" in capsys.readouterr().out
    assert CheckpointStore(project / "ck" / "moved").latest().position.raw_offset == 60


# -- metrics.jsonl stays small -----------------------------------------------------------------------------------


def test_metrics_stay_small_with_a_checkpoint_per_sample(server, demo_corpus, tmp_path, capsys):
    """checkpoint_every = 1 and one sample per request: a checkpoint per sample, yet metrics.jsonl holds a few rows
    (checkpoint rows are thinned like progress rows; the call's events all stay), and inspect and the notebook
    helpers read it."""
    config = tmp_path / "run.toml"
    config.write_text(
        f'run_name = "small-history"\nserver_url = "{server.url}"\ncheckpoint_dir = "ck"\ncheckpoint_every = 1\n'
        "checkpoint_every_seconds = 0.001\n[client]\nsamples_per_request = 1\n"
        f'[dataset]\npath = "parquet"\ndata_files = "{demo_corpus}/*.parquet"\nmin_chars = 20\n'
        "[[layers]]\nchunk_size = 6\n"
    )
    assert _train(config, 40) == EXIT_OK
    assert _train(config, 80) == EXIT_OK
    run_dir = tmp_path / "ck" / "small-history"
    written = CheckpointStore(run_dir).latest().sequence
    rows = read_metrics(run_dir)
    events = [(r.call, r.event) for r in rows if r.event != "progress"]
    assert written > 60 and len(rows) <= 8, (written, events)
    assert events[0] == (1, "start") and (1, "end") in events and (2, "resume") in events and events[-1] == (2, "end")
    capsys.readouterr()
    assert main(["inspect", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 call(s)" in out and "call 2 (resume" in out and "-> 80" in out

    import matplotlib

    matplotlib.use("Agg")
    from streamtrain.notebook import metrics_frame, plot_run_history

    cfg = load_config(config)
    frame = metrics_frame(cfg)
    assert len(frame) == len(rows) and frame["position"].iloc[-1] == 80
    assert len(plot_run_history(cfg)) == 2


def test_routine_rows_are_written_when_due_and_event_rows_always(tmp_path):
    log = MetricsLog(tmp_path, interval=10.0)

    def row(event, t):
        log.write(event, t, elapsed_seconds=t, position=0, samples_trained=0, samples_filtered=0, samples_failed=0,
                  tokens=0, patterns_learned=[0])

    row("start", 0.0)
    for t in (0.5, 1.0, 9.0):
        row("checkpoint", t)
    row("checkpoint", 10.5)
    row("progress", 11.0)
    row("interrupt", 11.5)
    assert [(r.event, r.elapsed_seconds) for r in read_metrics(tmp_path)] == [
        ("start", 0.0), ("checkpoint", 10.5), ("interrupt", 11.5)]
