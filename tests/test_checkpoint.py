"""Checkpoint store: atomic durable writes, fallback past damaged files, clear errors, the writer lock."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from soak import SOAK

from checkpoints import make_ckpt
from streamtrain.errors import CheckpointError
from streamtrain.records.checkpoint import (
    CheckpointStore,
    FailedSample,
)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "run1", keep=3)


def test_round_trip_and_names(store: CheckpointStore) -> None:
    """A saved checkpoint loads back equal, under ckpt-{sequence:08d}.json."""
    assert store.latest() is None
    assert store.next_sequence() == 1
    ckpt = make_ckpt(1)
    path = store.save(ckpt)
    assert path.name == "ckpt-00000001.json"
    assert CheckpointStore.load(path) == ckpt
    assert store.latest() == ckpt
    assert store.latest_with_path() == (ckpt, path)
    assert store.next_sequence() == 2


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")


def test_keeps_newest(store: CheckpointStore) -> None:
    """Only the newest `keep` files survive a save, also for a store opened on a folder written by another one."""
    for seq in range(1, 7):
        store.save(make_ckpt(seq))
        assert store.next_sequence() == seq + 1
    assert _names(store.run_dir) == ["ckpt-00000004.json", "ckpt-00000005.json", "ckpt-00000006.json"]
    assert store.latest().sequence == 6
    resumed = CheckpointStore(store.run_dir, keep=3)
    assert resumed.next_sequence() == 7
    resumed.save(make_ckpt(7))
    assert _names(store.run_dir) == ["ckpt-00000005.json", "ckpt-00000006.json", "ckpt-00000007.json"]
    fewer = CheckpointStore(store.run_dir, keep=1)  # keep_checkpoints lowered between two trainings
    fewer.save(make_ckpt(8))
    assert _names(store.run_dir) == ["ckpt-00000008.json"]


def test_stale_temp_files_are_removed_by_the_first_save(store: CheckpointStore) -> None:
    """Temp files of a killed writer are never listed, and the next writer's first save removes them."""
    store.save(make_ckpt(1))
    stale = [store.run_dir / ".ckpt-00000002.json.999999.tmp", store.run_dir / ".ckpt-00000003.json.4242.tmp"]
    stale[0].write_text('{"torn')
    stale[1].write_text(make_ckpt(3).model_dump_json())
    (store.run_dir / "notes.txt").write_text("not ours")  # other files are left alone
    writer = CheckpointStore(store.run_dir, keep=3)
    assert [s for s, _ in writer.paths()] == [1] and writer.next_sequence() == 2
    writer.save(make_ckpt(2))
    assert _names(store.run_dir) == ["ckpt-00000001.json", "ckpt-00000002.json", "notes.txt"]
    assert writer.latest().sequence == 2


def test_saves_are_visible_to_other_stores_and_listings_see_the_folder(store: CheckpointStore) -> None:
    """A store remembers its files only to save: every reader (itself included) sees what is on disk."""
    c2 = make_ckpt(2)
    p1, p2 = store.save(make_ckpt(1)), store.save(c2)
    reader = CheckpointStore(store.run_dir)
    assert reader.paths() == [(1, p1), (2, p2)]
    assert reader.latest_with_path() == (c2, p2)
    assert [e.sequence for e in reader.entries()] == [1, 2]
    p3 = store.save(make_ckpt(3))
    assert reader.latest_with_path()[1] == p3 and reader.next_sequence() == 4
    p3.unlink()  # removed behind the writer's back
    assert store.paths() == [(1, p1), (2, p2)]
    assert store.latest().sequence == 2


