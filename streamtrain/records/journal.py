"""The in-flight journal: what a killed trainer was doing, so its successor neither skips nor repeats a learn.

Why it exists and why a resume from it is exact: docs/trainer.md ("The journal").

The lines (JSON, one per line, appended with a single ``os.write`` on an ``O_APPEND`` descriptor, so a killed
process leaves either the whole line or nothing the reader accepts; no fsync: the kernel keeps the page when the
process dies, and a machine crash is what the checkpoints' fsync is for):

    {"header": 1, "run_name": ..., "config": {...}}    first line: the config, for a resume with no checkpoint yet
    {"s": 17, "k": 3, "p": "observe", "sid": "...", "at": 1718000000}    sample 17, step 3: about to send its
                                                  observe-sequence (at: when, in seconds since the epoch)
    {"s": 17, "k": 3, "p": "learn", "sid": "..."}      ... its observe-sequence succeeded; about to send the learn
    {"s": 17, "k": 3, "p": "keyed", "sid": "..."}      ... (idempotent server) about to send the one keyed request
    {"s": 17, "k": 3, "p": "counted", "sid": "...", "t": 96}   ... (no keys) about to send the one observe-sequence
                                                  with learn_at_end, on a session whose counter is 96
    {"s": 17, "k": 0, "p": "batch", "sid": "", "e": 40}   about to send steps 0-39 as one keyed learn-batch
    {"s": 17, "k": 0, "p": "batches", "sid": "", "e": 40} ... the same through /learn-batches (several samples
                                                  per request, a key per sample; its keys live apart)
    {"s": 17, "p": "fin", "trained": 1, "tokens": 40, "learns": [5, 1], "error": null}   sample 17 finished
    {"s": 18, "p": "fin", "trained": 0, ..., "error": "...", "steps_done": 3}   sample 18 failed for its own
                                                  content after its first 3 steps took effect (retried later)

Every step line carries ``at`` (older journals' lines have none and stay readable): a resume knows how long its
steps in doubt have waited, against the server's key and session lifetimes (``indoubt.py``).

A step line after a ``fin`` line of the same sample starts a new attempt (the retry of a failed sample): the
``fin`` no longer holds. A torn last line (a killed write) is ignored and cut off before the next append; any other
bad line raises :class:`JournalDamaged` naming the file and the line; a write that fails halfway (a full disk) is
cut back to the last whole line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..disk import disk_error, is_storage_error
from ..errors import CheckpointError, JournalDamaged
from ..jsonbytes import compact_json

logger = logging.getLogger(__name__)

FILENAME = "journal.jsonl"
_REMEDY = ("What to do: free space on that disk or make it writable, then run the same command again: the run "
           "resumes exactly from its last checkpoint and this journal.")


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeaderLine(_Line):
    header: Literal[1]
    run_name: str
    config: dict[str, Any]
    dataset: dict[str, Any] | None = None  # datafiles.DatasetRecord: checked on a resume before any checkpoint


class StepLine(_Line):
    s: int = Field(ge=0)
    k: int = Field(ge=0)
    p: Literal["observe", "learn", "keyed", "batch", "batches", "counted"]
    sid: str | None = None
    t: int | None = Field(None, ge=0, description="counted: the session's observation counter before the request.")
    e: int | None = Field(None, ge=1, description="batch: the end of the range of steps the request carries.")
    at: int | None = Field(None, ge=0, description="When the line was written (seconds since the epoch).")


class FinLine(_Line):
    s: int = Field(ge=0)
    p: Literal["fin"]
    trained: Literal[0, 1]
    tokens: int = Field(ge=0)
    learns: list[int]
    error: str | None = None
    steps_done: int = Field(0, ge=0, description="Steps known to have taken effect before a failure.")


@dataclass
class SampleRecord:
    """What the journal says about one sample."""

    last_step: int | None = None
    last_phase: str | None = None
    last_session: str | None = None
    last_end: int | None = None
    last_counter: int | None = None
    last_at: int | None = None  # when the last step line was written (seconds since the epoch), if it says
    finished: dict[str, Any] | None = None


@dataclass
class JournalState:
    """What a journal says: its header, and per sample its last step line and its ``fin`` line after it."""

    header: dict[str, Any] | None = None
    samples: dict[int, SampleRecord] = field(default_factory=dict)

    def add(self, line: HeaderLine | StepLine | FinLine) -> None:
        """Take the next line of the journal."""
        if isinstance(line, HeaderLine):
            self.header = line.model_dump()
            return
        rec = self.samples.setdefault(line.s, SampleRecord())
        if isinstance(line, FinLine):
            rec.finished = line.model_dump()
        else:  # a step after a fin line: a new attempt (a retried failure), the fin no longer holds
            rec.last_step, rec.last_phase, rec.last_session, rec.last_end = line.k, line.p, line.sid, line.e
            rec.last_counter, rec.last_at = line.t, line.at
            rec.finished = None


def _line(entry: dict[str, Any]) -> bytes:
    """A journal line: compact ASCII JSON (two lines a sample)."""
    return compact_json(entry, ascii=True) + b"\n"


def _damaged(path: Path, lineno: int, what: str) -> JournalDamaged:
    return JournalDamaged(
        f"the journal {path} is damaged at line {lineno}: {what}. It records what the last trainer did since its "
        "last checkpoint, so it was not written by streamtrain this way (edited, or the disk is failing). Ways out: "
        "restore the file from a backup; or move it aside and train again, which resumes from the last checkpoint "
        "alone: exact on a server with idempotency keys (the embedded server), but on a server without them "
        "(a real KATO) the samples finished since that checkpoint are learned a second time."
    )


def _parse(path: Path, lineno: int, raw: bytes) -> HeaderLine | StepLine | FinLine:
    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _damaged(path, lineno, "not JSON") from None
    if not isinstance(entry, dict):
        raise _damaged(path, lineno, f"a JSON {type(entry).__name__}, not an object")
    model: type[HeaderLine] | type[StepLine] | type[FinLine]
    model = HeaderLine if "header" in entry else FinLine if entry.get("p") == "fin" else StepLine
    try:
        return model.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<line>'}: {e['msg']}" for e in exc.errors()[:3])
        raise _damaged(path, lineno, f"not a valid {model.__name__} ({problems})") from None


def read_journal(path: Path) -> JournalState:
    """Parse a journal; a torn last line (a killed write) is ignored, any other damage raises JournalDamaged."""
    state = JournalState()
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return state
    except OSError as exc:
        raise CheckpointError(f"cannot read the journal {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                logger.info("journal %s: ignoring a torn last line %d", path, lineno)
                break
            state.add(_parse(path, lineno, raw))
    return state


def _whole_lines_size(path: Path) -> int | None:
    """The size of the file up to its last newline, if a torn line follows it; else None."""
    with open(path, "rb") as fh:
        data = fh.read()
    if not data or data.endswith(b"\n"):
        return None
    return data.rfind(b"\n") + 1


class Journal:
    """Appends from many worker threads; compaction under the same lock."""

    def __init__(self, run_dir: Path, header: dict[str, Any]):
        self.path = Path(run_dir) / FILENAME
        self._lock = threading.Lock()
        self._header = {"header": 1, **header}
        self._fd: int | None = None
        self._size = 0  # bytes of whole lines in the file: where a failed append is cut back to
        try:
            existing = read_journal(self.path)
            if existing.header is None:
                # a new journal, or one whose header was lost: (re)write it first, keeping what is there
                self._rewrite([self._header] + self._entries_of(existing))
            else:
                cut = _whole_lines_size(self.path)
                if cut is not None:  # a torn last line: the next append must start on a line of its own
                    os.truncate(self.path, cut)
            self._open()
        except OSError as exc:
            if is_storage_error(exc):
                raise disk_error(exc, self.path, "open the journal") from exc
            raise CheckpointError(f"cannot open the journal {self.path}: {exc.strerror or exc}") from exc

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    @staticmethod
    def _entries_of(state: JournalState) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s, rec in sorted(state.samples.items()):
            if rec.last_step is not None:
                line = {"s": s, "k": rec.last_step, "p": rec.last_phase, "sid": rec.last_session}
                if rec.last_end is not None:
                    line["e"] = rec.last_end
                if rec.last_counter is not None:
                    line["t"] = rec.last_counter
                if rec.last_at is not None:
                    line["at"] = rec.last_at
                out.append(line)
            if rec.finished is not None:
                out.append(rec.finished)
        return out

    def _append(self, *entries: dict[str, Any]) -> None:
        """Whole lines, in one write (a crash tears at most the last line, which a reader cuts)."""
        line = b"".join([_line(entry) for entry in entries])
        with self._lock:
            if self._fd is None:
                raise CheckpointError(f"the journal {self.path} is closed")
            size = self._size  # this process is the journal's only writer (the run's lock): no fstat per line
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
                self._size = size + len(line)
            except OSError as exc:
                try:  # a half-written line must not stay: the next append would be glued to it
                    os.ftruncate(self._fd, size)
                except OSError:
                    logger.warning("journal %s: could not cut a half-written line", self.path)
                if is_storage_error(exc):
                    raise disk_error(exc, self.path, "append to the journal", _REMEDY) from exc
                raise CheckpointError(f"cannot append to the journal {self.path}: {exc.strerror or exc}. {_REMEDY}") from exc

    def step(self, raw_index: int, step: int, phase: str, session_id: str, end: int | None = None,
             counter: int | None = None) -> None:
        entry: dict[str, Any] = {"s": raw_index, "k": step, "p": phase, "sid": session_id}
        if end is not None:
            entry["e"] = end
        if counter is not None:
            entry["t"] = counter
        entry["at"] = int(time.time())
        self._append(entry)

    def finished(self, raw_index: int, **counts: Any) -> None:
        self._append({"s": raw_index, "p": "fin", **counts})

    def batches_sent(self, samples: list[tuple[int, int]]) -> None:
        """(raw index, step count) of each whole sample about to go in one learn-batches request: each sample's
        ``step(raw_index, 0, "batches", "", end=count)`` line, all in one write."""
        at = int(time.time())
        self._append(*({"s": s, "k": 0, "p": "batches", "sid": "", "e": n, "at": at} for s, n in samples))

    def finished_many(self, samples: list[tuple[int, dict[str, Any]]]) -> None:
        """(raw index, counts) of several finished samples: each one's ``finished`` line, all in one write."""
        self._append(*({"s": s, "p": "fin", **counts} for s, counts in samples))

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for e in entries:
                fh.write(_line(e))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def compact(self, keep_from: int, keep_also: set[int] | frozenset[int] = frozenset(),
                upto: int | None = None) -> int:
        """Keep the lines of samples at or above ``keep_from`` (the position of the oldest checkpoint kept) and
        of the samples in ``keep_also`` (failed samples still open): all that a resume from a kept checkpoint
        can need. Streams: one pass notes where each kept sample's last step line and fin line are, a second
        copies those lines, so memory does not grow with the journal (a run checkpoints for days).

        Only the lines before byte ``upto`` (the journal's ``size`` when the checkpoint's state was taken) are
        compacted; those the workers appended since follow unchanged, so the file reads as before. Returns the size
        of the compacted part: the journal as the checkpoint describes it, where ``cut_back`` takes it back to if
        the knowledge base turns out to have changed after this checkpoint."""
        with self._lock:
            end = self._size if upto is None else min(upto, self._size)
            return self._compact(keep_from, keep_also, end)

    def _compact(self, keep_from: int, keep_also: set[int] | frozenset[int], end: int) -> int:
        """compact() under the lock: the size of the compacted part (``end`` when the file was left as it was)."""
        try:
            where = self._kept_lines(keep_from, keep_also, end)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("journal compaction skipped (%s): the journal keeps growing until the next one", exc)
            return end
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(self.path, "rb") as src, open(tmp, "wb") as out:
                out.write(_line(self._header))
                for s in sorted(where):
                    for offset in where[s]:
                        if offset is not None:
                            src.seek(offset)
                            out.write(src.readline())
                compacted = out.tell()
                src.seek(end)
                shutil.copyfileobj(src, out)  # the lines appended since the checkpoint's state was taken
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            old, self._fd = self._fd, None  # never a closed number left behind, whatever interrupts this
            if old is not None:
                os.close(old)
            self._open()
            return compacted
        except OSError as exc:
            # the old journal is still complete (os.replace is atomic): keep appending to it
            with contextlib.suppress(OSError):  # a full disk: the partial copy must not hold on to the space
                tmp.unlink(missing_ok=True)
            logger.warning("journal compaction failed (%s); the journal keeps growing until the next one", exc)
            if self._fd is None:
                self._open()
            return end

    def _kept_lines(self, keep_from: int, keep_also: set[int] | frozenset[int],
                    end: int) -> dict[int, list[int | None]]:
        """sample -> [offset of its last step line, offset of its fin line] for the samples compaction keeps, from
        the lines before byte ``end``."""
        where: dict[int, list[int | None]] = {}
        offset = 0
        with open(self.path, "rb") as fh:
            for raw in fh:
                here, offset = offset, offset + len(raw)
                if offset > end or not raw.endswith(b"\n"):
                    break
                entry = json.loads(raw)
                if "header" in entry:
                    continue
                s = int(entry["s"])
                if s < keep_from and s not in keep_also:
                    continue
                slot = where.setdefault(s, [None, None])
                if entry["p"] == "fin":
                    slot[1] = here
                else:  # a new attempt: an earlier fin no longer holds (as read_journal decides)
                    slot[0], slot[1] = here, None
        return where

    @property
    def size(self) -> int:
        """Bytes of whole lines in the file now: after a checkpoint's compaction, where a rollback cuts back to."""
        with self._lock:
            return self._size

    def cut_back(self, size: int) -> None:
        """Cut the journal back to ``size`` bytes (its ``size`` right after the last good checkpoint) and close it:
        the lines of the samples finished since then no longer count, and no thread can append another. Durable
        (fsync) before it returns, so a checkpoint written after it never meets the old lines after a crash.
        Raises CheckpointError when the file cannot be cut."""
        with self._lock:
            fd, self._fd = self._fd, None  # closed first: whatever happens next, no worker appends again
            try:
                if fd is None:
                    fd = os.open(self.path, os.O_WRONLY)
                if size > os.fstat(fd).st_size:
                    raise OSError(f"it holds fewer than the {size} bytes it had after the last good checkpoint")
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError as exc:
                raise CheckpointError(f"cannot cut the journal {self.path} back to {size} bytes: "
                                      f"{exc.strerror or exc}") from exc
            finally:
                if fd is not None:
                    os.close(fd)
            self._size = size

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
