"""How a call of ``train`` continues its run: ``plan_resume`` decides it, once, before anything is sent.

How resume chooses the next record. The newest valid checkpoint (a damaged newest file is passed over for the one
before it) says where the run stood: every raw record below its position is finished (trained, failed or
filtered), and it lists the records finished above it, since workers finish out of order. The journal says what
happened after that checkpoint: a sample with a ``fin`` line finished (its counts are added here, once); a sample
with a step line and no ``fin`` was in flight when the last trainer stopped. The call then sends, in this order:
the failed samples (the checkpoint's ledger brought forward by the journal), each from its first step that did not
take effect; then every record from the position on, in raw order, except the finished ones above it. A record in
flight at the stop goes from its first step that did not take effect (``first_step``). Filtered records are
filtered again as they are read, and counted once the position passes them. So a resumed call trains exactly the
records an uninterrupted run had still to train, and its counters come out the same: ``tests/test_resume_plan.py``
checks it over random finish orders, failures, filtered records and crash points.

A run that got nowhere (no checkpoint past its start, no sample in the journal) pins nothing: it starts at raw 0
with the config it is given, its old journal discarded. A run that got somewhere is checked before anything is
sent, and refused with what differs and the ways out when it could not continue exactly: the config's must-match
fields (``config.check_resume``), the dataset's files (``datafiles.check_dataset``), the knowledge base, which must
hold at least what the checkpoint recorded (``kbcheck.check_knowledge_base``), the steps in doubt, whose keys the
server must still hold (``indoubt.check``), and the data, which must reach the position (``open_stream``).

``plan_resume`` reads the run folder and asks the server, and returns a frozen ``ResumePlan``; the trainer executes
it (it opens the stream, dispatches the retries and the records, and checkpoints) and decides nothing of it. The
records part, ``progress_of``, is pure: a checkpoint and a journal in, a ``Progress`` out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import indoubt
from .client import KatoClient
from .config import RunConfig, check_resume
from .data.datafiles import check_dataset, describe_dataset
from .data.stream import DatasetStream
from .data.textfilter import Reason
from .errors import DataEndsEarly
from .kbcheck import check_knowledge_base, next_record, read_knowledge_base
from .records.checkpoint import Checkpoint, Counters, FailedSample
from .records.dataset import DatasetRecord
from .records.journal import JournalState, SampleRecord, read_journal
from .records.knowledge_base import KnowledgeBaseRecord
from .rundir import RunDir
from .runstate import Outcome, RunState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What the run has finished, by a checkpoint and the journal since: where reading starts and what is left."""

    start: int  # the first raw record to read: every record below it is finished
    finished_above: frozenset[int]  # records at or above ``start`` finished already: skipped when read
    counters: Counters  # the counts of every finished sample (filtered records: once the position passes them)
    failures: tuple[FailedSample, ...]  # the ledger, in raw order: each is retried first, past its steps done
    in_flight: Mapping[int, SampleRecord]  # samples (retries too) a stop cut short: the journal's last step of each

    def is_finished(self, raw_index: int) -> bool:
        """Whether the record needs no work in this call (a failed one is retried apart: ``retries``)."""
        return raw_index < self.start or raw_index in self.finished_above

    def recovery(self, raw_index: int) -> SampleRecord | None:
        """What the journal knows of the record's attempt that a stop cut short (None: it starts afresh)."""
        return self.in_flight.get(raw_index)

    def retries(self) -> list[tuple[FailedSample, SampleRecord | None]]:
        """The failed samples to send again before any record, in raw order, each with its cut-short attempt."""
        return [(f, self.recovery(f.raw_index)) for f in self.failures]

    def run_state(self, levels: int) -> RunState:
        """The run's state as this call starts it: the position, the finished records above it, the counts."""
        return RunState(levels, self.start, set(self.finished_above), self.counters, list(self.failures))