def test_a_failed_save_makes_the_next_one_list_the_folder(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed save the store forgets what it knew: the next sequence comes from the folder again."""
    store.save(make_ckpt(1))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(CheckpointError, match="Input/output error"):
        store.save(make_ckpt(2))
    monkeypatch.undo()
    (store.run_dir / "ckpt-00000009.json").write_text(make_ckpt(9).model_dump_json())
    assert store.next_sequence() == 10
    store.save(make_ckpt(10))
    assert _names(store.run_dir) == ["ckpt-00000001.json", "ckpt-00000009.json", "ckpt-00000010.json"]


def test_temp_files_are_never_listed(store: CheckpointStore) -> None:
    """A complete-looking temp file is still not a checkpoint: only ckpt-NNNNNNNN.json names count."""
    store.save(make_ckpt(1))
    (store.run_dir / ".ckpt-00000002.json.123.tmp").write_text(make_ckpt(2).model_dump_json())
    (store.run_dir / "ckpt-2.json").write_text(make_ckpt(2).model_dump_json())
    assert [s for s, _ in store.paths()] == [1]
    assert store.latest().sequence == 1


def test_corrupt_newest_falls_back_with_warning(store: CheckpointStore, caplog: pytest.LogCaptureFixture) -> None:
    """A torn newest file is skipped with a warning naming it; the previous one is used."""
    store.save(make_ckpt(1))
    store.save(make_ckpt(2))
    newest = store.save(make_ckpt(3))
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="streamtrain.records.checkpoint"):
        ckpt, path = store.latest_with_path()
    assert ckpt.sequence == 2 and path.name == "ckpt-00000002.json"
    assert str(newest) in caplog.text


@pytest.mark.parametrize(
    "damage",
    [b"", b"\x00\x00\x00", b"[1, 2]", b'{"schema_version": 1, "run_name": "run1"}', b'{"schema_version": 1'],
    ids=["empty", "zeros", "list", "missing-fields", "truncated"],
)
def test_all_corrupt_is_a_clear_error(store: CheckpointStore, damage: bytes) -> None:
    """When no file is valid, the error names every damaged file and the way out."""
    paths = [store.save(make_ckpt(s)) for s in (1, 2)]
    for p in paths:
        p.write_bytes(damage)
    with pytest.raises(CheckpointError) as info:
        store.latest()
    msg = str(info.value)
    assert all(str(p) in msg for p in paths)
    assert "--fresh" in msg


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ({"schema_version": 3, "library_version": "9.0"}, "newer streamtrain"),
        ({"schema_version": 0}, "unknown schema_version 0"),
        ({"schema_version": "1"}, "unknown schema_version '1'"),
        ({"run_name": "x", "offset": 20000, "config": {}}, "old-format"),
        ({"hello": "world"}, "not a streamtrain checkpoint"),
    ],
    ids=["future", "zero", "string", "old-format", "foreign-json"],
)
def test_incompatible_files_are_clear_errors_not_fallbacks(
    store: CheckpointStore, content: dict, expect: str
) -> None:
    """Another format or version is an error naming the file (never a KeyError, never a silent fallback)."""
    store.save(make_ckpt(1))
    bad = store.run_dir / "ckpt-00000002.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=expect) as info:
        CheckpointStore.load(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(CheckpointError, match=expect):
        store.latest()


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be read"):
        CheckpointStore.load(tmp_path / "nope.json")


def test_entries_report_validity(store: CheckpointStore) -> None:
    """entries() lists each file with its validity, reason and position, without raising."""
    store.save(make_ckpt(1, reason="interval"))
    p2 = store.save(make_ckpt(2, reason="end"))
    p2.write_text("{")
    entries = store.entries()
    assert [(e.sequence, e.valid, e.reason) for e in entries] == [(1, True, "interval"), (2, False, None)]
    assert entries[0].position.raw_offset == 10
    assert entries[0].created_at is not None
    assert "not valid JSON" in entries[1].error


def test_write_past_the_file_size_limit_leaves_previous_checkpoint(store: CheckpointStore) -> None:
    """A real failing write: the save runs in a child process under a kernel file-size limit (RLIMIT_FSIZE, with
    SIGXFSZ ignored), so writing the temp file fails with EFBIG. Clear error, nothing lost."""
    first = store.save(make_ckpt(1))
    before = first.read_bytes()
    big = make_ckpt(2, failures=[FailedSample(raw_index=i, error="x" * 150) for i in range(1000)])  # ~200 KB
    payload = store.run_dir.parent / "ckpt-2.json"           # outside the run folder
    payload.write_text(big.model_dump_json())
    limit = 64 * 1024
    assert len(before) < limit < len(payload.read_bytes())
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        from pathlib import Path
        from streamtrain.records.checkpoint import Checkpoint, CheckpointStore
        from streamtrain.errors import CheckpointError
        ckpt = Checkpoint.model_validate_json(Path({str(payload)!r}).read_text())
        store = CheckpointStore({str(store.run_dir)!r}, keep=3)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            store.save(ckpt)
        except CheckpointError as exc:
            print(exc)
            sys.exit(0)
        sys.exit(1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    message = done.stdout
    assert "the file-size limit of this process is reached (ulimit -f" in message, message
    assert "ckpt-00000002.json" in message and "previous checkpoints are untouched" in message, message
    assert sorted(p.name for p in store.run_dir.iterdir() if p.name != ".lock") == ["ckpt-00000001.json"]
    assert first.read_bytes() == before
    assert store.latest().sequence == 1


def test_fsync_failure_leaves_previous_checkpoint(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from fsync -> clear error, nothing lost. A mock of os.fsync: a real disk cannot be made to fail an
    fsync on demand here (no fault-injecting device or file system is available to the tests)."""
    first = store.save(make_ckpt(1))
    before = first.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="disk is full") as info:
        store.save(make_ckpt(2))
    monkeypatch.undo()
    assert "previous checkpoints are untouched" in str(info.value)
    assert sorted(p.name for p in store.run_dir.iterdir() if p.name != ".lock") == ["ckpt-00000001.json"]
    assert first.read_bytes() == before
    assert store.latest().sequence == 1


