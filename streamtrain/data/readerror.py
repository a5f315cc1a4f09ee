"""Where a dataset read failed: the file and the record a ``datasets`` error belongs to, and what to do.

``datasets`` reads a file in blocks (a Parquet row group, about 10 MB of JSON Lines or text) and reads ahead, so a
bad record fails a block before the records ahead of it are yielded: the stream's position at the error (every
record before it was read) is a lower bound of the bad record, not the bad record. Its own state cannot tell more
(its counters count whole blocks, and not across a resume from a state).

So the files themselves are read again, for the builders whose records can be counted without ``datasets``:
JSON Lines (``path = "json"``: one record per non-blank line), line-by-line text (``path = "text"``: one record
per line) and Parquet (its metadata). The records are counted file by file up to the position; from there the
first bad record is searched: the first JSON line that pyarrow (the parser ``datasets`` uses) cannot read alone,
the first text line that does not decode, the first Parquet file whose metadata cannot be read. Every step is
best effort and bounded (``_SCAN_BYTES``): what cannot be known is left out of the message, never guessed.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import DatasetConfig

logger = logging.getLogger(__name__)

# Bytes read to count records and to search for the bad one: past this, the message gives the position only.
_SCAN_BYTES = 1 << 30
# Bytes searched from the position on (a block or two of datasets' 10 MB, and a margin).
_SEARCH_BYTES = 32 << 20

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes surrogateescape kept: they did not decode


@dataclass(frozen=True)
class BadRecord:
    """Where the bad record is: its raw index, its file, its record index in the file and its line (1-based)
    when the format has lines."""

    raw_index: int
    path: str
    record: int
    line: int | None


@dataclass(frozen=True)
class _Record:
    index: int  # in the file
    line: int
    payload: Any


def _json_records(path: str, encoding: str) -> Iterator[_Record]:
    utf8 = encoding.replace("_", "-").lower() in ("utf-8", "utf8")
    with open(path, "rb") as fh:
        index = 0
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue  # pyarrow skips blank lines: they are no records
            if not utf8:
                try:
                    line = line.decode(encoding).encode("utf-8")
                except UnicodeError:
                    line = b""  # a line that does not decode: bad (find_bad_record)
            yield _Record(index, number, line if line.endswith(b"\n") else line + b"\n")
            index += 1


def _text_records(path: str, encoding: str) -> Iterator[_Record]:
    # as the text builder reads: universal newlines, every line a record
    with open(path, encoding=encoding, errors="surrogateescape", newline=None) as fh:
        for index, line in enumerate(fh):
            yield _Record(index, index + 1, line)


def _json_fails(data: bytes) -> bool:
    import pyarrow as pa
    import pyarrow.json as paj

    try:
        paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(use_threads=False, block_size=len(data) + 1))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return True
    return False


def _first_bad_json(candidates: list[tuple[str, _Record, int]]) -> tuple[str, _Record, int] | None:
    """The first candidate line that pyarrow cannot read by itself: the shortest failing prefix, by bisection
    (a prefix fails once it holds the bad line), then that line alone (else the problem is not one line's: a type
    that changes between records, which datasets reads)."""
    ends = [0]
    for _, rec, _ in candidates:
        ends.append(ends[-1] + len(rec.payload))
    joined = b"".join(rec.payload for _, rec, _ in candidates)
    if not candidates or not _json_fails(joined):
        return None
    lo, hi = 0, len(candidates)  # candidates[:lo] read, candidates[:hi] fail
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _json_fails(joined[: ends[mid]]):
            hi = mid
        else:
            lo = mid
    found = candidates[hi - 1]
    return found if _json_fails(found[1].payload) else None


def find_bad_record(cfg: DatasetConfig, files: list[str], position: int) -> BadRecord | None:
    """The first record at raw ``position`` or after it that ``cfg``'s builder cannot read, in the split's
    ``files`` (stream order); None when the format is not one counted here or nothing bad is found."""
    if not files or any("://" in f for f in files):
        return None
    if cfg.path == "parquet":
        return _bad_parquet_file(files, position)
    encoding = str(cfg.load_kwargs.get("encoding") or "utf-8")
    if cfg.path == "json" and not cfg.load_kwargs.get("field"):
        records, is_text = _json_records, False
    elif cfg.path == "text" and cfg.load_kwargs.get("sample_by", "line") == "line":
        records, is_text = _text_records, True
    else:
        return None
    base, scanned, searched = 0, 0, 0
    candidates: list[tuple[str, _Record, int]] = []  # (file, record, raw index) from the position on
    for path in files:
        if cfg.path == "json" and _is_json_array(path):
            return None  # a JSON array file: records are not lines
        count = 0
        for rec in records(path, encoding):
            count += 1
            scanned += len(rec.payload)
            raw = base + rec.index
            if raw >= position:
                if is_text and _ESCAPED.search(rec.payload) or not is_text and not rec.payload.strip():
                    return BadRecord(raw, path, rec.index, rec.line)  # a line that does not decode
                if not is_text:
                    candidates.append((path, rec, raw))
                searched += len(rec.payload)
                if searched > _SEARCH_BYTES:
                    break
            if scanned > _SCAN_BYTES:
                return None
        if searched > _SEARCH_BYTES:
            break
        base += count
    found = _first_bad_json(candidates) if not is_text else None
    if found is None:
        return None
    path, rec, raw = found
    return BadRecord(raw, path, rec.index, rec.line)


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _bad_parquet_file(files: list[str], position: int) -> BadRecord | None:
    """The first file from the one holding ``position`` whose metadata cannot be read (a damaged file); a
    row group's damage shows only when it is read, so a readable file is passed over."""
    import pyarrow.parquet as pq

    base = 0
    for path in files:
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception:  # pyarrow's many error types: this file cannot be read, whatever the cause
            return BadRecord(max(base, position), path, max(0, position - base), None)
        base += rows
    return None