def progress_of(levels: int, checkpoint: Checkpoint | None, journal: JournalState) -> Progress:
    """The checkpoint's state (none: a new run) brought forward by what the journal says happened since.

    A ``fin`` line above the position finishes its sample (counted here); one of a failed sample is its retry's end
    (trained: moved from failed to trained; failed again: its steps done updated). A step line without a ``fin``
    after it is an attempt a stop cut short. Lines below the position, or of samples the checkpoint lists as
    finished above it, were counted in the checkpoint already."""
    if checkpoint is None:
        state = RunState(levels)
    else:
        p = checkpoint.position
        state = RunState(levels, p.raw_offset, set(p.done_above), checkpoint.counters, list(checkpoint.failures))
    in_flight: dict[int, SampleRecord] = {}
    for raw_index, rec in sorted(journal.samples.items()):
        fin = rec.finished
        retry = raw_index in state.failures
        if not retry and (raw_index < state.read_pos or raw_index in state.done_above):
            continue
        if fin is not None:
            if not retry:
                state.done_above.add(raw_index)
            state.count(Outcome(raw_index, retry=retry, tokens=fin.get("tokens", 0), learns=fin.get("learns", []),
                                error=fin.get("error"), steps_done=fin.get("steps_done", 0)))
        elif rec.last_step is not None:
            in_flight[raw_index] = rec
    return Progress(start=state.read_pos, finished_above=frozenset(state.done_above),
                    counters=state.counters.model_copy(deep=True), failures=tuple(state.failure_list()),
                    in_flight=MappingProxyType(in_flight))


def first_step(steps: int, recovery: SampleRecord | None, retry: FailedSample | None,
               took_effect: Callable[[int], bool]) -> int:
    """The first of a sample's ``steps`` to send: after a stop, from the journal's last step line (``recovery``);
    for a retried failure, past its steps that took effect; else 0.

    A worker sends a sample's steps in order and journals each before sending it, so when the last line is step
    k, steps before k took effect and steps after it were never sent. Step k itself: phase ``observe`` means its
    learn was never sent (send it); ``keyed``, ``batch`` and ``batches`` are replayed under their idempotency key
    (the server answers from its record if it took effect); ``learn`` and ``counted`` are decided by asking the
    server (``took_effect(k)``: the recorded session's short-term memory or observation counter,
    ``client/exactly_once.py``).
    The journal's argument in full: docs/trainer.md ("The journal")."""
    if recovery is not None and recovery.last_step is not None:
        k = recovery.last_step
        if k >= steps:
            return 0
        if recovery.last_phase in indoubt.SESSION_PHASES:
            return k + 1 if took_effect(k) else k
        return k
    if retry is not None:
        return min(retry.steps_done, steps)
    return 0


@dataclass(frozen=True)
class KeptCheckpoint:
    """A checkpoint on disk, as the journal's compaction sees it: a resume from it needs the journal lines of the
    samples from its position on, and of the samples it lists as failed (their retries since)."""

    position: int
    failed: frozenset[int]

    @classmethod
    def of(cls, ckpt: Checkpoint) -> KeptCheckpoint:
        return cls(ckpt.position.raw_offset, frozenset(f.raw_index for f in ckpt.failures))


def journal_to_keep(kept: Iterable[KeptCheckpoint]) -> tuple[int, frozenset[int]]:
    """(keep_from, keep_also) for ``Journal.compact``: what a resume from any kept checkpoint (the newest, or an
    older one when the newer are damaged) needs. A failure an older checkpoint lists may have been retried and
    trained since, so the newest checkpoint no longer lists it; without its lines a resume from the older one would
    send its steps again."""
    kept = list(kept)
    return min(k.position for k in kept), frozenset().union(*(k.failed for k in kept))