def test_folder_is_a_file(tmp_path: Path) -> None:
    """A checkpoint folder that is a file is a clear error for reading and writing."""
    target = tmp_path / "run1"
    target.write_text("not a folder")
    store = CheckpointStore(target)
    with pytest.raises(CheckpointError, match="is a file"):
        store.save(make_ckpt(1))
    with pytest.raises(CheckpointError, match="is a file"):
        store.latest()
    parent_is_file = CheckpointStore(target / "sub")
    with pytest.raises(CheckpointError, match=str(target)):
        parent_is_file.save(make_ckpt(1))


def test_folder_not_writable(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES on creating the temp file -> clear error (simulated: the tests run as root, which ignores modes)."""
    store.save(make_ckpt(1))
    real_open = os.open

    def denied(path, flags, *a, **k):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="not writable"):
        store.save(make_ckpt(2))
    monkeypatch.undo()
    assert store.latest().sequence == 1


def test_second_writer_is_refused(store: CheckpointStore, tmp_path: Path) -> None:
    """The lock is exclusive, across processes (the message names the run and the pid) and within one."""
    with store.lock():
        with pytest.raises(CheckpointError, match=r"this process is still training run run1"):
            with CheckpointStore(store.run_dir).lock():
                pass
        code = (
            "import sys\nfrom streamtrain.records.checkpoint import CheckpointStore\n"
            "try:\n    CheckpointStore(sys.argv[1]).lock().__enter__()\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(store.run_dir)], capture_output=True, text=True, check=True)
        assert "CheckpointError another streamtrain process" in out.stdout
    with store.lock():  # released on exit
        pass


@pytest.mark.soak
def test_sigkill_during_writes_never_leaves_a_torn_checkpoint(tmp_path: Path, zygote) -> None:
    """A writer SIGKILLed at random moments: every checkpoint file is whole, the newest one loads, none is lost.

    The writers are forked by conftest's zygote, which has imported what they import: each writes at once."""
    run_dir = tmp_path / "killed"
    store = CheckpointStore(run_dir, keep=3)
    writer = Path(__file__).with_name("checkpoint_writer.py")
    rng = random.Random(1234)
    kills = 200 if SOAK else 20
    last_seq = 0
    temp_seen = 0
    for i in range(kills):
        out = tmp_path / f"writer-{i}.out"
        out.touch()
        proc = zygote.spawn([sys.executable, writer, run_dir, last_seq + 1], out)
        deadline = time.monotonic() + 60
        while b"ready" not in out.read_bytes():  # printed once its first checkpoint is saved
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, f"writer {i} saved no checkpoint within 60 s"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.08))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        temp_seen += any(p.name.endswith(".tmp") for p in run_dir.iterdir())
        entries = store.entries()
        assert entries and all(e.valid for e in entries), [e.error for e in entries if not e.valid]
        ckpt, path = store.latest_with_path()
        assert path.name.startswith("ckpt-") and not path.name.endswith(".tmp")
        assert ckpt.sequence > last_seq  # the "ready" checkpoint at least is there
        assert ckpt.position.raw_offset == ckpt.sequence * 10
        last_seq = ckpt.sequence
    # The next save cleans up whatever temp file the last kill left.
    store.save(make_ckpt(last_seq + 1, run_name="killed"))
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    print(f"{kills} kills, {temp_seen} left a temp file behind")
