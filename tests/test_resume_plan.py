"""The resume plan as a property (``streamtrain/resume.py``), in the shape of mosaicml/streaming's resume tests.

Whatever order N workers finish samples in, wherever records are filtered or samples fail, wherever a trainer is
killed (the journal holding the lines written up to that moment, the disk the checkpoints written up to it), and
whichever kept checkpoint a resume falls back to (the newer ones damaged): the plan's next records and retries are
exactly the samples not trained yet, each once, its in-flight recoveries exactly the attempts cut short; and the
run ends with every step of every sample learned once and the counters of a run that was never stopped.

No server, no dataset: the plan's inputs are records (a ``Checkpoint``, the journal's lines). The workers and the
server are a small model here: a worker journals each step before sending it, and the server applies it (a keyed
replay applies nothing twice; a server without keys applies whatever is sent, so a step sent twice shows). What the
model takes from streamtrain is what a resume decides: ``progress_of`` (the plan's records), ``Progress``'s next
records, retries and recoveries, ``first_step``, ``journal_to_keep`` (what a compaction keeps), ``RunState`` (the
position and the counters) and ``JournalState`` (how the journal's lines read). The crash tests of test_trainer.py
run the same through the real trainer, server and dataset.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtrain.config import DatasetConfig, RunConfig
from streamtrain.records.checkpoint import Checkpoint, Counters, FailedSample, FilterReasons
from streamtrain.records.journal import FinLine, JournalState, SampleRecord, StepLine
from streamtrain.resume import KeptCheckpoint, Progress, first_step, journal_to_keep, progress_of
from streamtrain.runstate import Outcome, RunState

LEVELS = 2
REASONS = ("missing", "wrong_type", "too_short", "undecodable")
CONFIG = RunConfig(run_name="prop", dataset=DatasetConfig(path="json"))
WHEN = "2024-01-01T00:00:00Z"


@dataclass(frozen=True)
class Record:
    reason: str | None = None  # filtered, for this reason; else a sample:
    steps: int = 1
    fails_at: int | None = None  # the step the server rejects for its content
    transient: bool = False  # rejected in the run's first call only (fixed before the next)

    @property
    def tokens(self) -> int:
        return 3 * self.steps

    @property
    def learns(self) -> list[int]:
        return [(self.steps + 1) // 2, self.steps // 2]

    def rejects(self, step: int, call: int) -> bool:
        return step == self.fails_at and (call == 1 or not self.transient)


def _sample(steps: int, fail: tuple[int, bool] | None) -> Record:
    if fail is None:
        return Record(steps=steps)
    return Record(steps=steps, fails_at=min(fail[0], steps - 1), transient=fail[1])


RECORDS = st.lists(st.one_of(
    st.builds(_sample, st.integers(1, 3), st.none() | st.tuples(st.integers(0, 2), st.booleans())),
    st.builds(_sample, st.integers(1, 3), st.none()),
    st.sampled_from(REASONS).map(lambda reason: Record(reason=reason)),
), max_size=24)
# the calls stopped by a kill: (workers, when the kill comes in percent of a whole run's events, how many of the
# newest checkpoints are damaged when the next call resumes)
STOPPED = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 99), st.integers(0, 2)), max_size=4)


def _error(step: int) -> str:
    return f"step {step} was rejected"


class Server:
    """What the knowledge base learned: each (sample, step) applied, and the keys a keyed server holds."""

    def __init__(self, keyed: bool) -> None:
        self.keyed = keyed
        self.applied: Counter[tuple[int, int]] = Counter()
        self.keys: set[tuple[int, int]] = set()

    def learn(self, raw_index: int, step: int) -> None:
        if self.keyed:
            if (raw_index, step) in self.keys:
                return  # a replay under its key: answered from the record
            self.keys.add((raw_index, step))
        self.applied[raw_index, step] += 1

    def took_effect(self, raw_index: int, step: int) -> bool:
        return self.applied[raw_index, step] > 0


@dataclass
class Disk:
    """What outlives a killed trainer: the journal's lines, the checkpoint files, the server."""

    records: list[Record]
    mode: str  # "keyed", "counted" (one request, decided by the session's counter), "observe-learn" (two)
    keep: int
    server: Server
    journal: list[StepLine | FinLine] = field(default_factory=list)
    checkpoints: list[tuple[Checkpoint, bool]] = field(default_factory=list)  # oldest first; False: damaged
    sequence: int = 0
    # the truth, for the assertions: the last finish of each sample (True: failed), the attempts not finished
    finished: dict[int, bool] = field(default_factory=dict)
    open_attempts: set[int] = field(default_factory=set)

    def append(self, line: StepLine | FinLine) -> None:
        self.journal.append(line)
        if isinstance(line, FinLine):
            self.finished[line.s] = line.error is not None
            self.open_attempts.discard(line.s)
        else:
            self.open_attempts.add(line.s)

    def read_journal(self) -> JournalState:
        state = JournalState()
        for line in self.journal:
            state.add(line)
        return state

    def compact(self, keep_from: int, keep_also: frozenset[int]) -> None:
        """Journal.compact: each kept sample's last step line and its fin line after it."""
        lines: list[StepLine | FinLine] = []
        for s, rec in sorted(self.read_journal().samples.items()):
            if s < keep_from and s not in keep_also:
                continue
            if rec.last_step is not None:
                lines.append(StepLine(s=s, k=rec.last_step, p=rec.last_phase, sid=rec.last_session,
                                      t=rec.last_counter, e=rec.last_end, at=rec.last_at))
            if rec.finished is not None:
                lines.append(FinLine(**rec.finished))
        self.journal = lines