@dataclass(frozen=True)
class ResumePlan:
    """How this call continues its run, decided before anything is sent (``plan_resume``)."""

    run_name: str
    resumed: bool  # something of the run may be on the server: it continues (False: it starts at raw 0)
    checkpoint: Checkpoint | None  # the checkpoint it continues from (None: a new run, or its journal alone)
    checkpoint_path: Path | None
    why: str  # the choice, in a sentence for the log
    checks: tuple[str, ...]  # each check's outcome (a failed check raises instead)
    discard_journal: bool  # a run that trained nothing: its journal (a header at most) pins nothing, and goes
    progress: Progress  # the records: where reading starts, what is finished above, the retries, the in-flight
    stream_state: dict[str, Any] | None  # the dataset's exact state at the start (else it is reached by skipping)
    data_ended_at_start: bool  # the run ended at the end of its data there: an empty stream is no surprise
    at_limit: bool  # the start is at or past max_samples: no record to read (a lowered max_samples un-trains nothing)
    sequence: int  # the newest checkpoint's number: the next one comes after it
    kept: tuple[KeptCheckpoint, ...]  # the valid checkpoints on disk, oldest first
    started_at: datetime  # when the run first started
    elapsed_before: float  # the run's training time before this call
    dataset: DatasetRecord  # the dataset's files now
    kb_record: KnowledgeBaseRecord  # what the knowledge base holds as the call starts: its checks compare with it

    @property
    def start(self) -> int:
        return self.progress.start

    @property
    def prove_start(self) -> bool:
        """Open the stream before anything is trained: the data must reach the start (``open_stream``)."""
        return self.start > 0 and not self.at_limit


def plan_resume(config: RunConfig, rundir: RunDir, server: KatoClient, *, embedded: bool, server_url: str,
                resend_in_doubt: bool, now: datetime) -> ResumePlan:
    """Decide how this call continues the run, from its folder (the newest valid checkpoint, the journal), the
    dataset's files and what the server holds; raise when it could not continue exactly (the module's docstring
    lists the checks). Writes nothing."""
    name, levels = config.run_name, len(config.layers)
    store = rundir.checkpoints
    found = store.latest_with_path()
    journal = read_journal(rundir.journal_path)
    ckpt, path = found if found is not None else (None, None)
    # Pinned: something of this run may be on the server. A run that stopped before its first sample (a typo in
    # data_files, a wrong text_field) pins nothing, so the corrected config simply runs.
    pinned = (ckpt is not None and ckpt.has_progress) or bool(journal.samples)
    header = journal.header or {}
    recorded = (ckpt.dataset if ckpt is not None else
                DatasetRecord.model_validate(header["dataset"]) if header.get("dataset") else None)
    where = str(path or rundir.journal_path)
    checks: list[str] = []
    # recorded files are checked by content below: local data_files need not match as written (a moved folder)
    if pinned and ckpt is not None and path is not None:
        check_resume(ckpt.config, config, path, files_checked=recorded is not None)
        checks.append(f"config: its must-match fields are those of {path.name}")
    elif pinned and header:
        check_resume(RunConfig.model_validate(header["config"]), config, rundir.journal_path,
                     files_checked=recorded is not None)
        checks.append("config: its must-match fields are those of the journal's header")
    else:
        checks.append("config: nothing pinned (the run trained nothing before)")
    dataset = describe_dataset(config.dataset)
    if pinned and recorded is not None:
        check_dataset(recorded, dataset, name, where)
        checks.append(f"dataset: the {len(recorded.files)} file(s) read so far are unchanged")
    else:
        checks.append("dataset: nothing recorded to compare with")
    node_ids = [config.node_id(level) for level in range(levels)]
    kb_where = str(rundir.kb_path) if embedded else server_url
    resumed_from = (ckpt, path) if pinned and ckpt is not None and path is not None else None
    if resumed_from is not None:
        kb_now = check_knowledge_base(server, resumed_from[0].knowledge_base, node_ids, str(resumed_from[1]),
                                      kb_where, embedded)
        checks.append(f"knowledge base: holds at least what {resumed_from[1].name} recorded")
    else:
        kb_now = read_knowledge_base(server, node_ids, None)
        checks.append("knowledge base: nothing recorded to compare with")
    progress = progress_of(levels, ckpt if pinned else None, journal)
    if progress.in_flight:
        # their keys or sessions decide them: refused when the server may have forgotten them (indoubt.py)
        indoubt.check(progress.in_flight, server.info(), run_name=name, journal_path=rundir.journal_path,
                      embedded=embedded, resend=resend_in_doubt, now=now.timestamp())
        checks.append(f"steps in doubt: {len(progress.in_flight)} sample(s), checked against the server's key and "
                      "session lifetimes")
    else:
        checks.append("steps in doubt: none")
    if resumed_from is not None:
        c, p = resumed_from
        newer = [q.name for seq, q in store.paths() if seq > c.sequence]
        why = f"resuming from {p.name}" + (f" (the newer {', '.join(newer)} damaged)" if newer else "")
        kept = tuple(KeptCheckpoint.of(e.checkpoint) for e in store.entries() if e.checkpoint)
        started_at, elapsed_before, stream_state = c.started_at, c.elapsed_seconds, c.position.state_dict
        # it ended at the end of its data there (not at its max_samples): an empty stream is no surprise
        ended = c.reason == "end" and (c.config.max_samples is None or progress.start < c.config.max_samples)
    else:
        why = ("resuming from its journal alone (it stopped before its first checkpoint)" if pinned else
               "a new run" if ckpt is None and not header else "it trained nothing before: starting it with this config")
        kept, started_at, elapsed_before, stream_state, ended = (), now, 0.0, None, False
    if pinned:
        why += (f", at raw position {progress.start}: {len(progress.finished_above)} record(s) finished above it, "
                f"{len(progress.in_flight)} in flight at the stop, {len(progress.failures)} failed to retry")
    return ResumePlan(
        run_name=name, resumed=pinned, checkpoint=resumed_from[0] if resumed_from else None,
        checkpoint_path=resumed_from[1] if resumed_from else None, why=why, checks=tuple(checks),
        discard_journal=not pinned, progress=progress, stream_state=stream_state, data_ended_at_start=ended,
        at_limit=config.max_samples is not None and progress.start >= config.max_samples,
        sequence=ckpt.sequence if ckpt is not None else 0, kept=kept, started_at=started_at,
        elapsed_before=elapsed_before, dataset=dataset, kb_record=next_record(kb_now),
    )


