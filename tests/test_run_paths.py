"""Paths that must not strand a run: a project folder moved or copied as a whole, a resume after the server's key
lifetime, a full or read-only disk, and a history file that stays small however often checkpoints are written.
Each case runs through the CLI (in-process ``cli.main``, or ``python -m streamtrain`` where the process matters) on
a real server process."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
from faultproxy import FaultProxy
from runs import SAMPLES, kb_by_level, make_config, train_command
from tiny_tokenizer import build_tokenizer_json
from zygote import Zygote

from streamtrain.cli import EXIT_ERROR, EXIT_OK, main
from streamtrain.config import ClientConfig, load_config
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.records.journal import read_journal
from streamtrain.records.metrics import MetricsLog, read_metrics
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


def _config(root: str, data_files, path: str = "parquet", tokenizer="words"):
    from streamtrain.config import RunConfig

    return RunConfig(run_name="r", checkpoint_dir=f"{root}/ck", tokenizer=tokenizer,
                     dataset={"path": path, "data_files": data_files})


@pytest.mark.parametrize(("old", "new", "moved", "by_content"), [
    # a project folder moved: local paths at the same place relative to the run folder match, in every form
    ("/a/p/data/*.parquet", "/b/q/data/*.parquet", True, True),
    (["/a/p/data/x.parquet", "/a/p/y.parquet"], ["/b/q/data/x.parquet", "/b/q/y.parquet"], True, True),
    ({"train": "/a/p/d/*.parquet", "test": ["/a/shared/t.parquet"]},
     {"train": "/b/q/d/*.parquet", "test": ["/b/shared/t.parquet"]}, True, True),
    # another place: only the content check (the files the checkpoint recorded) can accept it
    ("/a/p/data/*.parquet", "/b/q/elsewhere/*.parquet", False, True),
    (["/a/p/x.parquet"], ["/b/q/x.parquet", "/b/q/y.parquet"], False, True),
    # URLs and hub paths match only as written
    ("https://h/a/p/x.parquet", "https://h/b/q/x.parquet", False, False),
    (["/a/p/x.parquet", "hf://datasets/o/n/x.parquet"], ["/b/q/x.parquet", "hf://datasets/o/m/x.parquet"], False,
     False),
])
def test_local_must_match_paths_match_at_the_same_place(old, new, moved, by_content):
    from streamtrain.config import resume_differences

    a, b = _config("/a/p", old), _config("/b/q", new)
    assert (resume_differences(a, b) == []) is moved
    assert (resume_differences(a, b, files_checked=True) == []) is by_content


def test_hub_data_files_and_tokenizer_names_match_only_as_written():
    from streamtrain.config import resume_differences

    hub_a, hub_b = _config("/a/p", "en/*.json.gz", path="allenai/c4"), _config("/b/q", "en/*.json.gz", path="allenai/c4")
    assert resume_differences(hub_a, hub_b, files_checked=True) == []
    other = _config("/b/q", "fr/*.json.gz", path="allenai/c4")
    assert [d[0] for d in resume_differences(hub_a, other, files_checked=True)] == ["dataset.data_files"]
    tok = {"hf": "/a/p/tok/tokenizer.json"}
    a = _config("/a/p", "/a/p/x.parquet", tokenizer=tok)
    assert resume_differences(a, _config("/b/q", "/b/q/x.parquet", tokenizer={"hf": "/b/q/tok/tokenizer.json"})) == []
    assert [d[0] for d in resume_differences(a, _config("/b/q", "/b/q/x.parquet",
                                                        tokenizer={"hf": "/b/q/tok2/tokenizer.json"}))] == ["tokenizer.hf"]
    named = _config("/a/p", "/a/p/x.parquet", tokenizer={"hf": "org/model-a"})
    assert [d[0] for d in resume_differences(named, _config("/a/p", "/a/p/x.parquet",
                                                            tokenizer={"hf": "org/model-b"}))] == ["tokenizer.hf"]


# -- a full or read-only disk ---------------------------------------------------------------------------------


def _limited_cli(zygote: Zygote, config: Path, max_samples: int, fsize: int | None) -> subprocess.CompletedProcess[str]:
    """``python -m streamtrain train`` in a process whose files may grow to ``fsize`` bytes at most (RLIMIT_FSIZE,
    SIGXFSZ ignored: a write past it fails with EFBIG instead of killing the process); the embedded server it
    starts inherits the limit. Forked by conftest's zygote; its output goes to files beside the config (short:
    within the limit)."""
    calls = len(list(config.parent.glob("cli-*.out")))
    out, err = config.parent / f"cli-{calls}.out", config.parent / f"cli-{calls}.err"
    argv = train_command(config, "--max-samples", str(max_samples))
    code = zygote.spawn(argv, out, err, fsize_limit=fsize).wait(timeout=180)
    return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def _disk_project(root: Path, corpus: Path) -> Path:
    root.mkdir(parents=True)
    config = root / "run.toml"
    config.write_text(
        'run_name = "disk"\ncheckpoint_dir = "ck"\ncheckpoint_every = 5\n'
        "[client]\nsamples_per_request = 4\noutage_seconds = 3\n"
        f'[dataset]\npath = "parquet"\ndata_files = "{corpus}/*.parquet"\nmin_chars = 20\n'
        "[[layers]]\nchunk_size = 6\n[[layers]]\nchunk_size = 3\n"
    )
    return config


def test_a_full_disk_mid_run_is_a_507_that_names_the_disk_and_the_run_resumes_exactly(demo_corpus, tmp_path, zygote):
    """The embedded server's database outgrows what its disk allows: the server answers 507 with the reason (not
    a bare 500), the run stops with it in one message and an error checkpoint, the checkpoints before it stay
    whole, and the same command finishes the run exactly once there is room.

    How the disk fills: RLIMIT_FSIZE on the CLI process and the server it starts (a real kernel limit on real
    writes; it gives EFBIG where a full disk gives ENOSPC, and SQLite turns both into a failed write). It needs no
    privileges, so it works in CI as here; a small tmpfs would need a mount, which CI may not allow."""
    config = _disk_project(tmp_path / "project", demo_corpus)
    run_dir = tmp_path / "project" / "ck" / "disk"
    stopped = _limited_cli(zygote, config, 300, 512 * 1024)  # the database of 300 samples is ~900 KiB
    assert stopped.returncode == EXIT_ERROR and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    message = stopped.stderr
    assert "answered HTTP 507 Insufficient Storage: the server cannot write its database" in message, message
    assert f"{run_dir / 'kb.sqlite3'}" in message and "the disk mounted at /" in message
    assert "may write files of at most 512.0 KiB" in message and "What to do: free space on that disk" in message
    entries = CheckpointStore(run_dir).entries()
    assert all(e.valid for e in entries) and entries[-1].reason == "error" and "507" in entries[-1].checkpoint.error
    assert entries[-1].position.raw_offset < 300

    resumed = _limited_cli(zygote, config, 300, None)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    assert "-> 300 (resumed)" in resumed.stdout
    reference = _disk_project(tmp_path / "reference", demo_corpus)
    assert _limited_cli(zygote, reference, 300, None).returncode == EXIT_OK
    assert _kb(config) == _kb(reference)


def test_a_server_that_cannot_start_on_a_full_disk_says_why(demo_corpus, tmp_path, zygote):
    """Resumed on a disk with no room for the database's shared-memory file: the trainer's message carries the
    server's own reason (its log) and the disk; when even the log cannot take that reason, the server's exit status
    still tells, and the trainer describes the disk itself. No traceback, no 'empty log' riddle.

    The full disk is RLIMIT_FSIZE, as above (16 KiB: room for the lock files and a short log line, not for the
    32 KiB -shm file of a WAL database)."""
    config = _disk_project(tmp_path / "project", demo_corpus)
    run_dir = tmp_path / "project" / "ck" / "disk"
    assert _limited_cli(zygote, config, 20, None).returncode == EXIT_OK
    db = run_dir / "kb.sqlite3"

    refused = _limited_cli(zygote, config, 40, 16 * 1024)
    assert refused.returncode == EXIT_ERROR and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    message = refused.stderr
    assert f"embedded server could not start: it cannot write its database {db} (the disk mounted at /" in message
    assert "may write files of at most 16.0 KiB" in message, message
    assert f"error: the server cannot write its database {db}: a write to its disk failed" in message  # its log

    (run_dir / "server.log").write_bytes(b"an old line\n" * 2000)  # a log past the limit: the reason is lost
    refused = _limited_cli(zygote, config, 40, 16 * 1024)
    assert refused.returncode == EXIT_ERROR and "Traceback" not in refused.stderr
    assert f"embedded server could not start: it cannot write its database {db}" in refused.stderr
    assert "an old line" in refused.stderr and "error: the server cannot" not in refused.stderr

    (run_dir / "server.log").unlink()
    assert _limited_cli(zygote, config, 40, None).returncode == EXIT_OK
    assert CheckpointStore(run_dir).latest().position.raw_offset == 40


@pytest.mark.parametrize("condition", ["full", "read-only"])
def test_the_servers_507_answer_carries_the_reason_and_nothing_is_applied(app_client, tmp_path, condition):
    """The server's plain contract, in-process: a write SQLite cannot make is a 507 with a JSON body (reason,
    error code, the database path, its disk), the request is applied not at all, and once there is room again the
    server goes on (no transaction left open). SQLite's own errors, produced honestly: ``max_page_count`` gives
    SQLITE_FULL, the error a full disk gives; ``query_only`` gives SQLITE_READONLY, that of a read-only file."""
    from streamtrain.server.store import Store

    store = Store(tmp_path / "kb.sqlite3")
    http = app_client(store=store)

    def learn(i: int):
        return http.post("/learn-batch", json={"items": [{"node_id": "n", "events": [[f"w{i}-{j}"] for j in range(40)]}]})

    assert learn(0).status_code == 200
    if condition == "full":
        store.conn.execute(f"PRAGMA max_page_count={store.conn.execute('PRAGMA page_count').fetchone()[0]}")
    else:
        store.conn.execute("PRAGMA query_only=1")
    answers = [learn(i) for i in range(1, 6)]
    refused = [a for a in answers if a.status_code != 200]
    assert refused and all(a.status_code == 507 for a in refused)
    body = refused[0].json()
    code = {"full": "INSUFFICIENT_STORAGE", "read-only": "STORAGE_READ_ONLY"}[condition]
    assert body["error"]["code"] == code and body["error"]["path"] == str(tmp_path / "kb.sqlite3")
    assert body["detail"].startswith(f"the server cannot write its database {tmp_path / 'kb.sqlite3'}: ")
    assert "Nothing of the request was applied" in body["detail"] and "What to do" in body["detail"]
    assert body["error"]["mount"] and isinstance(body["error"]["free_bytes"], int)
    stats = http.get("/nodes/n/stats").json()
    applied = 1 + sum(a.status_code == 200 for a in answers)
    assert stats["total_frequency"] == applied  # each learn-batch learns one pattern: the refused ones none

    store.conn.execute("PRAGMA max_page_count=1000000" if condition == "full" else "PRAGMA query_only=0")
    assert learn(99).status_code == 200
    assert http.get("/nodes/n/stats").json()["total_frequency"] == applied + 1


class _FailingWrites:
    """A module's ``os``, whose ``write`` fails with ``error`` from its ``after``-th call on: the trainer's own files
    on a disk that fills up or turns read-only mid-run. A fault at the os.write edge: as root in a container, no
    read-only disk can be made here without a mount, and a full one only through a limit (the tests above)."""

    def __init__(self, error: int, after: int) -> None:
        self.error, self.after, self.calls = error, after, 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        self.calls += 1
        if self.calls >= self.after:
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)


@pytest.mark.parametrize(("module", "error", "action", "cause"), [
    ("journal", errno.ENOSPC, "append to the journal", "the disk is full"),
    ("checkpoint", errno.EROFS, "write checkpoint", "the disk is read-only"),
])
def test_the_trainers_own_writes_name_the_disk_and_the_run_resumes_exactly(
        module, error, action, cause, server, demo_corpus, tmp_path, reference, monkeypatch, capsys):
    """The journal or a checkpoint cannot be written mid-run: one message names the file, why, its disk and what
    to do; the checkpoints written before stay whole; the same command, once the disk is fixed, leaves exactly the
    uninterrupted knowledge base."""
    import importlib

    cfg = make_config(tmp_path, demo_corpus, f"own-writes-{module}", server.url,
                      client=ClientConfig(outage_seconds=5, samples_per_request=4))
    config = tmp_path / "run.json"
    config.write_text(cfg.model_dump_json())
    target = importlib.import_module(f"streamtrain.records.{module}")
    monkeypatch.setattr(target, "os", _FailingWrites(error, after=6))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_ERROR
    message = capsys.readouterr().err
    assert f"cannot {action} {cfg.run_dir}/" in message and f": {cause} (the disk mounted at /" in message, message
    assert "free of" in message and "What to do: free space on that disk or make it writable" in message
    assert "Traceback" not in message
    entries = CheckpointStore(cfg.run_dir).entries()
    assert entries and all(e.valid for e in entries) and entries[-1].position.raw_offset < SAMPLES
    monkeypatch.undo()
    assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_OK
    assert kb_by_level(server.url, cfg) == reference


# -- steps in doubt, resumed after the server's key lifetime ---------------------------------------------------------

WEEKEND = 3 * 86400  # the run stopped on Friday evening and is resumed on Monday morning


def _lost_answers(cfg, db: Path, samples_per_request: int = 4):
    """Train through a proxy that, from the 4th learn-batches request on, forwards each one to the server and drops
    its answer: the requests take effect, the trainer never hears so, and after its retry budget the run stops
    with those samples in flight (the journal's last lines, no fin). Returns the raw indices in doubt."""
    seen = {"n": 0}

    def from_the_4th(method: str, path: str) -> bool:
        if method == "POST" and path == "/learn-batches":
            seen["n"] += 1
            return seen["n"] >= 4
        return False

    db.parent.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer(db) as srv, FaultProxy(srv.url, fault_rate=1.0, kinds=["drop_after"],
                                               match=from_the_4th) as proxy:
        config = cfg.run_dir.parent.parent / f"{cfg.run_name}-through-proxy.json"
        config.write_text(cfg.with_overrides(server_url=proxy.url).model_dump_json())
        assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_ERROR
        assert proxy.counts["drop_after"] >= 1
    in_doubt = sorted(s for s, rec in read_journal(cfg.run_dir / "journal.jsonl").samples.items()
                      if rec.finished is None and rec.last_phase == "batches")
    assert in_doubt
    return in_doubt


def _let_time_pass(run_dir: Path, db: Path, seconds: int) -> None:
    """The weekend, without waiting: every time the run and its server wrote moves back by ``seconds`` (the
    journal's line times; the keys', sessions' and sweeps' times in the database), as if written that long ago."""
    journal = run_dir / "journal.jsonl"
    lines = []
    for raw in journal.read_bytes().splitlines():
        entry = json.loads(raw)
        if "at" in entry:
            entry["at"] -= seconds
        lines.append(json.dumps(entry, separators=(",", ":")).encode())
    journal.write_bytes(b"\n".join(lines) + b"\n")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE idempotency SET created_at = created_at - ?", (seconds,))
        conn.execute("UPDATE sessions SET created_at = created_at - ?, expires_at = expires_at - ?", (seconds, seconds))
        conn.execute("UPDATE meta SET value = CAST(value AS REAL) - ? WHERE key = 'keys_swept_before'", (seconds,))
    conn.close()


def _doubt_config(tmp_path: Path, corpus: Path, name: str):
    return make_config(tmp_path, corpus, name, None, client=ClientConfig(outage_seconds=2, samples_per_request=4))


def test_the_runs_own_server_keeps_its_keys_for_a_weekend_and_resumes_exactly(demo_corpus, tmp_path, reference,
                                                                                capsys):
    """Samples in doubt (their requests applied, the answers lost), resumed three days later on the run's own
    embedded server: the trainer starts it with a key lifetime that covers the journal's oldest step in doubt, so
    the replays are answered from the stored keys, and the knowledge base is exactly the uninterrupted one (with the
    default 24 h lifetime the replays would learn those samples a second time)."""
    cfg = _doubt_config(tmp_path, demo_corpus, "weekend")
    db = cfg.run_dir / "kb.sqlite3"
    in_doubt = _lost_answers(cfg, db)
    _let_time_pass(cfg.run_dir, db, WEEKEND)
    config = tmp_path / "embedded.json"
    config.write_text(cfg.model_dump_json())  # server_url absent: the trainer starts its own server on the run's KB
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_OK, capsys.readouterr().err
    assert f"raw position {min(in_doubt)} -> {SAMPLES} (resumed)" in capsys.readouterr().out
    with EmbeddedServer(db) as srv:
        assert kb_by_level(srv.url, cfg) == reference


def test_a_server_that_forgot_the_keys_is_refused_with_the_ways_out(demo_corpus, tmp_path, reference, capsys):
    """The same samples in doubt on a server of the user's (`streamtrain serve`, 24 h keys), three days later: the
    resume is refused before anything is sent, naming the samples, their age, the server's key lifetime and the
    ways out; the first way out (the server restarted with a longer key lifetime, its keys not yet swept) resumes
    exactly."""
    cfg = _doubt_config(tmp_path, demo_corpus, "forgot")
    db = tmp_path / "served" / "kb.sqlite3"
    in_doubt = _lost_answers(cfg, db)
    _let_time_pass(cfg.run_dir, db, WEEKEND)
    config = tmp_path / "served.json"
    with EmbeddedServer(db) as srv:
        config.write_text(cfg.with_overrides(server_url=srv.url).model_dump_json())
        before = kb_by_level(srv.url, cfg)
        capsys.readouterr()
        assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_ERROR
        message = capsys.readouterr().err
        assert kb_by_level(srv.url, cfg) == before  # refused before a single request
    listed = ", ".join(str(s) for s in in_doubt[:10])
    assert f"cannot resume run 'forgot' exactly: {len(in_doubt)} sample(s) were in flight" in message, message
    assert "sent 3 d ago" in message and f"(raw records {listed};" in message and "keeps keys for 24 h," in message
    lifetime = int(re.search(r"restart it with --idempotency-ttl (\d+) or more", message).group(1))
    assert WEEKEND + 86400 <= lifetime <= WEEKEND + 86400 + 3600
    assert "--resend-in-doubt" in message and "--fresh --move-aside" in message and "Traceback" not in message

    with EmbeddedServer(db, extra_args=["--idempotency-ttl", str(lifetime)]) as srv:
        config.write_text(cfg.with_overrides(server_url=srv.url).model_dump_json())
        assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_OK
        assert kb_by_level(srv.url, cfg) == reference


def test_keys_swept_by_another_server_are_refused_and_resend_in_doubt_goes_on(demo_corpus, tmp_path, capsys,
                                                                             caplog):
    """Between the stop and the resume another server with 24 h keys served the run's database and swept: even
    the run's own server, started with a long key lifetime, cannot decide the samples in doubt any more. Refused
    (naming the sweep), and --resend-in-doubt goes on, saying which samples may be learned twice."""
    cfg = _doubt_config(tmp_path, demo_corpus, "swept")
    db = cfg.run_dir / "kb.sqlite3"
    in_doubt = _lost_answers(cfg, db)
    _let_time_pass(cfg.run_dir, db, WEEKEND)
    with EmbeddedServer(db) as other, httpx.Client(base_url=other.url) as http:  # a notebook's server, say
        assert http.post("/sessions", json={"node_id": "someone-else"}).status_code == 200  # its sweep
    config = tmp_path / "embedded.json"
    config.write_text(cfg.model_dump_json())
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--no-progress"]) == EXIT_ERROR
    message = capsys.readouterr().err
    assert "and has removed those older than" in message and "--resend-in-doubt" in message, message
    assert "--idempotency-ttl" not in message  # the run's own server: a longer lifetime cannot bring keys back
    with caplog.at_level(logging.WARNING, logger="streamtrain.indoubt"):
        assert main(["train", "--config", str(config), "--no-progress", "--resend-in-doubt"]) == EXIT_OK
    said = caplog.text
    assert f"raw records {', '.join(str(s) for s in in_doubt[:10])} may be learned twice" in said, said


def test_what_decides_a_doubt_and_how_old_it_is(tmp_path, caplog):
    """The rule itself, for what the tests above do not reach: a line of an older journal (no time) is dated by
    the file; a server that does not state its key lifetime is taken at the default; steps decided by sessions
    (a real KATO) are said when their sessions have expired, not refused (the knowledge base decides them)."""
    from streamtrain import indoubt
    from streamtrain.errors import StepsInDoubt
    from streamtrain.records.journal import SampleRecord
    from streamtrain.wire import ServiceInfo

    journal = tmp_path / "journal.jsonl"
    journal.write_text("")
    now = 2_000_000_000.0
    os.utime(journal, (now - 2 * 86400, now - 2 * 86400))
    undated = {7: SampleRecord(last_step=0, last_phase="batches")}
    keyed_server = ServiceInfo(idempotency=True)  # says nothing of its lifetime: 24 h assumed
    with pytest.raises(StepsInDoubt, match=r"raw records 7;.*keeps keys for 24 h \(assumed: its GET / does not say\)"):
        indoubt.check(undated, keyed_server, run_name="r", journal_path=journal, embedded=False, resend=False, now=now)
    recent = {7: SampleRecord(last_step=0, last_phase="batches", last_at=int(now - 3600))}
    indoubt.check(recent, keyed_server, run_name="r", journal_path=journal, embedded=False, resend=False, now=now)
    long_keys = ServiceInfo(idempotency=True, idempotency_ttl_seconds=7 * 86400, idempotency_keys_since=now - 8 * 86400)
    indoubt.check(undated, long_keys, run_name="r", journal_path=journal, embedded=False, resend=False, now=now)

    counted = {3: SampleRecord(last_step=2, last_phase="counted", last_counter=5, last_at=int(now - 30 * 3600)),
               4: SampleRecord(last_step=0, last_phase="observe", last_at=int(now - 30 * 3600))}
    with caplog.at_level(logging.WARNING, logger="streamtrain.indoubt"):
        indoubt.check(counted, ServiceInfo(), run_name="r", journal_path=journal, embedded=False, resend=False, now=now)
    assert "1 sample(s) in flight for 30 h, longer than training sessions live (24 h): raw records 3 " in caplog.text
    assert indoubt.embedded_server_args(journal, now=now) == []  # no keyed step in doubt in that (empty) journal