@dataclass(frozen=True)
class Job:
    raw_index: int
    recovery: SampleRecord | None
    retry: FailedSample | None


class Call:
    """One call of train(): a dispatcher, N workers, a kill after ``kill_after`` events (None: it runs to its end)."""

    def __init__(self, disk: Disk, number: int, workers: int, progress: Progress, kept: list[KeptCheckpoint],
                 rng: random.Random) -> None:
        self.disk, self.number, self.progress, self.kept, self.rng = disk, number, progress, kept, rng
        self.state = progress.run_state(LEVELS)
        self.capacity = 2 * workers + 2
        self.inbox: deque[Job] = deque()
        self.outbox: deque[Outcome] = deque()
        self.workers: list[Iterator[None] | None] = [None] * workers
        self.dispatcher: Iterator[None] | None = self._dispatch()

    def _dispatch(self) -> Iterator[None]:
        """The trainer's dispatch loop: the plan's retries, then the stream from the plan's start."""
        st, progress, records = self.state, self.progress, self.disk.records
        for failed, recovery in progress.retries():
            while st.outstanding >= self.capacity:
                yield
            st.dispatch_retry(failed.raw_index)
            self.inbox.append(Job(failed.raw_index, recovery, failed))
            yield
        for raw_index in range(progress.start, len(records)):
            reason = records[raw_index].reason
            if reason is not None:  # the stream reads it and filters it
                st.filtered(raw_index, reason)
                yield
                continue
            if progress.is_finished(raw_index):
                st.skip_to(raw_index + 1)
                continue
            while st.outstanding >= self.capacity:
                yield
            st.dispatch(raw_index)
            self.inbox.append(Job(raw_index, progress.recovery(raw_index), None))
            yield
        st.skip_to(len(records))

    def _work(self, job: Job) -> Iterator[None]:
        """A worker's sample: each step journaled before it is sent; a kill may come between any two events."""
        disk, r = self.disk, job.raw_index
        rec = disk.records[r]
        retry = job.retry is not None
        first = first_step(rec.steps, job.recovery, job.retry, lambda k: disk.server.took_effect(r, k))
        for k in range(first, rec.steps):
            if disk.mode == "observe-learn":
                disk.append(StepLine(s=r, k=k, p="observe", sid=f"{r}"))
                yield
            elif disk.mode == "counted":
                disk.append(StepLine(s=r, k=k, p="counted", sid=f"{r}", t=0))
                yield
            else:
                disk.append(StepLine(s=r, k=k, p="keyed", sid=f"{r}"))
                yield
            if rec.rejects(k, self.number):
                disk.append(FinLine(s=r, p="fin", trained=0, tokens=0, learns=[0] * LEVELS, error=_error(k),
                                    steps_done=k))
                yield
                self.outbox.append(Outcome(r, retry=retry, error=_error(k), steps_done=k))
                return
            if disk.mode == "observe-learn":
                disk.append(StepLine(s=r, k=k, p="learn", sid=f"{r}"))
                yield
            disk.server.learn(r, k)
            yield  # its answer: a kill before it leaves the step in doubt
        disk.append(FinLine(s=r, p="fin", trained=1, tokens=rec.tokens, learns=rec.learns))
        yield
        self.outbox.append(Outcome(r, retry=retry, tokens=rec.tokens, learns=rec.learns))

    def checkpoint(self, reason: str) -> None:
        """The trainer's checkpoint: the state's position, counters and ledger; the journal compacted."""
        st, disk = self.state, self.disk
        disk.sequence += 1
        ckpt = Checkpoint(sequence=disk.sequence, run_name=CONFIG.run_name, config=CONFIG, position=st.position(),
                          counters=st.snapshot_counters(), failures=st.failure_list(), reason=reason,
                          started_at=WHEN, created_at=WHEN, elapsed_seconds=0)
        # its counters account for the records below its position and those it lists above, each once
        c, p = ckpt.counters, ckpt.position
        below = [rec.reason for rec in disk.records[:p.raw_offset] if rec.reason is not None]
        assert c.samples_filtered == len(below) and c.filter_reasons == FilterReasons(**Counter(below))
        assert c.samples_trained + c.samples_failed == p.raw_offset - len(below) + len(p.done_above)
        disk.checkpoints.append((ckpt, True))
        del disk.checkpoints[:-disk.keep]
        self.kept = (self.kept + [KeptCheckpoint.of(ckpt)])[-disk.keep:]
        disk.compact(*journal_to_keep(self.kept))

    def run(self, kill_after: int | None) -> bool:
        """True when the call ran to its end (and wrote its end checkpoint), False when it was killed."""
        events = 0
        while True:
            if kill_after is not None and events >= kill_after:
                return False
            actions: list[tuple[str, int]] = []
            if self.dispatcher is not None:
                actions.append(("dispatch", 0))
            if self.outbox:
                actions.append(("take", 0))
            for i, w in enumerate(self.workers):
                if w is not None or self.inbox:
                    actions.append(("work", i))
            if not actions:
                self.checkpoint("end")
                return True
            if self.rng.random() < 0.15:
                actions.append(("checkpoint", 0))
            what, i = self.rng.choice(actions)
            events += 1
            if what == "dispatch":
                assert self.dispatcher is not None
                if next(self.dispatcher, StopIteration) is StopIteration:
                    self.dispatcher = None
            elif what == "take":
                self.state.finish(self.outbox.popleft())
            elif what == "checkpoint":
                self.checkpoint("interval")
            else:
                worker = self.workers[i]
                if worker is None:
                    worker = self.workers[i] = self._work(self.inbox.popleft())
                if next(worker, StopIteration) is StopIteration:
                    self.workers[i] = None