def open_stream(plan: ResumePlan, cfg: RunConfig, on_filtered: Callable[[int, Reason], None]) -> DatasetStream:
    """The dataset's stream at the plan's start. From a position above 0 it is opened at once, before anything is
    trained: data that ends before that position (truncated files, a checkpoint edited or not of this data) is
    refused with ``DataEndsEarly``, the checkpoint untouched."""
    stream = DatasetStream(cfg.dataset, start=plan.start, state_dict=plan.stream_state, stop=cfg.max_samples,
                           on_filtered=on_filtered, ends_at_start=plan.data_ended_at_start)
    if plan.start == 0:
        return stream  # nothing to prove: it opens as it is read
    try:
        stream.open()
    except DataEndsEarly as exc:
        stream.close()
        where = plan.checkpoint_path or "the checkpoint"
        raise DataEndsEarly(
            f"cannot resume run '{cfg.run_name}': {where} resumes at raw position {exc.position}, but dataset "
            f"{cfg.dataset.path!r} ends at raw position {exc.end} (it holds {exc.end} records). The data is "
            "shorter than the data the run read (files truncated or replaced), or the checkpoint is not this "
            "data's (edited, or copied from another run). Nothing was trained and the checkpoint is as it "
            "was.\nWhat to do: restore the data the run was reading and train again; or start the run over on "
            "this data (streamtrain train --fresh --move-aside); or train this data under another run_name.",
            position=exc.position, end=exc.end) from None
    return stream
