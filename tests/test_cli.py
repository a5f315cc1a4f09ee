"""The streamtrain command: help, schema, inspect, a real short train, and exit codes with clear messages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from checkpoints import make_ckpt  # tests/ is on sys.path (rootdir conftest)
from streamtrain.cli import main
from streamtrain.records.checkpoint import CheckpointStore


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command as a user runs it (a real process: exit code, stdout, stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "streamtrain", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("command", [[], ["train"], ["demo"], ["inspect"], ["serve"], ["schema"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: streamtrain")
    if command == ["serve"]:
        assert "--db" in out  # the server's own options are there


def test_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"run_name", "dataset", "layers", "tokenizer"} <= set(schema["properties"])


def test_bad_config_exits_1_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('run_name = "a/b"\n[dataset]\npath = "parquet"\nmin_chars = -1\nfrobnicate = true\n')
    proc = run_cli("train", "--config", str(bad))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    for fragment in (str(bad), "run_name:", "dataset.min_chars:", "dataset.frobnicate: unknown key"):
        assert fragment in proc.stderr
    missing = run_cli("train", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "nope.toml does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", "x.toml", "--max-samples", "0"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_inspect_folder_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect shows each file's validity and the newest valid checkpoint's position, counters and config."""
    store = CheckpointStore(tmp_path / "run1", keep=5)
    store.save(make_ckpt(1))
    store.save(make_ckpt(2, reason="interrupt"))
    (tmp_path / "run1" / "ckpt-00000003.json").write_text("{ torn")
    assert main(["inspect", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    assert "ckpt-00000003.json  INVALID" in out
    assert "ckpt-00000002.json  valid    reason=interrupt" in out
    assert "checkpoint " + str(tmp_path / "run1" / "ckpt-00000002.json") in out
    assert "raw_offset=20" in out and "trained=18" in out and '"run_name": "run1"' in out

    assert main(["inspect", str(tmp_path)]) == 0  # a checkpoint_dir of run folders
    assert "run folder " + str(tmp_path / "run1") in capsys.readouterr().out

    assert main(["inspect", str(tmp_path / "run1" / "ckpt-00000001.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequence"] == 1

    assert main(["inspect", str(tmp_path / "run1" / "ckpt-00000003.json")]) == 1
    assert "not valid JSON" in capsys.readouterr().err

    # samples in flight when the last trainer stopped: inspect names them and how long ago their request went
    from streamtrain.records.journal import Journal

    journal = Journal(tmp_path / "run1", {"run_name": "run1", "config": make_ckpt(1).config.model_dump(mode="json")})
    journal.batches_sent([(21, 4), (24, 6)])
    journal.finished(21, trained=1, tokens=3, learns=[2, 1])
    journal.close()
    assert main(["inspect", str(tmp_path / "run1")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"in doubt: +1 sample\(s\) in flight when the last trainer stopped \(raw 24\); the oldest "
                     r"request was sent \d+ s ago", out), out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 1
    assert "no checkpoint files" in capsys.readouterr().err


def test_train_a_short_run_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real short run on the embedded server through the CLI, then a resume with a larger --max-samples."""
    pq.write_table(pa.table({"text": [f"line {i} of the tiny corpus, with words." for i in range(40)]}), tmp_path / "d.parquet")
    config = tmp_path / "run.toml"
    config.write_text(
        f'run_name = "cli"\ncheckpoint_dir = "{tmp_path / "ck"}"\ncheckpoint_every = 5\n'
        f'[dataset]\npath = "parquet"\ndata_files = "{tmp_path / "d.parquet"}"\n'
        "[[layers]]\nchunk_size = 4\n[[layers]]\nchunk_size = 2\n"
    )
    assert main(["train", "--config", str(config), "--max-samples", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run 'cli' finished: raw position 0 -> 10" in out
    assert main(["train", "--config", str(config), "--max-samples", "15", "--no-progress"]) == 0
    assert "raw position 10 -> 15 (resumed)" in capsys.readouterr().out
    assert CheckpointStore(tmp_path / "ck" / "cli").latest().position.raw_offset == 15


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C escaping the trainer (simulated: a real one checkpoints and returns) -> exit 130, no traceback."""
    import streamtrain.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streamtrain.trainer, "train", interrupted)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"run_name": "x", "dataset": {"path": "text", "data_files": "x.txt"}}))
    assert main(["train", "--config", str(config)]) == 130
    assert "interrupted" in capsys.readouterr().err
