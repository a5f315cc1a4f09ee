"""What a run reads, end to end (issue 13): a Hugging Face tokenizer, load_dataset options (a Latin-1 text file,
a revision), paths relative to the config file, and the demo's closing hint, through the CLI and ``train``."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_tokenizer import CORPUS, build_tokenizer_json  # tests/ is on sys.path (rootdir conftest)

from streamtrain.config import DatasetConfig, HFTokenizer, LayerConfig, RunConfig
from streamtrain.errors import DatasetError
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.trainer import train

LATIN1_LINES = ["Café crème brûlée, s'il vous plaît.", "Naïve façade: où est la pâtisserie?", "Ça va très bien."] * 4
SMALL_LAYERS = [LayerConfig(chunk_size=4), LayerConfig(chunk_size=2)]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "streamtrain", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=180)


def latin1_file(path: Path) -> Path:
    path.write_bytes("\n".join(LATIN1_LINES).encode("latin-1"))
    return path


def test_a_latin1_text_file_trains_with_load_kwargs(tmp_path: Path) -> None:
    """Without an encoding the text builder stops at record 0 (UnicodeDecodeError); load_kwargs = {encoding =
    "latin-1"} trains every line, and the knowledge base holds the accented words."""
    from streamtrain.analysis import Decoder, connect, top_patterns

    data = latin1_file(tmp_path / "latin1.txt")
    base = RunConfig(run_name="utf8", checkpoint_dir=tmp_path / "ck", layers=SMALL_LAYERS, max_samples=8,
                     dataset=DatasetConfig(path="text", data_files=str(data)))
    with pytest.raises(DatasetError, match=r"(?s)failed at raw record 0: UnicodeDecodeError"):
        train(base, progress=False)

    cfg = base.model_copy(update={
        "run_name": "latin1",
        "dataset": DatasetConfig(path="text", data_files=str(data), load_kwargs={"encoding": "latin-1"}),
    })
    result = train(cfg, progress=False)
    assert result.reason == "end" and result.final_position == 8
    assert result.samples_trained == 8 and result.samples_failed == 0
    assert CheckpointStore(cfg.run_dir).latest().config.dataset.load_kwargs == {"encoding": "latin-1"}
    with connect(None, cfg.run_dir / "kb.sqlite3") as conn:
        texts = [row["text"] for row in top_patterns(conn.client, cfg, 0, n=100, decoder=Decoder(conn.client, cfg))]
    assert any("Café crème brûlée" in t for t in texts), texts
    assert any("façade" in t for t in texts), texts


def test_revision_and_load_kwargs_reach_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset.revision and load_kwargs are passed to datasets.load_dataset. Offline no hub serves revisions,
    so the real load_dataset is wrapped to record its arguments (it still opens the real file); a text builder
    ignores a revision."""
    import datasets

    calls: list[dict] = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    cfg = RunConfig(run_name="rev", checkpoint_dir=tmp_path / "ck", layers=SMALL_LAYERS,
                    dataset=DatasetConfig(path="text", data_files=str(latin1_file(tmp_path / "l.txt")),
                                          revision="v1.0", load_kwargs={"encoding": "latin-1", "sample_by": "line"}))
    result = train(cfg, progress=False)
    assert result.samples_trained == len(LATIN1_LINES)
    assert calls, "load_dataset was never called"
    for call in calls:
        assert call["args"] == ("text", None)
        assert (call["revision"], call["encoding"], call["sample_by"]) == ("v1.0", "latin-1", "line")
        assert call["streaming"] is True and call["split"] == "train" and call["data_files"] == str(tmp_path / "l.txt")


def test_a_misspelled_load_kwarg_fails_when_the_dataset_opens(tmp_path: Path) -> None:
    cfg = RunConfig(run_name="typo", checkpoint_dir=tmp_path / "ck", layers=SMALL_LAYERS,
                    dataset=DatasetConfig(path="text", data_files=str(latin1_file(tmp_path / "l.txt")),
                                          load_kwargs={"encodng": "latin-1"}))
    with pytest.raises(DatasetError) as info:
        train(cfg, progress=False)
    msg = str(info.value)
    assert "encodng" in msg and "load_kwargs={'encodng': 'latin-1'}" in msg and "load_kwargs holds only" in msg


