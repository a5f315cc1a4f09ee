"""The run's bookkeeping (streamtrain/runstate.py), pure: driven as the trainer's dispatcher drives it, with samples
finishing in any order, checkpoints taken at any moment and calls that crash and resume from them.

The property: at every moment the position (low-water mark and the finished samples above it) names exactly the
samples finished, so a resume from it neither skips an unfinished sample nor trains a finished one again; the
counters at the mark count every record below it once; and a run crashed any number of times ends with the counts
of a run that never crashed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from soak import SOAK

from streamtrain.errors import TooManyFailures
from streamtrain.records.checkpoint import Counters, FailedSample, FilterReasons, StreamPosition
from streamtrain.runstate import Outcome, RunState

LEVELS = 2
REASONS = ("missing", "wrong_type", "too_short", "undecodable")  # the FilterReasons fields


@dataclass(frozen=True)
class Record:
    """One raw record: filtered for ``reason``, or a sample that trains (``tokens``) or fails for its content."""

    reason: str | None = None
    tokens: int = 0
    fails: bool = False

    def outcome(self, raw_index: int) -> Outcome:
        if self.fails:
            return Outcome(raw_index, error=f"record {raw_index} is rejected", steps_done=self.tokens % 3)
        return Outcome(raw_index, tokens=self.tokens, learns=[self.tokens, self.tokens // 2])


records_strategy = st.lists(
    st.one_of(st.sampled_from(REASONS).map(lambda r: Record(reason=r)),
              st.builds(Record, tokens=st.integers(0, 30), fails=st.booleans()),
              st.builds(Record, tokens=st.integers(1, 30))),  # samples that train are the common case
    max_size=40)


def expected_counters(records: list[Record], below: int | None = None) -> Counters:
    """What the counters must say of the records below ``below`` (all of them: every sample finished)."""
    part = records if below is None else records[:below]
    samples = [r for r in part if r.reason is None]
    trained = [r for r in samples if not r.fails]
    reasons = Counter(r.reason for r in part if r.reason is not None)
    return Counters(samples_trained=len(trained), samples_failed=len(samples) - len(trained),
                    samples_filtered=sum(reasons.values()), filter_reasons=FilterReasons(**reasons),
                    tokens=sum(r.tokens for r in trained),
                    patterns_learned=[sum(r.tokens for r in trained), sum(r.tokens // 2 for r in trained)])


class Call:
    """One call of the trainer over a RunState: records read in raw order from the state's position, at most
    ``capacity`` samples in flight, each finished when ``data`` says (any order); a checkpoint whenever ``data``
    says; a crash whenever ``data`` says (until ``crashes`` is spent). Every event is followed by the checks."""

    def __init__(self, records: list[Record], state: RunState, data: st.DataObject, capacity: int,
                 crashes: int) -> None:
        self.records, self.state, self.data, self.capacity, self.crashes = records, state, data, capacity, crashes
        self.in_flight: list[int] = []
        pos = state.position()
        # the samples this state holds as finished: those its position says (checked true when it was taken)
        self.finished = {i for i, r in enumerate(records) if r.reason is None
                         and (i < pos.raw_offset or i in pos.done_above)}
        self.finished_here: list[int] = []
        self.read = pos.raw_offset  # records below this were read (dispatched, or skipped as finished)
        self.checkpoint: tuple[StreamPosition, Counters, list[FailedSample]] | None = None

    def run(self) -> bool:
        """True when the call ended; False when it crashed (``self.checkpoint`` is the last one it wrote)."""
        self.take_checkpoint()  # a call's first checkpoint is its start's
        for i in range(self.state.read_pos, len(self.records)):
            record = self.records[i]
            if record.reason is not None:
                self.state.filtered(i, record.reason)
                continue
            if i in self.state.done_above:
                self.state.skip_to(i + 1)
                self.read = i + 1
                self.check()
                continue
            while len(self.in_flight) >= self.capacity or (self.in_flight and self.data.draw(st.booleans())):
                if not self.finish_one():
                    return False
            self.state.dispatch(i)
            self.in_flight.append(i)
            self.read = i + 1
            self.check()
        self.state.skip_to(len(self.records))
        self.read = len(self.records)
        self.check()
        while self.in_flight:
            if not self.finish_one():
                return False
        return True

    def finish_one(self) -> bool:
        i = self.in_flight.pop(self.data.draw(st.integers(0, len(self.in_flight) - 1)))
        self.state.finish(self.records[i].outcome(i))
        self.finished.add(i)
        self.finished_here.append(i)
        self.check()
        if self.data.draw(st.integers(0, 3)) == 0:
            self.take_checkpoint()
        if self.crashes and self.data.draw(st.integers(0, 9)) == 0:
            return False
        return True

    def take_checkpoint(self) -> None:
        self.checkpoint = (self.state.position(), self.state.snapshot_counters(), self.state.failure_list())

    def check(self) -> None:
        state, records = self.state, self.records
        mark = min(self.in_flight + [self.read])  # the first sample not finished, or the first record not read
        position = state.position()
        assert position.raw_offset == state.mark == mark
        assert position.done_above == sorted(i for i in self.finished if i >= mark)
        # a resume from this position trains exactly the samples not finished
        again = {i for i in range(mark, len(records)) if records[i].reason is None and i not in position.done_above}
        unfinished = {i for i, r in enumerate(records) if r.reason is None and i not in self.finished}
        assert again == unfinished
        # every record below the mark counted once, with the finished samples above it
        counters = state.snapshot_counters()
        want = expected_counters(records, below=mark)
        above = [records[i] for i in position.done_above]
        assert counters.samples_filtered == want.samples_filtered and counters.filter_reasons == want.filter_reasons
        assert counters.samples_trained == want.samples_trained + sum(not r.fails for r in above)
        assert counters.samples_failed == want.samples_failed + sum(r.fails for r in above)
        assert [f.raw_index for f in state.failure_list()] == sorted(i for i in self.finished if records[i].fails)


@settings(max_examples=1000 if SOAK else 150, deadline=None)
@given(records=records_strategy, capacity=st.integers(1, 5), data=st.data())
def test_finished_in_any_order_the_position_names_exactly_the_finished_samples(records, capacity, data):
    call = Call(records, RunState(LEVELS), data, capacity, crashes=0)
    assert call.run()
    assert call.state.position() == StreamPosition(raw_offset=len(records))
    assert call.state.snapshot_counters() == expected_counters(records)
    assert sorted(call.finished_here) == [i for i, r in enumerate(records) if r.reason is None]


@settings(max_examples=1000 if SOAK else 150, deadline=None)
@given(records=records_strategy, capacity=st.integers(1, 5), crashes=st.integers(1, 4), data=st.data())
def test_crashed_and_resumed_from_its_checkpoints_a_run_counts_every_record_once(records, capacity, crashes, data):
    """Each call crashes at a random moment (up to ``crashes`` times) and the next resumes from the last checkpoint
    it wrote (RunState built from that checkpoint's position, counters and failures): each call trains exactly the
    samples its checkpoint had not finished, and the run ends with the counts of a run that never crashed."""
    state = RunState(LEVELS)
    while True:
        call = Call(records, state, data, capacity, crashes)
        started = set(call.finished)  # what the checkpoint it resumes from says is finished
        if call.run():
            break
        crashes -= 1
        assert call.checkpoint is not None
        position, counters, failures = call.checkpoint
        state = RunState(LEVELS, position.raw_offset, set(position.done_above), counters, failures)
        assert not started & set(call.finished_here), "a call trained a sample its checkpoint had finished"
    assert not started & set(call.finished_here)
    assert started | set(call.finished_here) == {i for i, r in enumerate(records) if r.reason is None}
    assert state.position() == StreamPosition(raw_offset=len(records))
    assert state.snapshot_counters() == expected_counters(records)


# -- failures ---------------------------------------------------------------------------------------------------


def test_a_retried_failure_moves_from_failed_to_trained_once():
    state = RunState(LEVELS)
    state.dispatch(0)
    state.finish(Outcome(0, error="too big", steps_done=2))
    assert state.counters.samples_failed == 1 and state.failure_list() == [
        FailedSample(raw_index=0, error="too big", steps_done=2)]
    # the next call retries it: failing again keeps the most steps known done, and counts it failed still once
    resumed = RunState(LEVELS, state.position().raw_offset, counters=state.snapshot_counters(),
                       failures=state.failure_list())
    resumed.dispatch_retry(0)
    assert resumed.outstanding == 1
    resumed.finish(Outcome(0, retry=True, error="still too big", steps_done=1))
    assert resumed.failure_list() == [FailedSample(raw_index=0, error="still too big", steps_done=2)]
    assert resumed.counters.samples_failed == 1 and resumed.counters.samples_trained == 0
    resumed.dispatch_retry(0)
    resumed.finish(Outcome(0, retry=True, tokens=5, learns=[4, 1]))
    assert resumed.failure_list() == [] and resumed.outstanding == 0
    c = resumed.snapshot_counters()
    assert (c.samples_failed, c.samples_trained, c.tokens, c.patterns_learned) == (0, 1, 5, [4, 1])
    resumed.finish(Outcome(0, retry=True, tokens=5, learns=[4, 1]))  # a second report of it counts nothing
    assert resumed.snapshot_counters() == c


def test_past_max_failures_the_run_stops_naming_the_last():
    state = RunState(LEVELS)
    for i in range(3):
        state.dispatch(i)
        state.finish(Outcome(i, error=f"bad {i}"))
        state.check_failures("r", max_failures=3)
    state.dispatch(3)
    last = Outcome(3, error="bad 3")
    state.finish(last)
    with pytest.raises(TooManyFailures, match=r"run r: 4 samples failed, more than max_failures=3; the last: raw "
                                              r"index 3: bad 3\. Every failure is listed"):
        state.check_failures("r", max_failures=3, last=last)
    with pytest.raises(TooManyFailures, match="the last: raw index 3: bad 3"):
        state.check_failures("r", max_failures=3)  # without the one just taken: the ledger's last


def test_a_state_from_a_checkpoint_keeps_its_counters_apart():
    """The checkpoint's counters are copied, not shared: counting on does not change the checkpoint's."""
    counters = Counters(samples_trained=7, patterns_learned=[10, 3])
    state = RunState(LEVELS, raw_offset=9, counters=counters)
    state.dispatch(9)
    state.finish(Outcome(9, tokens=2, learns=[2, 1]))
    assert counters == Counters(samples_trained=7, patterns_learned=[10, 3])
    assert state.snapshot_counters().samples_trained == 8
    assert RunState(3, counters=counters).counters.patterns_learned == [0, 0, 0]  # levels changed: counted anew
