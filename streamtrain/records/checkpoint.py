"""Checkpoints: one versioned JSON record of everything needed to continue a run, written atomically.

Layout of a run folder (``config.run_dir``)::

    ckpt-00000001.json ...   one file per checkpoint, the newest ``keep`` kept
    .ckpt-00000002.json.<pid>.tmp   a write in progress (never read; a killed writer's is removed by the first
                                    save of the next store that writes the folder)
    .lock                    held (flock) by the one process that trains the run

A checkpoint file appears under its final name only through ``os.replace`` of a fully written and fsynced
temp file, so a crash at any moment leaves either the previous set of files or the previous set plus one
complete new file. The folder is fsynced after the rename so the new name itself survives a power cut.

A store lists the folder once, at its first save (removing the temp files of a killed writer then), and from
there on remembers the files it wrote and pruned: the run's writer lock means nothing else writes the folder, so
a save costs the write, two fsyncs, the rename and the unlink of the oldest file, and no listing. Reading
(``paths``, ``entries``, ``latest``) always lists the folder.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import RunConfig
from ..disk import RUN_REMEDY, disk_error, is_storage_error
from ..errors import CheckpointError
from ..version import __version__
from .dataset import DatasetRecord
from .knowledge_base import KnowledgeBaseRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2 added knowledge_base, dataset and FailedSample.steps_done; 1 is still read
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")
_TEMP = re.compile(r"^\.ckpt-\d{8}\.json\.\d+\.tmp$")


class _Record(BaseModel):
    # Checkpoints are a file format: an unknown key means another writer, never something to drop silently.
    model_config = ConfigDict(extra="forbid")


class FailedSample(_Record):
    """A sample rejected for its own content (the server's faults never fail a sample: they stop the run). The
    run goes on without it; the next call of the run retries it, from the first step that did not take effect."""

    raw_index: int = Field(ge=0)
    error: str
    steps_done: int = Field(0, ge=0, description="Steps of the sample that took effect before it failed.")


class StreamPosition(_Record):
    """Where to continue reading the raw stream (filtered records included)."""

    raw_offset: int = Field(ge=0, description="Number of raw records before the first unfinished one.")
    done_above: list[int] = Field(
        default_factory=list,
        description="Raw indices >= raw_offset already finished (parallel out-of-order completions), sorted.",
    )
    state_dict: dict[str, Any] | None = Field(
        None, description="DatasetStream.state_for(raw_offset): exact state of the dataset at raw_offset, else None."
    )


class FilterReasons(_Record):
    """Why records were filtered, one count per reason (``data/stream.py`` decides the reason). Added to schema 2
    later: a checkpoint without them reads as all zero, and its earlier filtered records stay unitemized."""

    missing: int = Field(0, ge=0, description="The text field is absent from the record, or null.")
    wrong_type: int = Field(0, ge=0, description="The text field holds no text: a dict, a list, a number...")
    too_short: int = Field(0, ge=0, description="The text, stripped, is shorter than dataset.min_chars.")
    undecodable: int = Field(0, ge=0, description="The text field holds bytes that dataset.binary_encoding "
                                                  "cannot decode.")

    @property
    def total(self) -> int:
        return self.missing + self.wrong_type + self.too_short + self.undecodable

    def describe(self, filtered: int) -> str:
        """The nonzero reasons of ``filtered`` records, e.g. "598 wrong type, 2 missing the field"; those counted
        before reasons were (an older checkpoint) as "not itemized"."""
        parts = [f"{n} {label}" for n, label in ((self.missing, "missing the field"),
                                                 (self.wrong_type, "wrong type"), (self.too_short, "too short"),
                                                 (self.undecodable, "undecodable")) if n]
        if filtered > self.total:
            parts.append(f"{filtered - self.total} not itemized (filtered before reasons were counted)")
        return ", ".join(parts)


class Counters(_Record):
    samples_trained: int = 0
    samples_filtered: int = 0
    filter_reasons: FilterReasons = Field(
        default_factory=FilterReasons,
        description="samples_filtered by reason: the records below the position, each counted once.")
    samples_failed: int = 0
    tokens: int = 0
    patterns_learned: list[int] = Field(default_factory=list, description="Learns per level.")


class ServerInfo(_Record):
    url: str | None
    embedded: bool
    idempotency: bool


class Checkpoint(_Record):
    schema_version: Literal[1, 2] = 2  # SCHEMA_VERSION
    library_version: str = __version__
    sequence: int = Field(ge=1, description="1, 2, 3... per run; the file name is ckpt-{sequence:08d}.json.")
    run_name: str
    config: RunConfig
    position: StreamPosition
    counters: Counters
    failures: list[FailedSample] = Field(default_factory=list)
    reason: Literal["interval", "error", "interrupt", "end"]
    error: str | None = Field(None, description="The message when reason == 'error'.")
    started_at: datetime = Field(description="When the run first started.")
    created_at: datetime = Field(description="When this checkpoint was written.")
    elapsed_seconds: float = Field(ge=0, description="Training time summed over all sessions of the run.")
    server: ServerInfo | None = None
    knowledge_base: KnowledgeBaseRecord | None = Field(
        None, description="What the server's knowledge base held at least; checked on resume (kbcheck.py).")
    dataset: DatasetRecord | None = Field(
        None, description="The dataset's resolved files; a change that moves raw positions is refused on resume.")

    @property
    def file_name(self) -> str:
        return checkpoint_file_name(self.sequence)

    @property
    def has_progress(self) -> bool:
        """Whether the run got past its start (anything trained, failed or finished above the position)."""
        c, p = self.counters, self.position
        return bool(p.raw_offset or p.done_above or c.samples_trained or c.samples_failed or self.failures)


def checkpoint_file_name(sequence: int) -> str:
    return f"ckpt-{sequence:08d}.json"


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint file as found on disk, valid or not (for ``inspect`` and the notebooks)."""

    path: Path
    sequence: int
    valid: bool
    error: str | None
    checkpoint: Checkpoint | None

    @property
    def reason(self) -> str | None:
        return self.checkpoint.reason if self.checkpoint else None

    @property
    def position(self) -> StreamPosition | None:
        return self.checkpoint.position if self.checkpoint else None

    @property
    def created_at(self) -> datetime | None:
        return self.checkpoint.created_at if self.checkpoint else None


class _Unreadable(CheckpointError):
    """Internal: the file is damaged (a fallback to an older checkpoint is safe)."""


class _Incompatible(CheckpointError):
    """Internal: the file is whole but of another format or version (falling back would silently lose work)."""


def _read(path: Path) -> Checkpoint:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Unreadable(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Unreadable(f"checkpoint {path} is not valid JSON (torn or damaged file): {exc}") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"checkpoint {path} holds a JSON {type(data).__name__}, not a checkpoint object")
    version = data.get("schema_version")
    if version is None:
        looks_old = {"config", "position", "offset", "run_name", "step"} & data.keys()
        if looks_old:
            raise _Incompatible(
                f"checkpoint {path} is an old-format streamtrain checkpoint (it has no schema_version). Resume it "
                f"with the streamtrain version that wrote it, or move {path.parent} aside (or train with --fresh) "
                "to start the run over."
            )
        raise _Incompatible(
            f"{path} is not a streamtrain checkpoint (a JSON file without schema_version, named like one). Move "
            "that one file out of the run folder (or rename it) and train again; the run's own checkpoints are "
            "untouched."
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _Incompatible(
            f"checkpoint {path} has an unknown schema_version {version!r} (this streamtrain {__version__} reads "
            f"schema {SCHEMA_VERSION}). Move {path.parent} aside (or train with --fresh) to start the run over."
        )
    if version > SCHEMA_VERSION:
        raise _Incompatible(
            f"checkpoint {path} has schema_version {version}, written by a newer streamtrain "
            f"({data.get('library_version', 'unknown version')}); this streamtrain {__version__} reads schema "
            f"{SCHEMA_VERSION}. Upgrade streamtrain to resume this run."
        )
    try:
        return Checkpoint.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:10]
        )
        raise _Unreadable(f"checkpoint {path} is not a valid schema {version} checkpoint: {problems}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_os_error(exc: OSError, access: str = "writable") -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the folder is not {access} (fix its permissions, or point checkpoint_dir elsewhere)"
    return exc.strerror or str(exc)


def _write_error(exc: OSError, path: Path | str, action: str, remedy: str = RUN_REMEDY) -> CheckpointError:
    """A DiskError naming the disk when the disk is the cause (full, read-only, a limit), else a CheckpointError."""
    if is_storage_error(exc):
        return disk_error(exc, path, action, remedy)
    return CheckpointError(f"cannot {action} {path}: {exc.strerror or exc}. {remedy}")


class CheckpointStore:
    """The checkpoint files of one run folder: atomic durable saves, newest-valid lookup, pruning, a writer lock."""

    def __init__(self, run_dir: Path | str, keep: int = 3, *, fsync: bool = True) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.run_dir = Path(run_dir)
        self.keep = keep
        # fsync=False exists only for the benchmark's baseline; a run always fsyncs.
        self._fsync = fsync
        # Sequences of the checkpoint files in the folder, oldest first: listed at the first save, then kept up to
        # date by save and prune. None until then, and again after a failed save (the next one lists afresh).
        self._known: list[int] | None = None

    # -- reading ---------------------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.run_dir} is a file, not a folder; move it aside or set checkpoint_dir "
                "to another place"
            )

    def paths(self) -> list[tuple[int, Path]]:
        """(sequence, path) of every checkpoint file, oldest first; temp files are never listed."""
        self._check_folder()
        if not self.run_dir.is_dir():
            return []
        try:
            names = [p.name for p in self.run_dir.iterdir()]
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint folder {self.run_dir}: {_describe_os_error(exc, 'readable')}") from None
        return sorted((int(m.group(1)), self.run_dir / n) for n in names if (m := _NAME.match(n)))

    def next_sequence(self) -> int:
        """The sequence number the next save should use (1 for an empty folder). After this store's first save it
        comes from what the store remembers, without listing the folder."""
        if self._known is not None:
            return self._known[-1] + 1 if self._known else 1
        paths = self.paths()
        return paths[-1][0] + 1 if paths else 1

    @staticmethod
    def load(path: Path | str) -> Checkpoint:
        """Read one checkpoint file; any problem is a CheckpointError naming the file and what to do."""
        return _read(Path(path))

    def latest_with_path(self) -> tuple[Checkpoint, Path] | None:
        """The newest valid checkpoint and its file; None when the folder holds no checkpoint file.

        A damaged newest file is skipped with a warning naming it; a file of another format or schema version
        stops the lookup (falling back past it would silently repeat finished work).
        """
        paths = self.paths()
        if not paths:
            return None
        problems = []
        for _, path in reversed(paths):
            try:
                ckpt = _read(path)
            except _Unreadable as exc:
                problems.append(str(exc))
                logger.warning("%s; falling back to the previous checkpoint", exc)
                continue
            if problems:
                logger.warning("resuming from %s instead of the newer damaged checkpoint(s)", path)
            return ckpt, path
        raise CheckpointError(
            f"every checkpoint in {self.run_dir} is damaged, so the run cannot be resumed:\n  "
            + "\n  ".join(problems)
            + f"\nMove {self.run_dir} aside (or train with --fresh) to start the run over."
        )

    def latest(self) -> Checkpoint | None:
        found = self.latest_with_path()
        return found[0] if found else None

    def entries(self) -> list[CheckpointEntry]:
        """Every checkpoint file, oldest first, with its validity (never raises for a bad file)."""
        out = []
        for seq, path in self.paths():
            try:
                ckpt = _read(path)
                out.append(CheckpointEntry(path, seq, True, None, ckpt))
            except CheckpointError as exc:
                out.append(CheckpointEntry(path, seq, False, str(exc), None))
        return out

    # -- writing ---------------------------------------------------------------------------------------------

    def _ensure_folder(self) -> None:
        self._check_folder()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CheckpointError(
                f"cannot create checkpoint folder {self.run_dir}: a file is in the way; move it aside or set "
                "checkpoint_dir to another place"
            ) from None
        except OSError as exc:
            raise _write_error(exc, self.run_dir, "create checkpoint folder") from None

    def _open_for_writing(self) -> list[int]:
        """Create the folder if needed, list its checkpoint files and remove the temp files of a killed writer
        (whoever writes the folder holds the run's lock, so none of them is being written now)."""
        self._ensure_folder()
        known = [seq for seq, _ in self.paths()]
        for name in os.listdir(self.run_dir):
            if _TEMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.run_dir / name)
                    logger.info("removed %s, left by a writer that was stopped mid-save", self.run_dir / name)
        return known

    def save(self, ckpt: Checkpoint) -> Path:
        """Write ckpt durably as ckpt-{sequence:08d}.json, then prune to the newest ``keep`` files.

        On any failure (disk full, no permission) the temp file is removed, the earlier checkpoints are
        untouched, and a CheckpointError says what happened.
        """
        known = self._known if self._known is not None else self._open_for_writing()
        self._known = None  # until this save and its pruning are done: a failure makes the next save list afresh
        name = ckpt.file_name
        final = os.path.join(self.run_dir, name)
        tmp = os.path.join(self.run_dir, f".{name}.{os.getpid()}.tmp")
        data = ckpt.model_dump_json(indent=1).encode("utf-8")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self._fsync:
                _fsync_dir(self.run_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _write_error(exc, final, "write checkpoint", "The previous checkpoints are untouched. " + RUN_REMEDY) from None
        i = bisect.bisect_left(known, ckpt.sequence)
        if i == len(known) or known[i] != ckpt.sequence:
            known.insert(i, ckpt.sequence)
        self._prune(known)
        self._known = known
        return Path(final)

    def _prune(self, known: list[int]) -> None:
        """Remove the oldest files beyond ``keep``, by name. No fsync: an unlink lost to a crash leaves one more
        old file, which the next save's prune removes (a first save lists the folder)."""
        while len(known) > self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.run_dir, checkpoint_file_name(known[0])))
            del known[0]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's writer lock (non-blocking): a second process training the same run is refused."""
        self._ensure_folder()
        lock_path = self.run_dir / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(exc, lock_path, "open the lock file") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                if holder == str(os.getpid()):
                    raise CheckpointError(
                        f"this process is still training run {self.run_dir.name}: a call in another thread, or the "
                        "workers of a call stopped with a second Ctrl-C, which finish their last request first (at "
                        "most one client.read_timeout); try again in a moment"
                    ) from None
                raise CheckpointError(
                    f"another streamtrain process is training run {self.run_dir.name} (pid {holder}); wait for it "
                    f"to finish or stop it (lock: {lock_path})"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:
                raise _write_error(exc, lock_path, "write the lock file") from None
            yield
        finally:
            # Closing the descriptor releases the flock.
            os.close(fd)
