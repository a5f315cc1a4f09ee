"""The dataset's identity (streamtrain/data/datafiles.py), pure: ``dataset_changes`` compares two descriptions of a run's
files. Allowed: new files after every file the run has seen, and a folder moved as a whole. Refused, each change
named: a file added before or between the old ones, removed, changed, or the same files in another order."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamtrain.data.datafiles import dataset_changes
from streamtrain.records.dataset import DataFile, DatasetRecord


def local(folder: str, name: str, content: str) -> DataFile:
    """A local file: its fingerprint stands for its content (size and hash), whatever its path."""
    return DataFile(path=f"{folder}/{name}", size=len(content) * 100, fingerprint=f"sha-{content}")


def record(folder: str, files: list[tuple[str, str]]) -> DatasetRecord:
    return DatasetRecord(files=[local(folder, name, content) for name, content in files])


OLD = record("/data", [("a.parquet", "A"), ("b.parquet", "B"), ("c.parquet", "C")])


def test_the_same_files_resume():
    assert dataset_changes(OLD, OLD) == []


def test_files_after_the_old_ones_resume_and_are_logged(caplog):
    new = record("/data", [("a.parquet", "A"), ("b.parquet", "B"), ("c.parquet", "C"), ("d.parquet", "D")])
    with caplog.at_level(logging.INFO, logger="streamtrain.data.datafiles"):
        assert dataset_changes(OLD, new) == []
    assert "1 new file(s) after the ones the run has seen: ['/data/d.parquet']" in caplog.text


def test_a_folder_moved_as_a_whole_resumes():
    moved = record("/elsewhere/data", [("a.parquet", "A"), ("b.parquet", "B"), ("c.parquet", "C"), ("d.parquet", "D")])
    assert dataset_changes(OLD, moved) == []


@pytest.mark.parametrize(("new", "problems"), [
    (record("/data", [("0.parquet", "Z"), ("a.parquet", "A"), ("b.parquet", "B"), ("c.parquet", "C")]),
     ["added before files the run has already read: /data/0.parquet"]),
    (record("/data", [("a.parquet", "A"), ("ab.parquet", "Z"), ("b.parquet", "B"), ("c.parquet", "C")]),
     ["added before files the run has already read: /data/ab.parquet"]),
    (record("/data", [("a.parquet", "A"), ("c.parquet", "C")]),
     ["removed: /data/b.parquet"]),
    (record("/data", [("a.parquet", "A"), ("b.parquet", "B2"), ("c.parquet", "C")]),
     ["changed: /data/b.parquet (was 100 bytes, now 200 bytes; content differs)"]),
    (record("/moved", [("a.parquet", "A"), ("b.parquet", "B2"), ("c.parquet", "C")]),
     ["changed: /moved/b.parquet (was 100 bytes, now 200 bytes; content differs, moved from /data/b.parquet)"]),
    (record("/data", [("a.parquet", "B"), ("b.parquet", "A"), ("c.parquet", "C")]),
     ["the files are the same but in another order: /data/a.parquet, /data/b.parquet, /data/c.parquet"]),
], ids=["added-first", "added-between", "removed", "changed", "changed-and-moved", "reordered"])
def test_changes_that_move_raw_positions_are_each_named(new, problems):
    assert dataset_changes(OLD, new) == problems


def test_hub_files_are_known_by_their_pinned_paths():
    """Files on the hub have no local fingerprint: their path, pinned to a commit, is their identity."""
    pinned = DatasetRecord(files=[DataFile(path="hf://datasets/o/d@abc/train-0.parquet"),
                                  DataFile(path="hf://datasets/o/d@abc/train-1.parquet")])
    assert dataset_changes(pinned, pinned) == []
    grown = DatasetRecord(files=[*pinned.files, DataFile(path="hf://datasets/o/d@abc/train-2.parquet")])
    assert dataset_changes(pinned, grown) == []
    other_commit = DatasetRecord(files=[DataFile(path="hf://datasets/o/d@def/train-0.parquet"),
                                        DataFile(path="hf://datasets/o/d@def/train-1.parquet")])
    changes = dataset_changes(pinned, other_commit)
    assert len(changes) == 2 and all("content differs" in c and "bytes" not in c for c in changes), changes


# -- any files, any change ----------------------------------------------------------------------------------------

contents = st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=6, unique=True)


def _files(folder: str, names_and_contents: list[str]) -> DatasetRecord:
    return record(folder, [(f"{i:02d}-{c}.parquet", c) for i, c in enumerate(names_and_contents)])


@given(old=contents, more=st.lists(st.text("xyz", min_size=1, max_size=3), max_size=3, unique=True),
       moved=st.booleans())
def test_any_files_with_new_ones_after_them_resume_moved_or_not(old, more, moved):
    before = _files("/data", old)
    after = record("/moved" if moved else "/data", [(f.path.rsplit("/", 1)[1], f.fingerprint[4:])
                                                    for f in before.files]
                   + [(f"99-{i}-{c}.parquet", f"new-{c}") for i, c in enumerate(more)])
    assert dataset_changes(before, after) == []


@given(old=contents, data=st.data())
def test_any_change_to_the_files_a_run_has_read_is_refused(old, data):
    """One change among those that move raw positions, anywhere in the old files: refused, with a reason."""
    before = _files("/data", old)
    files = list(before.files)
    kind = data.draw(st.sampled_from(["insert", "remove", "change", "swap"] if len(files) > 1 else
                                     ["insert", "remove", "change"]))
    at = data.draw(st.integers(0, len(files) - 1))
    if kind == "insert":
        files.insert(at, local("/data", f"{at:02d}-new.parquet", "inserted"))
    elif kind == "remove":
        del files[at]
    elif kind == "change":
        files[at] = local("/data", files[at].path.rsplit("/", 1)[1], "changed")
    else:
        other = data.draw(st.integers(0, len(files) - 1).filter(lambda i: i != at))
        files[at], files[other] = files[other], files[at]
    problems = dataset_changes(before, DatasetRecord(files=files))
    assert problems, kind
    words = {"insert": "added before", "remove": "removed:", "change": "changed:", "swap": "another order"}[kind]
    assert any(words in p for p in problems), problems