def _resume(disk: Disk, damaged: int) -> tuple[Progress, list[KeptCheckpoint]]:
    """What plan_resume decides of the records: from the newest readable checkpoint (``damaged`` of the newest ones
    made unreadable first, as long as one stays readable) and the journal."""
    readable = [i for i, (_, ok) in enumerate(disk.checkpoints) if ok]
    for i in readable[::-1][:min(damaged, len(readable) - 1)]:
        disk.checkpoints[i] = (disk.checkpoints[i][0], False)
    valid = [c for c, ok in disk.checkpoints if ok]
    progress = progress_of(LEVELS, valid[-1] if valid else None, disk.read_journal())
    return progress, [KeptCheckpoint.of(c) for c in valid]


def _check_plan(disk: Disk, progress: Progress) -> None:
    """The plan sends exactly the samples not trained yet, each once: the failed ones as retries, the rest from the
    stream; it recovers exactly the attempts a kill cut short. (A sample that failed after the checkpoint and whose
    retry was cut short is such an attempt: it goes from the stream, from its journal's last step.)"""
    samples = [r for r, rec in enumerate(disk.records) if rec.reason is None]
    trained = {r for r, failed in disk.finished.items() if not failed and r not in disk.open_attempts}
    retries = {f.raw_index for f in progress.failures}
    next_records = {r for r in samples if r >= progress.start and not progress.is_finished(r)}
    assert not retries & next_records, (sorted(retries), sorted(next_records))
    assert retries | next_records == set(samples) - trained, (sorted(retries), sorted(next_records), sorted(trained))
    assert {r for r in samples if r not in disk.finished} <= next_records  # never finished: from the stream
    assert {r for r, failed in disk.finished.items() if failed and r not in disk.open_attempts} <= retries
    assert set(progress.in_flight) == disk.open_attempts


