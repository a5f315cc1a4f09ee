"""Where a dataset read failed: the file and the record a ``datasets`` error belongs to, and what to do.

``datasets`` reads a file in blocks (a Parquet row group, about 10 MB of JSON Lines or text) and a bad record
fails its whole block before any record of it is yielded, so the stream's position at the error is the raw
index of the block's first record, not of the bad one. The dataset's state names the file and the block's first
record in it: the innermost examples iterable holds ``shard_idx`` (one shard per data file for the file
builders) and ``shard_example_idx``. For JSON Lines (``path = "json"``) and line-by-line text files
(``path = "text"``) the bad record itself is then found by reading that block's lines again: the first JSON line
pyarrow (the parser ``datasets`` uses) cannot read alone, or the first text line that does not decode.

Every step is best effort: what cannot be known (a hub file, another builder, a state of another shape) is left
out of the message, never guessed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

from .config import DatasetConfig

logger = logging.getLogger(__name__)

# A block is about datasets' chunk size (10 MB) plus a line; lines past this many bytes from the block's start
# are not searched.
_SEARCH_BYTES = 64 << 20


def shard_position(state: Any) -> tuple[int, int] | None:
    """(shard index, record index in the shard) of the innermost examples iterable of a datasets state."""
    while isinstance(state, Mapping):
        if isinstance(state.get("shard_idx"), int) and isinstance(state.get("shard_example_idx"), int):
            return state["shard_idx"], state["shard_example_idx"]
        state = state.get("examples_iterable", state.get("ex_iterable"))
    return None


def _files(cfg: DatasetConfig, num_shards: int | None) -> list[str] | None:
    """The split's files in stream order, when each is one shard of the stream."""
    from .datafiles import _split_files

    try:
        files = _split_files(cfg)
    except Exception:  # diagnosis only: a failure here must not hide the read error
        return None
    return files if files and num_shards == len(files) else None


def bad_json_line(path: str, first: int, encoding: str = "utf-8") -> tuple[int, int] | None:
    """(record index in the file, line number) of the first JSON line from record ``first`` on that pyarrow cannot
    read by itself (a lone surrogate escape, bytes that are not UTF-8, a line that is not JSON); None if every line
    of the block reads."""
    import pyarrow as pa
    import pyarrow.json as paj

    def fails(line: bytes) -> bool:
        try:
            paj.read_json(io.BytesIO(line), read_options=paj.ReadOptions(use_threads=False))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return True
        return False

    lines: list[tuple[int, int, bytes]] = []
    with open(path, "rb") as fh:
        record, size = -1, 0
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue  # pyarrow skips blank lines: they are no records
            record += 1
            if record < first:
                continue
            if encoding.replace("_", "-").lower() not in ("utf-8", "utf8"):
                try:
                    line = line.decode(encoding).encode("utf-8")
                except UnicodeError:
                    return record, number
            lines.append((record, number, line if line.endswith(b"\n") else line + b"\n"))
            size += len(line)
            if size > _SEARCH_BYTES:
                break
    if not lines:
        return None
    # the shortest failing prefix, by bisection (a prefix fails once it holds the bad line); then that line alone
    # must fail too, or the problem is not one line's (a type that changes between records)
    joined = b"".join(line for _, _, line in lines)
    ends = [0]
    for _, _, line in lines:
        ends.append(ends[-1] + len(line))
    if not fails(joined):
        return None
    lo, hi = 0, len(lines)  # lines[:lo] reads, lines[:hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(joined[: ends[mid]]):
            hi = mid
        else:
            lo = mid
    record, number, line = lines[hi - 1]
    return (record, number) if fails(line) else None


def bad_text_line(path: str, first: int, encoding: str = "utf-8") -> tuple[int, int] | None:
    """(record index, line number) of the first line from record ``first`` on that does not decode in
    ``encoding``, reading as the text builder does (universal newlines: every line is a record)."""
    size = 0
    with open(path, encoding=encoding, errors="surrogateescape", newline=None) as fh:
        for index, line in enumerate(fh):
            if index < first:
                continue
            if any("\udc80" <= ch <= "\udcff" for ch in line):
                return index, index + 1
            size += len(line)
            if size > _SEARCH_BYTES:
                break
    return None


def _locate(cfg: DatasetConfig, path: str, first: int) -> tuple[int, int] | None:
    if "://" in path:
        return None
    encoding = str(cfg.load_kwargs.get("encoding") or "utf-8")
    try:
        if cfg.path == "json" and not cfg.load_kwargs.get("field"):
            return bad_json_line(path, first, encoding)
        if cfg.path == "text" and cfg.load_kwargs.get("sample_by", "line") == "line":
            return bad_text_line(path, first, encoding)
    except (OSError, LookupError, ImportError) as exc:
        logger.debug("could not search %s for the bad record: %s", path, exc)
    return None


def describe_read_error(cfg: DatasetConfig, exc: BaseException, position: int, dataset: Any,
                        resumed: tuple[int, int, int] | None) -> str:
    """The message of a read that failed at raw ``position`` (the failing block's first record).

    ``dataset``: the IterableDataset read (its state and shard count); ``resumed``: (raw offset, shard, record in
    the shard) where a stream resumed from a datasets state began, since in that shard the state's record count
    can run ahead of the records really read.
    """
    cause = f"{type(exc).__name__}: {exc}"
    try:
        where = shard_position(dataset.state_dict())
    except Exception:
        where = None
    files = _files(cfg, getattr(dataset, "num_shards", None)) if where is not None else None
    if where is None or files is None or where[0] >= len(files):
        return (f"reading dataset {cfg.path!r} failed at raw record {position} (or a record after it, read with "
                f"it): {cause}\nWhat to do: check that the data files are complete and readable; the run can "
                "resume from its last checkpoint once they are.")
    shard, first = where
    if resumed is not None and resumed[1] == shard:
        first = position - resumed[0] + resumed[2]  # raw offset -> record of the shard, from where it resumed
    path = files[shard]
    found = _locate(cfg, path, first)
    if found is None:
        return (f"reading dataset {cfg.path!r} failed at raw record {position} or a record after it, read "
                f"with it (from record {first} of file {path}): {cause}\nWhat to do: check that {path} is complete and "
                "readable; the run can resume from its last checkpoint once it is.")
    record, line = found
    raw = position + record - first
    if cfg.path == "text":
        todo = (f"that line is not valid {cfg.load_kwargs.get('encoding') or 'utf-8'}: if the file is in another "
                "encoding, set dataset.load_kwargs = { encoding = \"...\" } (e.g. \"latin-1\"; a change refused "
                "on resume when the run has progress); otherwise repair that line in place")
    else:
        todo = ("repair that line in place (a lone surrogate escape such as \\ud800 is no valid text: an escape "
                "of the same length such as \\ufffd keeps the file's size)")
    return (f"reading dataset {cfg.path!r} failed at raw record {raw}: {cause}\nThat record is line {line} of "
            f"{path} (the file's record {record}).\nWhat to do: {todo}, keeping every other record where it is, "
            "then run the same command again: the run resumes from its last checkpoint. A repair that changes "
            "the file's size is refused on resume as a changed dataset when the run has progress: then start it "
            "over (streamtrain train --fresh --move-aside), or train the repaired data under another run_name.")
