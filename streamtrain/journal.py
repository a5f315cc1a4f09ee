"""The in-flight journal: what a killed trainer was doing, so its successor neither skips nor repeats a learn.

Why it is needed. A checkpoint holds the stream position (the first unfinished raw index) and the finished
samples above it. Between two checkpoints the trainer keeps working; when it is SIGKILLed (or OOM-killed) the
samples it was working on have taken effect *in part*, and samples finished since the checkpoint *in full*.
Against a server with idempotency keys, replaying them is harmless. Against a real KATO it is not: a second learn
of the same pattern adds frequency. So before every mutating request the trainer appends one line here.

The lines (JSON, one per line, appended with a single ``os.write`` on an ``O_APPEND`` descriptor, so a killed
process leaves either the whole line or nothing the reader accepts; no fsync: the kernel keeps the page when the
process dies, and a machine crash is what the checkpoints' fsync is for):

    {"header": 1, "run_name": ..., "config": {...}}    first line: the config, for a resume with no checkpoint yet
    {"s": 17, "k": 3, "p": "observe", "sid": "..."}    sample 17, step 3: about to send its observe-sequence
    {"s": 17, "k": 3, "p": "learn", "sid": "..."}      ... its observe-sequence succeeded; about to send the learn
    {"s": 17, "k": 3, "p": "keyed", "sid": "..."}      ... (idempotent server) about to send the one keyed request
    {"s": 17, "k": 0, "p": "batch", "sid": ""}         about to send the whole sample as one keyed learn-batch
    {"s": 17, "p": "fin", "trained": 1, "tokens": 40, "learns": [5, 1], "error": null}   sample 17 finished

The argument. A worker sends the steps of a sample in order (``hierarchy.plan_sample``), one request at a time on
sessions no other worker uses, and writes a step's line before sending the step's request. So for an unfinished
sample whose last line is step k: steps < k took effect (step k was begun only after step k-1 returned); steps > k
were never sent; step k is decided from server state by ``client.unit_took_effect``: phase ``observe`` means its
learn was never sent; phase ``learn`` means the STM held exactly the step's events when the learn was sent, so the
recorded session's STM is empty if and only if the learn took effect (KATO's learn always clears it, and nothing
else touches that session); phases ``keyed`` and ``batch`` are replayed under the same idempotency key, which the
server answers from its record when the first attempt took effect (a ``batch`` sample is always replayed as a
batch, whatever the current setting, so one sample never mixes the two). The resumed trainer never writes to the old session, so asking again after yet
another crash gives the same answer. A ``fin`` line means the whole sample took effect: it is skipped and its
counters are added back.

Compaction: after each checkpoint the journal is rewritten (atomically) keeping the header and the lines of
samples at or above the checkpoint's position that it does not list as finished.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

logger = logging.getLogger(__name__)

FILENAME = "journal.jsonl"


@dataclass
class SampleRecord:
    """What the journal says about one sample."""

    last_step: int | None = None
    last_phase: str | None = None
    last_session: str | None = None
    finished: dict[str, Any] | None = None


@dataclass
class JournalState:
    header: dict[str, Any] | None = None
    samples: dict[int, SampleRecord] = field(default_factory=dict)


def read_journal(path: Path) -> JournalState:
    """Parse a journal; a torn last line (a killed write) is ignored."""
    state = JournalState()
    if not path.exists():
        return state
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                logger.info("journal %s: ignoring a torn last line %d", path, lineno)
                break
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                logger.warning("journal %s: ignoring unreadable line %d", path, lineno)
                continue
            if "header" in entry:
                state.header = entry
                continue
            rec = state.samples.setdefault(int(entry["s"]), SampleRecord())
            if entry["p"] == "fin":
                rec.finished = entry
            else:
                rec.last_step, rec.last_phase, rec.last_session = int(entry["k"]), entry["p"], entry.get("sid")
    return state


class Journal:
    """Appends from many worker threads; compaction under the same lock."""

    def __init__(self, run_dir: Path, header: dict[str, Any]):
        self.path = Path(run_dir) / FILENAME
        self._lock = threading.Lock()
        self._header = {"header": 1, **header}
        self._fd: int | None = None
        try:
            existing = read_journal(self.path)
            if existing.header is None:
                # a new journal, or one whose header was lost: (re)write it first, keeping what is there
                self._rewrite([self._header] + self._entries_of(existing))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot open the journal {self.path}: {exc.strerror or exc}") from exc

    @staticmethod
    def _entries_of(state: JournalState) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s, rec in sorted(state.samples.items()):
            if rec.last_step is not None:
                out.append({"s": s, "k": rec.last_step, "p": rec.last_phase, "sid": rec.last_session})
            if rec.finished is not None:
                out.append(rec.finished)
        return out

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                raise CheckpointError(f"the journal {self.path} is closed")
            try:
                os.write(self._fd, line)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot append to the journal {self.path}: {exc.strerror or exc}. Free space (or fix the folder) "
                    "and run again: the run resumes from its last checkpoint and this journal"
                ) from exc

    def step(self, raw_index: int, step: int, phase: str, session_id: str) -> None:
        self._append({"s": raw_index, "k": step, "p": phase, "sid": session_id})

    def finished(self, raw_index: int, **counts: Any) -> None:
        self._append({"s": raw_index, "p": "fin", **counts})

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for e in entries:
                fh.write((json.dumps(e, separators=(",", ":")) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def compact(self, raw_offset: int, done_above: set[int]) -> None:
        """Keep only what a resume from a checkpoint at ``raw_offset`` (with ``done_above``) still needs."""
        with self._lock:
            state = read_journal(self.path)
            keep = JournalState(
                samples={s: r for s, r in state.samples.items() if s >= raw_offset and s not in done_above}
            )
            try:
                self._rewrite([self._header] + self._entries_of(keep))
                old, self._fd = self._fd, None  # never a closed number left behind, whatever interrupts this
                if old is not None:
                    os.close(old)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                # the old journal is still complete (os.replace is atomic): keep appending to it
                logger.warning("journal compaction failed (%s); the journal keeps growing until the next one", exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