def _split_files(cfg: DatasetConfig) -> list[str] | None:
    from .datafiles import split_files as resolve

    try:
        return resolve(cfg)
    except Exception:  # diagnosis only: a failure here must not hide the read error
        return None


def describe_read_error(cfg: DatasetConfig, exc: BaseException, position: int) -> str:
    """The message of a read that failed with every raw record before ``position`` read."""
    cause = f"{type(exc).__name__}: {exc}"
    files = _split_files(cfg)
    try:
        bad = find_bad_record(cfg, files or [], position)
    except (OSError, LookupError, ImportError) as err:
        logger.debug("could not search the data files for the bad record: %s", err)
        bad = None
    if bad is None:
        return (f"reading dataset {cfg.path!r} failed at raw record {position} (or a record read with it, after it): "
                f"{cause}\nWhat to do: check that the data files are complete and readable; the run can resume "
                "from its last checkpoint once they are.")
    name = os.path.basename(bad.path)
    if bad.line is None:
        return (f"reading dataset {cfg.path!r} failed at raw record {bad.raw_index}: {cause}\nThe file that cannot "
                f"be read is {bad.path} (from its record {bad.record} on).\nWhat to do: check that {name} is "
                "complete and readable (copy it again); the run can resume from its last checkpoint once it is.")
    if cfg.path == "text":
        todo = (f"that line is not valid {cfg.load_kwargs.get('encoding') or 'utf-8'}: if the file is in another "
                "encoding, set dataset.load_kwargs = { encoding = \"...\" } (e.g. \"latin-1\"; a change refused "
                "on resume when the run has progress); otherwise repair that line in place")
    else:
        todo = ("repair that line in place (a lone surrogate escape such as \\ud800 is no valid text: an escape "
                "of the same length such as \\ufffd keeps the file's size)")
    return (f"reading dataset {cfg.path!r} failed at raw record {bad.raw_index}: {cause}\nThat record is line "
            f"{bad.line} of {bad.path} (the file's record {bad.record}).\nWhat to do: {todo}, keeping every other "
            "record where it is, then run the same command again: the run resumes from its last checkpoint. A "
            "repair that changes the file's size is refused on resume as a changed dataset when the run has "
            "progress: then start it over (streamtrain train --fresh --move-aside), or train the repaired data "
            "under another run_name.")