def _uninterrupted(records: list[Record], calls: int) -> tuple[Counters, list[FailedSample], Counter[tuple[int, int]]]:
    """What a run never stopped leaves: its counters, its failures, each step learned once (a failure: the steps
    before the one rejected). After a second call, the transient failures were retried and trained."""
    c = Counters(patterns_learned=[0] * LEVELS)
    reasons = FilterReasons()
    failures: list[FailedSample] = []
    applied: Counter[tuple[int, int]] = Counter()
    for r, rec in enumerate(records):
        if rec.reason is not None:
            c.samples_filtered += 1
            setattr(reasons, rec.reason, getattr(reasons, rec.reason) + 1)
            continue
        fails = rec.fails_at is not None and (calls == 1 or not rec.transient)
        if fails:
            assert rec.fails_at is not None
            c.samples_failed += 1
            failures.append(FailedSample(raw_index=r, error=_error(rec.fails_at), steps_done=rec.fails_at))
        else:
            c.samples_trained += 1
            c.tokens += rec.tokens
            c.patterns_learned = [a + b for a, b in zip(c.patterns_learned, rec.learns, strict=True)]
        applied.update((r, k) for k in range(rec.fails_at if fails and rec.fails_at is not None else rec.steps))
    c.filter_reasons = reasons
    return c, failures, applied


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=RECORDS, mode=st.sampled_from(["keyed", "counted", "observe-learn"]), keep=st.integers(1, 3),
       stopped=STOPPED, last_workers=st.integers(1, 4), rng=st.randoms(use_true_random=False))
def test_a_resume_sends_exactly_the_unfinished_records_and_counts_like_an_uninterrupted_run(
        records, mode, keep, stopped, last_workers, rng):
    disk = Disk(records=records, mode=mode, keep=keep, server=Server(keyed=mode == "keyed"))
    events = sum(3 + 4 * rec.steps for rec in records)  # about those of a whole run
    calls = 0
    for workers, kill_at, damaged in [*stopped, (last_workers, None, 0)]:
        calls += 1
        progress, kept = _resume(disk, damaged)
        _check_plan(disk, progress)
        call = Call(disk, calls, workers, progress, kept, rng)
        ended = call.run(None if kill_at is None else events * kill_at // 100)
        assert ended or kill_at is not None
    final = disk.checkpoints[-1][0]
    assert final.reason == "end" and final.position.raw_offset == len(records) and not final.position.done_above
    counters, failures, applied = _uninterrupted(records, calls)
    assert final.counters == counters
    assert [(f.raw_index, f.steps_done) for f in final.failures] == [(f.raw_index, f.steps_done) for f in failures]
    assert +disk.server.applied == applied  # each step learned once: none skipped, none twice


def test_a_sample_finished_after_the_checkpoint_is_skipped_and_counted_once() -> None:
    """The case the property rests on, by hand: two workers, sample 2 finished above the mark (its fin in the
    journal, not in the checkpoint), sample 1 in flight at the kill with its step 0 applied."""
    records = [Record(steps=1), Record(steps=2), Record(steps=1), Record(reason="too_short")]
    state = RunState(LEVELS)
    for r in (0, 1, 2):
        state.dispatch(r)
    state.finish(Outcome(0, tokens=3, learns=[1, 0]))
    ckpt = Checkpoint(sequence=1, run_name="prop", config=CONFIG, position=state.position(),
                      counters=state.snapshot_counters(), reason="interval", started_at=WHEN, created_at=WHEN,
                      elapsed_seconds=0)
    journal = JournalState()
    for line in (StepLine(s=1, k=0, p="counted", sid="a", t=0), StepLine(s=2, k=0, p="counted", sid="b", t=0),
                 FinLine(s=2, p="fin", trained=1, tokens=3, learns=[1, 0]),
                 StepLine(s=1, k=1, p="counted", sid="a", t=0)):
        journal.add(line)
    progress = progress_of(LEVELS, ckpt, journal)
    assert progress.start == 1 and progress.finished_above == {2}
    assert [r for r in range(4) if records[r].reason is None and not progress.is_finished(r)] == [1]
    assert progress.counters.samples_trained == 2 and progress.counters.tokens == 6
    recovery = progress.recovery(1)
    assert recovery is not None and first_step(2, recovery, None, lambda k: False) == 1
    assert first_step(2, recovery, None, lambda k: True) == 2  # its last step took effect: nothing left to send


def test_the_journal_keeps_the_retries_of_failures_an_older_kept_checkpoint_lists() -> None:
    """Sample 5 failed before ckpt 1, was retried and trained before ckpt 2, which no longer lists it. While ckpt 1
    is kept (a resume falls back to it when ckpt 2 is damaged), the journal keeps sample 5's lines: without them
    that resume would send its steps again."""
    kept = [KeptCheckpoint(position=10, failed=frozenset({5})), KeptCheckpoint(position=14, failed=frozenset())]
    assert journal_to_keep(kept) == (10, frozenset({5}))
    assert journal_to_keep(kept[1:]) == (14, frozenset())
