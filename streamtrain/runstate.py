"""The run's bookkeeping, without I/O: where the stream stands, what is finished, what failed, what was counted.

* **Position.** The checkpointed position is the low-water mark: the first raw index not yet finished. Finished
  samples above it are listed (``done_above``), so a resume neither skips an unfinished sample nor re-trains a
  finished one. A sample is marked in flight *before* the read position moves past it.
* **Counters.** A sample's counts are added once, when it finishes (or from its journal ``fin`` line after a
  crash); ``samples_filtered`` is derived from the position, so no count is lost or doubled. A filtered record's
  reason is held apart until the mark passes it, then counted: the checkpoint's reason counts are those of the
  records below its position, and a resume reads (and counts) the ones above it again.
* **Failures.** A sample rejected for its own content is finished as *failed* and kept in the ledger with the
  number of its steps that took effect. A later call retries it; success moves it from failed to trained.

The checkpoint serializes this state (``position``, ``counters``, ``failures``); a resume rebuilds it from a
checkpoint and the journal (``resume.progress_of``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import TooManyFailures
from .records.checkpoint import Counters, FailedSample, StreamPosition


@dataclass
class Outcome:
    """What a worker did with one sample."""

    raw_index: int
    retry: bool = False  # a failed sample of an earlier call, tried again
    tokens: int = 0
    learns: list[int] = field(default_factory=list)
    error: str | None = None  # the sample's own fault: it failed
    steps_done: int = 0  # with an error: steps that took effect before it
    names: dict[int, str] = field(default_factory=dict)  # level -> the first pattern it learned there (KB probes)
    worker: int = 0  # the worker that trained it: its samples are learned in the order their outcomes come
    fatal: BaseException | None = None  # the server's or the run's fault: the run stops, the sample stays unfinished


class RunState:
    """Position, counters and the ledger of failed samples."""

    def __init__(self, levels: int, raw_offset: int = 0, done_above: set[int] | None = None,
                 counters: Counters | None = None, failures: list[FailedSample] | None = None) -> None:
        self.levels = levels
        self.read_pos = raw_offset
        self.in_flight: set[int] = set()
        self.done_above: set[int] = set(done_above or ())
        self.counters = counters.model_copy(deep=True) if counters else Counters()
        if len(self.counters.patterns_learned) != levels:
            self.counters.patterns_learned = [0] * levels
        self.failures: dict[int, FailedSample] = {f.raw_index: f for f in failures or []}
        self.retrying: set[int] = set()
        # filtered records the mark has not passed yet, in raw order, as runs [first, end, reason]: a stream of
        # mostly filtered records read ahead of a slow sample stays a few entries
        self.filtered_ahead: deque[list[Any]] = deque()

    # -- the position ---------------------------------------------------------------------------------------

    @property
    def mark(self) -> int:
        """The first raw index not finished."""
        return min(self.in_flight) if self.in_flight else self.read_pos

    @property
    def outstanding(self) -> int:
        return len(self.in_flight) + len(self.retrying)

    def dispatch(self, raw_index: int) -> None:
        """A stream sample goes to a worker: in flight first, then the read position, so the mark never passes
        a sample that is not finished."""
        self.in_flight.add(raw_index)
        self.read_pos = raw_index + 1

    def dispatch_retry(self, raw_index: int) -> None:
        self.retrying.add(raw_index)

    def skip_to(self, position: int) -> None:
        """Records below ``position`` were read and need no work (filtered, or finished before)."""
        self.read_pos = max(self.read_pos, position)

    def filtered(self, raw_index: int, reason: str) -> None:
        """The stream read ``raw_index`` and filtered it for ``reason`` (a FilterReasons field: textfilter.Reason);
        counted once the mark passes it (``snapshot_counters``)."""
        last = self.filtered_ahead[-1] if self.filtered_ahead else None
        if last is not None and last[1] == raw_index and last[2] == reason:
            last[1] = raw_index + 1
        else:
            self.filtered_ahead.append([raw_index, raw_index + 1, reason])

    def _count_filtered_below(self, mark: int) -> None:
        reasons, ahead = self.counters.filter_reasons, self.filtered_ahead
        while ahead and ahead[0][0] < mark:
            first, end, reason = ahead[0]
            counted = min(end, mark)
            setattr(reasons, reason, getattr(reasons, reason) + counted - first)
            if counted == end:
                ahead.popleft()
            else:
                ahead[0][0] = counted

    def position(self) -> StreamPosition:
        mark = self.mark
        return StreamPosition(raw_offset=mark, done_above=sorted(i for i in self.done_above if i >= mark))

    # -- outcomes -------------------------------------------------------------------------------------------

    def check_failures(self, run_name: str, max_failures: int, last: Outcome | None = None) -> None:
        """TooManyFailures once more than ``max_failures`` samples are failed (``last``: the failure just taken,
        named in the message; else the ledger's last)."""
        failed = self.counters.samples_failed
        if failed <= max_failures:
            return
        where = (f"raw index {last.raw_index}: {last.error}" if last is not None else
                 "; ".join(f"raw index {f.raw_index}: {f.error}" for f in self.failure_list()[-1:]))
        raise TooManyFailures(
            f"run {run_name}: {failed} samples failed, more than max_failures={max_failures}; the last: {where}. "
            "Every failure is listed in the checkpoint (streamtrain inspect); fix the cause, or raise max_failures.")

    def finish(self, outcome: Outcome) -> None:
        """Take a finished sample (trained or failed) into the position and the counters."""
        if outcome.retry:
            self.retrying.discard(outcome.raw_index)
        else:
            self.in_flight.discard(outcome.raw_index)
            self.done_above.add(outcome.raw_index)
            mark = self.mark
            self.done_above = {i for i in self.done_above if i >= mark}
        self.count(outcome)

    def count(self, outcome: Outcome) -> None:
        """Add a finished sample's counts (trained or failed; a retry moves it out of the failed ones)."""
        c = self.counters
        if outcome.retry:
            if outcome.error is not None:  # failed again: still open, with what is known now
                old = self.failures.get(outcome.raw_index)
                done = max(outcome.steps_done, old.steps_done if old else 0)
                self.failures[outcome.raw_index] = FailedSample(raw_index=outcome.raw_index, error=outcome.error,
                                                                steps_done=done)
                return
            if self.failures.pop(outcome.raw_index, None) is None:
                return  # already counted (cannot happen: a retry is dispatched only for an open failure)
            c.samples_failed -= 1
        elif outcome.error is not None:
            c.samples_failed += 1
            self.failures[outcome.raw_index] = FailedSample(raw_index=outcome.raw_index, error=outcome.error,
                                                            steps_done=outcome.steps_done)
            return
        c.samples_trained += 1
        c.tokens += outcome.tokens
        for level, n in enumerate(outcome.learns[: len(c.patterns_learned)]):
            c.patterns_learned[level] += n

    def snapshot_counters(self) -> Counters:
        """The counters at the mark; every raw index below it is trained, failed or filtered."""
        c = self.counters
        mark = self.mark
        above = sum(1 for i in self.done_above if i >= mark)
        c.samples_filtered = max(0, mark - (c.samples_trained + c.samples_failed - above))
        self._count_filtered_below(mark)
        return c.model_copy(deep=True)

    def failure_list(self) -> list[FailedSample]:
        return [self.failures[i] for i in sorted(self.failures)]