def _project(root: Path) -> Path:
    """A project folder: a run config with relative paths, its Parquet data and two tokenizer.json files."""
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": CORPUS}), root / "data" / "part-0.parquet")
    build_tokenizer_json(root / "tok" / "tokenizer.json", vocab_size=300)
    build_tokenizer_json(root / "tok2" / "tokenizer.json", vocab_size=280)
    config = root / "run.toml"
    config.write_text(
        'run_name = "hf"\ncheckpoint_dir = "ck"\ncheckpoint_every = 4\ntokenizer = { hf = "tok/tokenizer.json" }\n'
        '[dataset]\npath = "parquet"\ndata_files = ["data/*.parquet"]\n'
        "[[layers]]\nchunk_size = 4\n[[layers]]\nchunk_size = 2\n"
    )
    return config


def test_hf_tokenizer_and_relative_paths_through_the_cli(tmp_path: Path) -> None:
    """A config in its own folder, run from another folder: data, tokenizer and run folder are the config's.
    The HF tokenizer cuts the samples; a resume from yet another folder continues; a resume with another
    tokenizer.json is refused, naming both."""
    from tokenizers import Tokenizer

    config = _project(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = cli("train", "--config", str(config), "--max-samples", "6", "--no-progress", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert "run 'hf' finished: raw position 0 -> 6" in first.stdout
    assert not (elsewhere / "ck").exists() and not (elsewhere / "checkpoints").exists()
    run_dir = tmp_path / "project" / "ck" / "hf"
    ckpt = CheckpointStore(run_dir).latest()
    assert ckpt.config.tokenizer == HFTokenizer(hf=str(tmp_path / "project" / "tok" / "tokenizer.json"))
    assert ckpt.config.dataset.data_files == [str(tmp_path / "project" / "data" / "*.parquet")]
    hf = Tokenizer.from_file(str(tmp_path / "project" / "tok" / "tokenizer.json"))
    expected_tokens = sum(len(hf.encode(t, add_special_tokens=False).tokens) for t in CORPUS[:6])
    assert ckpt.counters.tokens == expected_tokens != sum(len(t.split()) for t in CORPUS[:6])

    again = cli("train", "--config", "project/run.toml", "--max-samples", "9", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "raw position 6 -> 9 (resumed)" in again.stdout

    config.write_text(config.read_text().replace('"tok/tokenizer.json"', '"tok2/tokenizer.json"'))
    refused = cli("train", "--config", str(config), "--max-samples", "12", "--no-progress", cwd=elsewhere)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (f'tokenizer.hf: checkpoint="{tmp_path}/project/tok/tokenizer.json" '
            f'current="{tmp_path}/project/tok2/tokenizer.json"') in refused.stderr
    assert CheckpointStore(run_dir).latest().position.raw_offset == 9


def test_a_missing_tokenizer_file_is_a_clear_cli_error(tmp_path: Path) -> None:
    config = _project(tmp_path / "project")
    config.write_text(config.read_text().replace('"tok/tokenizer.json"', '"nope/tokenizer.json"'))
    proc = cli("train", "--config", str(config), "--max-samples", "3", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot read {tmp_path}/project/nope/tokenizer.json" in proc.stderr


def test_the_demo_hint_works_as_printed(tmp_path: Path) -> None:
    """The demo's last line names a command that runs as printed, with or without the venv on PATH; the demo
    config's data/demo and checkpoints/demo are the working folder's."""
    bin_dir = str(Path(sys.executable).parent)
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = cli("demo", "--max-samples", "20", "--no-progress", cwd=tmp_path, env=bare)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "demo").is_dir() and CheckpointStore(tmp_path / "checkpoints" / "demo").latest()
    hint = proc.stdout.strip().splitlines()[-1]
    prefix = "see its checkpoints: "
    assert hint.startswith(prefix), proc.stdout
    command = hint.removeprefix(prefix)
    assert command == f"{shlex.quote(str(Path(bin_dir) / 'streamtrain'))} inspect checkpoints/demo"
    shown = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=tmp_path, env=bare, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "run folder checkpoints/demo" in shown.stdout and "reason=end" in shown.stdout

    activated = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = cli("demo", "--max-samples", "5", "--no-progress", cwd=tmp_path, env=activated)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{prefix}streamtrain inspect checkpoints/demo"


def test_the_hint_without_a_script_uses_python_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter with no streamtrain script beside it: the hint is `<python> -m streamtrain`, which works."""
    from streamtrain import cli as cli_module

    monkeypatch.setattr(sys, "executable", str(tmp_path / "no scripts here" / "python3"))
    assert cli_module._own_command() == f"'{tmp_path}/no scripts here/python3' -m streamtrain"
    monkeypatch.undo()
    version = subprocess.run([sys.executable, "-m", "streamtrain", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("streamtrain ")
