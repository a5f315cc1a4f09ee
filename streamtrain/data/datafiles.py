"""The dataset's identity: which files (and which hub revision) a run's raw positions refer to.

A checkpoint's position is a count of raw records, so it means something only for the same files in the same
order. ``describe_dataset`` resolves the config the way ``datasets`` does (``load_dataset_builder``: globs
expanded, hub files pinned to a commit) and fingerprints each local file cheaply (size and a hash of its first and
last 64 KiB); ``dataset_changes`` compares two descriptions. Allowed: new files that come after every file the
run has seen (the stream's prefix is unchanged), and a folder moved as a whole (same files, same order). Anything
else (a file added before or between the old ones, removed, reordered or changed) shifts raw positions and is
refused on resume. ``split_files`` (what a split resolves to) and ``open_failure_message`` (why a dataset cannot be
opened, and what to do) serve the stream and the diagnosis of a read error too. The description, as a checkpoint
holds it, is ``records/dataset.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from ..config import DatasetConfig
from ..errors import DatasetChanged, DatasetError
from ..records.dataset import DataFile, DatasetRecord

logger = logging.getLogger(__name__)

_EDGE = 64 * 1024
# datasets' builders of local files: a failure to open through one of them gets advice about data_files, not the hub
_BUILDERS = {"parquet", "json", "csv", "text", "arrow", "webdataset", "imagefolder", "audiofolder"}


def _fingerprint(path: str) -> tuple[int, str] | None:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            h = hashlib.sha256(str(size).encode())
            h.update(fh.read(_EDGE))
            if size > _EDGE:
                fh.seek(max(_EDGE, size - _EDGE))
                h.update(fh.read(_EDGE))
    except OSError:
        return None
    return size, h.hexdigest()[:32]


def split_files(cfg: DatasetConfig) -> list[str]:
    """The files ``cfg``'s split resolves to, as ``datasets`` resolves them (globs expanded, hub files pinned)."""
    import datasets

    kwargs: dict[str, Any] = dict(getattr(cfg, "load_kwargs", None) or {})
    revision = getattr(cfg, "revision", None)
    if revision is not None:
        kwargs["revision"] = revision
    try:
        builder = datasets.load_dataset_builder(cfg.path, cfg.name, data_files=cfg.data_files, **kwargs)
    except Exception as exc:  # the one boundary where datasets' many exception types become ours
        raise DatasetError(open_failure_message(cfg, exc)) from exc
    data_files = getattr(builder.config, "data_files", None) or {}
    files = data_files.get(cfg.split) if hasattr(data_files, "get") else None
    return [str(f) for f in files or []]


def open_failure_message(cfg: DatasetConfig, exc: Exception) -> str:
    """Why ``datasets`` could not open ``cfg``'s dataset (the stream's ``load_dataset`` or the files' builder), and
    what to do."""
    what = f"cannot open dataset path={cfg.path!r}"
    if cfg.name:
        what += f" name={cfg.name!r}"
    if cfg.data_files is not None:
        what += f" data_files={cfg.data_files!r}"
    what += f" split={cfg.split!r}"
    if cfg.revision is not None:
        what += f" revision={cfg.revision!r}"
    if cfg.load_kwargs:
        what += f" load_kwargs={cfg.load_kwargs!r}"
    what += f": {type(exc).__name__}: {exc}"
    if cfg.path in _BUILDERS:
        todo = (
            "check that data_files points at existing local files (in a run config file, relative paths are "
            "relative to the file's folder; in Python, to the working folder), that split names a split they "
            "provide, and that load_kwargs holds only arguments this builder takes"
        )
    else:
        todo = (
            "check the dataset name and config; if it is on the Hugging Face Hub, this machine must reach the hub "
            "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or have it in the local cache; for local files use a "
            "builder such as path='parquet' with data_files"
        )
    return f"{what}\nWhat to do: {todo}."


def describe_dataset(cfg: DatasetConfig) -> DatasetRecord:
    """The resolved files of ``cfg``'s split, each local one fingerprinted."""
    out = []
    for path in split_files(cfg):
        local = "://" not in path
        found = _fingerprint(path) if local else None
        out.append(DataFile(path=path, size=found[0] if found else None, fingerprint=found[1] if found else None))
    return DatasetRecord(files=out)


def dataset_changes(old: DatasetRecord, new: DatasetRecord) -> list[str]:
    """What changed in a way that moves raw positions; empty when the run can resume exactly."""
    old_ids = [f.identity for f in old.files]
    new_ids = [f.identity for f in new.files]
    if new_ids[: len(old_ids)] == old_ids:
        if len(new_ids) > len(old_ids):
            logger.info("dataset: %d new file(s) after the ones the run has seen: %s", len(new_ids) - len(old_ids),
                        [f.path for f in new.files[len(old_ids):]][:5])
        return []
    by_id_new = {f.identity: f for f in new.files}
    by_path_new = {f.path: f for f in new.files}
    by_path_old = {f.path: f for f in old.files}
    problems = []
    paired: set[str] = set()
    for i, f in enumerate(old.files):
        if f.identity in by_id_new:
            continue
        g = by_path_new.get(f.path)
        if g is None and i < len(new.files) and new.files[i].path not in by_path_old \
                and os.path.basename(new.files[i].path) == os.path.basename(f.path):
            g = new.files[i]  # the same file, its folder moved: name it where it is now
        if g is not None:
            paired.add(g.path)
            moved = f", moved from {f.path}" if g.path != f.path else ""
            sizes = (f"was {f.size} bytes, now {g.size} bytes; " if f.size is not None and g.size is not None
                     else "")  # a hub file carries no size: its path names the commit it is pinned to
            problems.append(f"changed: {g.path} ({sizes}content differs{moved})")
        else:
            problems.append(f"removed: {f.path}")
    old_id_set = set(old_ids)
    for i, f in enumerate(new.files):
        if f.identity not in old_id_set and f.path not in by_path_old and f.path not in paired and i < len(old.files):
            problems.append(f"added before files the run has already read: {f.path}")
    if not problems:
        problems.append("the files are the same but in another order: "
                        + ", ".join(f.path for f in new.files[: len(old.files)][:5]))
    return problems


def dataset_size(record: DatasetRecord) -> int | None:
    """Raw records in the split when its files say so cheaply (local Parquet metadata), else None."""
    if not record.files or not all(f.size is not None and f.path.endswith(".parquet") for f in record.files):
        return None
    import pyarrow.parquet as pq

    try:
        return sum(pq.read_metadata(f.path).num_rows for f in record.files)
    except Exception:
        return None


def check_dataset(recorded: DatasetRecord, current: DatasetRecord, run_name: str, where: str) -> None:
    """Refuse to resume when the files changed in a way that moves raw positions, naming each change."""
    problems = dataset_changes(recorded, current)
    if problems:
        raise DatasetChanged(
            f"cannot resume run '{run_name}': its dataset's files changed since {where}, so its raw positions would "
            "point at other records:\n  " + "\n  ".join(problems)
            + "\nWays out: restore the files as they were (new files may only come after all the old ones); or "
            "train the new data as a new run (another run_name); or start this run over "
            "(streamtrain train --fresh --move-aside)."
        )
