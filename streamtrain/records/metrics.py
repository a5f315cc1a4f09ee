"""The run's history across every call: ``metrics.jsonl`` in the run folder, one JSON row per interval and per event.

Rows are appended, never rewritten, so a crash or Ctrl-C loses at most the row being written (a torn last line is
skipped when read). Events: ``start`` (a new run), ``resume`` (a later call), ``checkpoint``, ``error``, ``end``,
``interrupt``; plain rows are ``progress``. The file stays bounded for runs of any length: routine rows
(``progress`` and interval ``checkpoint`` rows) come at most every ``max(interval, elapsed / ROWS_PER_RUN)`` seconds
of the call, so their number grows with the logarithm of the run's length, not with it nor with how often
checkpoints are written; the rows of a call's events (start, resume, interrupt, error, end) are always written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..clock import SYSTEM, Clock
from ..disk import is_storage_error, storage_message

logger = logging.getLogger(__name__)

FILENAME = "metrics.jsonl"
ROWS_PER_RUN = 2000

Event = Literal["start", "resume", "progress", "checkpoint", "interrupt", "error", "end"]
ROUTINE: frozenset[Event] = frozenset({"progress", "checkpoint"})  # thinned: written only when a row is due


class MetricsRow(BaseModel):
    """One row of ``metrics.jsonl``."""

    model_config = ConfigDict(extra="ignore")  # rows of a newer streamtrain stay readable

    time: datetime
    event: Event
    call: int = Field(ge=1, description="1 for the run's first call of train(), then one more per resume.")
    elapsed_seconds: float = Field(description="Training time of the whole run so far (all calls).")
    position: int = Field(description="Raw stream position (first unfinished record).")
    samples_trained: int
    samples_filtered: int
    samples_failed: int
    tokens: int
    patterns_learned: list[int] = Field(description="Learns per level, whole run.")
    samples_per_second: float = Field(description="Since the previous row of this call.")
    tokens_per_second: float
    detail: str | None = None


def read_metrics(run_dir: Path | str) -> list[MetricsRow]:
    """Every row of a run's ``metrics.jsonl`` (none when it has none); unreadable lines are skipped with a warning."""
    path = Path(run_dir) / FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            rows.append(MetricsRow.model_validate(json.loads(line)))
        except (ValueError, ValidationError):
            if lineno < len(lines):  # not a torn last line (a write cut by a crash): say so
                logger.warning("%s: skipping unreadable line %d", path, lineno)
    return rows


class MetricsLog:
    """Appends rows for one call of train(). Writing metrics must never stop a run: failures are logged once."""

    def __init__(self, run_dir: Path | str, interval: float = 10.0, clock: Clock = SYSTEM) -> None:
        self.path = Path(run_dir) / FILENAME
        self.interval = interval
        self.clock = clock  # the run's: a row's time is its clock's now()
        previous = read_metrics(run_dir)
        self.call = (max(r.call for r in previous) + 1) if previous else 1
        self._last: MetricsRow | None = None
        self._last_t: float | None = None
        self._failed = False

    def due(self, call_elapsed: float) -> bool:
        """Whether a routine row (progress, checkpoint) is due, ``call_elapsed`` seconds into this call."""
        if self._last_t is None:
            return True
        every = max(self.interval, call_elapsed / ROWS_PER_RUN)
        return call_elapsed - self._last_t >= every

    def write(self, event: Event, call_elapsed: float, *, elapsed_seconds: float, position: int,
              samples_trained: int, samples_filtered: int, samples_failed: int, tokens: int,
              patterns_learned: list[int], detail: str | None = None) -> None:
        """Append a row; a routine row (``ROUTINE``) only when one is due, so checkpoints written every sample
        add no more rows than progress does."""
        if event in ROUTINE and not self.due(call_elapsed):
            return
        rate, token_rate = 0.0, 0.0
        if self._last is not None and self._last_t is not None and call_elapsed > self._last_t:
            dt = call_elapsed - self._last_t
            rate = (samples_trained - self._last.samples_trained) / dt
            token_rate = (tokens - self._last.tokens) / dt
        row = MetricsRow(time=self.clock.now(), event=event, call=self.call,
                         elapsed_seconds=round(elapsed_seconds, 3), position=position,
                         samples_trained=samples_trained, samples_filtered=samples_filtered,
                         samples_failed=samples_failed, tokens=tokens, patterns_learned=list(patterns_learned),
                         samples_per_second=round(rate, 3), tokens_per_second=round(token_rate, 1), detail=detail)
        self._last, self._last_t = row, call_elapsed
        line = (row.model_dump_json() + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    view = memoryview(line)
                    while view:  # a short write is followed by the one that says why (full, a limit)
                        view = view[os.write(fd, view):]
                except OSError:
                    with contextlib.suppress(OSError):  # no half row for the next one to be glued to
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._failed:
                why = (storage_message(exc, self.path, "append to", "The run goes on without its metrics rows.")
                       if is_storage_error(exc) else f"cannot append to {self.path} ({exc}); the run goes on "
                       "without its metrics rows")
                logger.warning("%s", why)
                self._failed = True
