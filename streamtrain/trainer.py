"""The main job: ``train`` and ``train_parallel``. The calling thread reads the stream, dispatches samples to
worker threads (``worker.py``), takes their outcomes into the run's state (``runstate.py``), checkpoints and
journals. Where a call starts, and what it sends first, is not decided here: ``resume.plan_resume`` decides it
before anything is sent (the checkpoint, the journal, the checks), and the call executes that plan.

Why a run killed at any moment resumes exactly: docs/trainer.md ("Exactly once").
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from .client import KatoClient
from .client.outage import OutageTracker
from .clock import SYSTEM, Clock
from .config import ClientConfig, RunConfig
from .data.datafiles import dataset_size
from .data.stream import DatasetStream
from .data.tokenization import get_tokenizer
from .errors import (
    CheckpointError,
    DatasetError,
    KnowledgeBaseMismatch,
    ProtocolError,
    ServerUnavailable,
    StreamtrainError,
)
from .gcfreeze import frozen_heap
from .kbcheck import Learned, knowledge_base_problems, next_record, read_knowledge_base
from .records.checkpoint import Checkpoint, CheckpointStore, Counters, FailedSample, ServerInfo, StreamPosition
from .records.journal import Journal
from .records.knowledge_base import KnowledgeBaseRecord
from .records.metrics import Event, MetricsLog
from .results import ProgressPoint, TrainResult
from .resume import KeptCheckpoint, ResumePlan, journal_to_keep, open_stream, plan_resume
from .rundir import RunDir
from .runstate import Outcome, RunState
from .serverconn import run_server, token_for, wait_for_server
from .signals import StopSignals
from .version import __version__
from .worker import Job, Worker, WorkerContext, plan_ahead

logger = logging.getLogger(__name__)

MAX_HISTORY_POINTS = 4000  # TrainResult.history (throughput plots) stays this small however long the run
KB_READ_ATTEMPTS = 5  # a checkpoint's reads of the knowledge base: about 2 s of retries, then the last record holds


@dataclass(frozen=True)
class _GoodPoint:
    """Where a rollback takes the run: the last checkpoint whose knowledge-base check passed (or the state this call
    started from), and the journal's size right after it (after that checkpoint's compaction)."""

    name: str  # for messages: "ckpt-00000004.json", or "the start of this call ..."
    position: StreamPosition
    counters: Counters
    failures: list[FailedSample]
    record: KnowledgeBaseRecord | None
    journal_size: int


@dataclass(frozen=True)
class ServerOffers:
    """What the run's server offers, asked once it answers: how the samples travel."""

    idempotency: bool = False
    learn_batch: bool = False  # whole samples in keyed learn-batch requests (offered, and not turned off)
    learn_batches: bool = False  # ... several per request

    @classmethod
    def of(cls, probe: KatoClient, settings: ClientConfig) -> ServerOffers:
        learn_batch = settings.learn_batch and probe.supports_learn_batch
        return cls(probe.supports_idempotency, learn_batch, learn_batch and probe.supports_learn_batches)

    @property
    def batch_endpoint(self) -> str:
        """Where new batch requests go. The keys of /learn-batches differ from /learn-batch's, so a sample
        journaled under one endpoint is always finished on that one."""
        return "batches" if self.learn_batches else "batch"

    def capacity(self, config: RunConfig) -> int:
        """Samples outstanding at most: a worker takes what is ready, up to a request's worth, when requests carry
        several samples."""
        if self.learn_batches:
            return config.num_workers * (config.client.samples_per_request + 1) + 2
        return 2 * config.num_workers + 2


class CheckpointCadence:
    """When an interval checkpoint is due: once ``every`` samples finished since the last one, or ``every_seconds``
    after it when any did (a call that only waits for its server writes none)."""

    def __init__(self, every: int, every_seconds: float | None, clock: Clock) -> None:
        self.every, self.every_seconds, self.clock = every, every_seconds, clock
        self.since = 0  # samples finished since the last checkpoint
        self.last = clock.monotonic()  # when the last checkpoint was written (or the call started)

    def finished(self) -> None:
        self.since += 1

    def due(self) -> bool:
        if self.since >= self.every:
            return True
        return (self.every_seconds is not None and self.since > 0
                and self.clock.monotonic() - self.last >= self.every_seconds)

    def restart(self) -> None:
        """A checkpoint was written (or skipped): the next one is due after another interval."""
        self.since, self.last = 0, self.clock.monotonic()


class ProgressHistory:
    """``TrainResult.history``: a point every ``every`` seconds of the call. At ``max_points`` every second point
    goes and the interval doubles, so a call of any length keeps a bounded, evenly spaced record."""

    def __init__(self, clock: Clock, start: float, max_points: int = MAX_HISTORY_POINTS) -> None:
        self.clock, self.start, self.max_points = clock, start, max_points
        self.points: list[ProgressPoint] = []
        self.every = 1.0
        self.last = start

    def due(self) -> bool:
        return self.clock.monotonic() - self.last >= self.every

    def record(self, position: int, samples_trained: int, tokens: int) -> None:
        self.last = self.clock.monotonic()
        if len(self.points) >= self.max_points:
            self.points = self.points[::2]  # thinned evenly: days of training keep a bounded, even record
            self.every *= 2
        self.points.append(ProgressPoint(elapsed_seconds=round(self.last - self.start, 3), position=position,
                                         samples_trained=samples_trained, tokens=tokens))


class _Run:
    """One call of train() once its server answered and its resume is planned: the dispatcher's side."""

    def __init__(self, config: RunConfig, plan: ResumePlan, *, server_url: str, embedded: bool,
                 offers: ServerOffers, kb_client: KatoClient, rundir: RunDir, tokenizer: Callable[[str], list[str]],
                 signals: StopSignals, outage: OutageTracker, workers: list[Worker],
                 freeze_heap_again: Callable[[], None], progress: bool, clock: Clock) -> None:
        self.config, self.plan, self.server_url, self.embedded = config, plan, server_url, embedded
        self.offers = offers
        self.kb_client = kb_client  # the checkpoints' reads of the KB: a few tries, never waiting out an outage
        self.rundir, self.store = rundir, rundir.checkpoints
        self.tokenizer = tokenizer
        self.signals = signals  # Ctrl-C, SIGTERM, or the caller's stop event
        # the server's health, for every client of the run; abort() (its server lost for good, the call ending)
        # makes every retry of the run's clients give up at once
        self.outage = outage
        self.workers = workers  # the caller's list: it waits for those a second Ctrl-C left behind
        self.freeze_heap_again = freeze_heap_again  # gcfreeze.frozen_heap's: freezes what was made since, too
        self.progress, self.clock = progress, clock
        self.stop = threading.Event()  # tells the workers to take no more samples
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.outbox: queue.Queue[Outcome] = queue.Queue()
        self.capacity = offers.capacity(config)
        self.fatal: BaseException | None = None  # a worker's fatal error, raised again in the dispatcher
        self.state = plan.progress.run_state(len(config.layers))
        # from a position above 0 the stream opens now: data that ends before it is refused before anything is sent
        self.stream: DatasetStream | None = open_stream(plan, config, self.state.filtered) if plan.prove_start else None
        # checkpoints
        self.sequence = plan.sequence  # of the last checkpoint written
        self.kept = list(plan.kept)  # the checkpoints kept on disk, oldest first: what the journal keeps lines for
        self.checkpoints_written = 0
        self.last_checkpoint: Path | None = None
        self.kb_record = plan.kb_record  # the last good record: what the KB must hold at least
        # (worker, level) -> the first pattern that worker's samples learned there since the last check
        self.probe_names: dict[tuple[int, int], str] = {}
        self.kb_read_failed = False  # the last attempt to read the KB failed (the server is not answering)
        # time
        self.t0 = clock.monotonic()
        self.cadence = CheckpointCadence(config.checkpoint_every, config.checkpoint_every_seconds, clock)
        self.history = ProgressHistory(clock, self.t0)
        self.metrics = MetricsLog(config.run_dir, clock=clock)
        self.bar: Any = None  # tqdm's progress bar, when asked for (execute)
        self.outage_shown: str | None = None  # what the bar says of the server's outage
        if plan.discard_journal:  # a run that trained nothing: its journal pins nothing
            rundir.journal_path.unlink(missing_ok=True)
        self.journal = Journal(config.run_dir, {"run_name": config.run_name, "config": config.model_dump(mode="json"),
                                                "dataset": plan.dataset.model_dump(mode="json")})
        self.good = self._start_point()

    # -- checkpoints --------------------------------------------------------------------------------------
    @property
    def node_ids(self) -> list[str]:
        return [self.config.node_id(level) for level in range(len(self.config.layers))]

    @property
    def kb_where(self) -> str:
        return str(self.rundir.kb_path) if self.embedded else self.server_url

    def _start_point(self) -> _GoodPoint:
        """The state this call started from, as a rollback's target (the journal was just opened)."""
        plan, size = self.plan, self.journal.size
        if plan.checkpoint is not None and plan.checkpoint_path is not None:
            ckpt = plan.checkpoint
            return _GoodPoint(f"the start of this call (resumed from {plan.checkpoint_path.name})", ckpt.position,
                              ckpt.counters, list(ckpt.failures), self.kb_record, size)
        levels = len(self.config.layers)
        return _GoodPoint("the start of this call", StreamPosition(raw_offset=0), Counters(patterns_learned=[0] * levels),
                          [], self.kb_record, size)

    def checkpoint(self, reason: str, error: str | None = None, cause: BaseException | None = None) -> Path | None:
        """Check the knowledge base against the last good record, then write a checkpoint of the run's state.

        Raises KnowledgeBaseMismatch when the KB changed (the caller rolls the run back: ``_roll_back``). When the
        KB cannot be read, nothing is known of the samples finished since the last good checkpoint: an interval
        checkpoint is skipped, an interrupt or error one repeats the last good one (``_unchecked_checkpoint``), and
        the end raises (a run never ends unchecked)."""
        upto = self.journal.size  # the lines a resume from this checkpoint may count: those written before the check
        record = self._checked_record(reason, cause)
        if record is None:
            return self._unchecked_checkpoint(reason, error)
        state = self.state
        position = state.position()
        position.state_dict = self._stream_state(position.raw_offset)
        ckpt, path = self._save(reason, error, position, state.snapshot_counters(), state.failure_list(), record)
        # what a resume from any kept checkpoint needs: a fallback to an older one (a newer damaged) stays exact
        size = self.journal.compact(*journal_to_keep(self.kept), upto)
        self.good = _GoodPoint(path.name, ckpt.position, ckpt.counters, ckpt.failures, record, size)
        self.cadence.restart()
        return path

    def _save(self, reason: str, error: str | None, position: StreamPosition, counters: Counters,
              failures: list[FailedSample], record: KnowledgeBaseRecord | None) -> tuple[Checkpoint, Path]:
        self.sequence = max(self.sequence + 1, self.store.next_sequence())
        call_elapsed = self.clock.monotonic() - self.t0
        ckpt = Checkpoint(
            library_version=__version__,
            sequence=self.sequence,
            run_name=self.config.run_name,
            config=self.config,
            position=position,
            counters=counters,
            failures=failures,
            reason=reason,
            error=error,
            started_at=self.plan.started_at,
            created_at=self.clock.now(),
            elapsed_seconds=self.plan.elapsed_before + call_elapsed,
            server=ServerInfo(url=None if self.embedded else self.server_url, embedded=self.embedded,
                              idempotency=self.offers.idempotency),
            knowledge_base=record,
            dataset=self.plan.dataset,
        )
        path = self.store.save(ckpt)
        self.kept = (self.kept + [KeptCheckpoint.of(ckpt)])[-self.config.keep_checkpoints:]
        self.checkpoints_written += 1
        self.last_checkpoint = path
        logger.info("checkpoint %s (%s) at raw position %d", path.name, reason, position.raw_offset)
        event: Event = "checkpoint" if reason == "interval" else reason  # type: ignore[assignment]
        self._metrics_row(event, detail=error or path.name, call_elapsed=call_elapsed)
        return ckpt, path

    def _checked_record(self, reason: str, cause: BaseException | None) -> KnowledgeBaseRecord | None:
        """What the KB holds now, compared with the last good record before it is replaced; None when it cannot
        be read. The patterns learned since the last check must be there too (kbcheck.py says why)."""
        if reason == "error" and (self.kb_read_failed or _server_failing(cause)):
            return None  # the server is not answering: reading would only wait out another budget
        learned = [Learned(level, self.config.node_id(level), name) for (_, level), name in self.probe_names.items()]
        try:
            found = read_knowledge_base(self.kb_client, self.node_ids, self.kb_record, learned)
        except StreamtrainError as exc:
            self.kb_read_failed = True
            # a few tries only (KB_READ_ATTEMPTS, not a setting of the user's): say the server's failure, not the cap
            why = getattr(exc, "last_cause", None) or exc
            if reason == "end":
                raise ServerUnavailable(
                    f"could not read the knowledge base at {self.kb_where} to check it before the end checkpoint "
                    f"({why}); the run stops unchecked instead of ending. Run the same command again once the server "
                    "answers: it checks the knowledge base and ends from the last good checkpoint and the journal"
                ) from exc
            logger.warning("could not read the knowledge base at %s to check it for the %s checkpoint (%s); the "
                           "next checkpoint tries again", self.kb_where, reason, why)
            return None
        self.kb_read_failed = False
        problems = knowledge_base_problems(self.kb_record, found, learned)
        if problems:
            raise KnowledgeBaseMismatch(f"the knowledge base at {self.kb_where} changed, found at the {reason} "
                                        "checkpoint:\n  " + "\n  ".join(problems), problems=problems)
        self.kb_record, self.probe_names = next_record(found), {}
        return self.kb_record

    def _unchecked_checkpoint(self, reason: str, error: str | None) -> Path | None:
        """The KB could not be read, so the samples finished since the last good point are unchecked; no checkpoint
        moves the position past them. An interval checkpoint is skipped (the next is due after another interval).
        An interrupt or error one repeats the last good point: on a server with idempotency keys the run is rolled
        back to it (the journal cut back, as ``_roll_back`` argues), which costs only replays that the server
        answers from its record; without keys the journal, neither compacted nor cut, keeps those samples for the
        next call (replaying them there would learn them twice)."""
        self.cadence.restart()
        g = self.good
        if reason == "interval":
            logger.warning("checkpoint skipped: the knowledge base could not be read to check it (the journal keeps "
                           "the samples finished since %s)", g.name)
            return None
        note = f"the knowledge base could not be read to check the samples finished since {g.name}"
        cut = self._cut_journal_back() if self.offers.idempotency else None
        if self.offers.idempotency and cut is None:
            note += (": the run is rolled back to it, and the next call trains them again under their idempotency "
                     "keys (the server answers those it holds from its record)")
            self._reset_state_to_good()
        else:
            note += f": this checkpoint repeats its position (raw {g.position.raw_offset}), and the journal keeps them"
        logger.warning("%s checkpoint: %s", reason, note)
        message = f"{error}\n({note})" if error else None
        return self._save(reason, message, g.position, g.counters, g.failures, g.record)[1]

    def _cut_journal_back(self) -> CheckpointError | None:
        """Step 1 of a rollback (``_roll_back``): the journal cut back to the last good point; the error if not."""
        g = self.good
        try:
            self.journal.cut_back(g.journal_size)
        except CheckpointError as exc:
            logger.error("%s", exc)
            return exc
        logger.warning("run %s rolled back to %s: its journal no longer counts the samples finished since",
                       self.config.run_name, g.name)
        return None

    def _reset_state_to_good(self) -> None:
        """The run's state as the last good point describes it (for the metrics row and the result); once the
        workers are stopped, whose outcomes would otherwise land in it."""
        g = self.good
        levels = len(self.config.layers)
        self.state = RunState(levels, g.position.raw_offset, set(g.position.done_above), g.counters, g.failures)

    def _check_after_session_loss(self, client: KatoClient, node_id: str) -> None:
        """In a worker that lost its session on ``node_id``, before it makes a new one: a server restarted on
        another database loses them, so the KB is compared with the last good record (no sample of the worker's is
        finished meanwhile). Raises KnowledgeBaseMismatch, which stops the run like any fatal worker error."""
        record = self.kb_record
        found = read_knowledge_base(client, self.node_ids, record)
        problems = knowledge_base_problems(record, found)
        if problems:
            raise KnowledgeBaseMismatch(f"the knowledge base at {self.kb_where} changed, found when a session on node "
                                        f"{node_id} was lost:\n  " + "\n  ".join(problems), problems=problems)
        logger.info("node %s: a session was lost; the knowledge base is still the run's", node_id)

    def _roll_back(self, found: KnowledgeBaseMismatch, stopped_on: BaseException | None = None) -> NoReturn:
        """The KB changed during this call: take the run back to its last good point, and raise.

        Samples finished since the last good checkpoint may have gone to a KB that does not keep them (another
        database, a cleared node), and the journal says they are finished: a resume would skip them. So:

        1. The journal is cut back to the part the last good checkpoint's compaction wrote from the lines written
           before its check (or to its size at this call's start) and closed, durably: the lines written since no
           longer count, and no worker can append another.
        2. The workers stop (each finishes its request; its journal lines are refused).
        3. An ``error`` checkpoint repeats the last good point (position, counters, failures, KB record) with the
           message, so ``inspect`` shows what happened.

        A SIGKILL at any moment leaves a resumable, exact run. Before step 1 the files are those of a trainer killed
        before it noticed the change: the resume compares the KB with the last good record as it always does. From
        step 1 on they are the last good checkpoint with the journal as it stood at that checkpoint's check (or the
        files this call started from): what a trainer killed at that moment leaves, so it resumes exactly from that
        checkpoint once the right KB is back (with idempotency keys, samples it replays that the restored copy holds
        are answered from the server's record).
        Step 3 is one atomic rename, and its checkpoint holds what the last good one holds; no checkpoint written
        since moves the position past it (every checkpoint's position was checked). A failed cut writes no
        checkpoint and says to move the journal aside.
        """
        g = self.good
        reached = self.state.mark
        cut = self._cut_journal_back()
        self._stop_workers(self.workers, finish_queued=False)
        also = f" (found while the run stopped on {type(stopped_on).__name__}: {stopped_on})" if stopped_on else ""
        if self.embedded:
            restore = f"restore {self.kb_where} (with its -wal file if it has one) from a copy made at or after {g.name}"
        else:
            restore = (f"restart the server at {self.kb_where} on the database that holds this run's knowledge base, "
                       f"or restore that database from a copy made at or after {g.name} (server_url may also point at "
                       "the right server)")
        if not self.offers.idempotency:
            restore += (". This server has no idempotency keys: samples that the restored copy already holds from "
                        f"after {g.name} are learned a second time")
        if cut is not None:
            rolled = (f"The run could not be rolled back: {cut}. Move {self.journal.path} aside before the next call, "
                      f"which then resumes from {g.name} alone (exact with idempotency keys).")
        else:
            rolled = (f"The run is rolled back from raw position {reached} to {g.name} (raw position "
                      f"{g.position.raw_offset}): the samples finished since may have gone to a knowledge base that "
                      "does not keep them, so they count as not done and the next call trains them again.")
        message = (f"{found}{also}\n{rolled} Ways out: {restore}; then run the same command. Or start the run over "
                   "(streamtrain train --fresh --move-aside; train(config, fresh=True, move_aside=True)).")
        if cut is None:
            self._reset_state_to_good()
            try:
                self._save("error", message, g.position, g.counters, g.failures, g.record)
            except StreamtrainError as exc:
                logger.error("could not write the error checkpoint: %s", exc)
        raise KnowledgeBaseMismatch(message, problems=found.problems) from (stopped_on or found)

    def _metrics_row(self, event: Event, detail: str | None = None, call_elapsed: float | None = None) -> None:
        """A row of metrics.jsonl; a checkpoint's row carries the checkpoint's own time, so the next call's
        clock (which starts from the checkpoint) never runs backwards."""
        c = self.state.snapshot_counters()
        now = self.clock.monotonic() - self.t0 if call_elapsed is None else call_elapsed
        self.metrics.write(event, now, elapsed_seconds=self.plan.elapsed_before + now, position=self.state.mark,
                           samples_trained=c.samples_trained, samples_filtered=c.samples_filtered,
                           samples_failed=c.samples_failed, tokens=c.tokens, patterns_learned=c.patterns_learned,
                           detail=detail)

    def _stream_state(self, mark: int) -> dict[str, Any] | None:
        """The dataset's exact state at the mark, when the reader stands there (always at the end of a call)."""
        if self.stream is None:
            return self.plan.stream_state if mark == self.plan.start else None
        return self.stream.state_for(mark)

    # -- the loop -----------------------------------------------------------------------------------------
    def _take(self, outcome: Outcome) -> None:
        self.state.finish(outcome)
        for level, name in outcome.names.items():  # each worker learns in the order its outcomes come
            self.probe_names.setdefault((outcome.worker, level), name)

    def _receive(self, block: bool) -> None:
        """Take finished samples; raise on a fatal worker error or too many failures."""
        self.signals.raise_if_pending()  # a third Ctrl-C that came inside a library holding a lock
        self.outage.check()  # aborted: the run's embedded server is lost for good
        try:
            outcome = self.outbox.get(timeout=0.2) if block else self.outbox.get_nowait()
        except queue.Empty:
            self._show_outage()
            return
        while True:
            if outcome.fatal is not None:
                self.fatal = self.outage.abort_cause or outcome.fatal  # a worker's error after an abort is the abort's
                raise self.fatal
            self._take(outcome)
            self.cadence.finished()
            self.state.check_failures(self.config.run_name, self.config.max_failures, outcome if outcome.error else None)
            try:
                outcome = self.outbox.get_nowait()
            except queue.Empty:
                break
        self._after_progress()

    def _after_progress(self) -> None:
        c = self.state.counters
        if self.bar is not None:
            self.bar.update(self.state.mark - self.bar.n)
            self.bar.set_postfix(trained=c.samples_trained, failed=c.samples_failed,
                                 ckpt=self.last_checkpoint.name if self.last_checkpoint else "-", refresh=False)
        if self.history.due():
            self._record_point()
        if self.cadence.due():
            self.checkpoint("interval")  # its metrics row, when one is due, stands for this moment's progress row
        if self.metrics.due(self.clock.monotonic() - self.t0):
            self._metrics_row("progress")

    def _show_outage(self) -> None:
        """While the server fails, the bar says so in its description, counting down the outage budget."""
        if self.bar is None:
            return
        status = self.outage.status()
        if status != self.outage_shown:
            self.outage_shown = status
            self.bar.set_description(f"{self.config.run_name}: {status}" if status else self.config.run_name)

    def _record_point(self) -> None:
        c = self.state.counters
        self.history.record(self.state.mark, c.samples_trained, c.tokens)

    def _wait_for_room(self) -> bool:
        """Block until fewer than ``capacity`` samples are outstanding; False when a stop was asked for."""
        stop = self.signals.stop
        while self.state.outstanding >= self.capacity and not stop.is_set():
            self._receive(block=True)
        return not stop.is_set()

    def _dispatch_retries(self) -> None:
        """Failed samples of earlier calls first (the plan's), each from the first step that did not take effect."""
        retries = self.plan.progress.retries()
        if retries:
            logger.info("run %s: retrying %d failed sample(s)", self.config.run_name, len(retries))
        for failed, recovery in retries:
            text = self._read_record(failed.raw_index)
            if not self._wait_for_room():
                return
            self.state.dispatch_retry(failed.raw_index)
            self.inbox.put(Job(failed.raw_index, text, recovery, retry=failed))
            self._receive(block=False)

    def _read_record(self, raw_index: int) -> str:
        with DatasetStream(self.config.dataset, start=raw_index, stop=raw_index + 1,
                           first_records_check=False) as stream:
            for _, text in stream:
                return text
        raise DatasetError(
            f"raw record {raw_index} (a failed sample to retry) is no longer a sample of dataset "
            f"{self.config.dataset.path!r}: the data changed in place. Restore it, or start the run over."
        )

    def _dispatch_all(self) -> None:
        """The plan's retries, then the stream from the plan's start: every record not finished already."""
        self._dispatch_retries()
        cfg, st, plan = self.config, self.state, self.plan
        if self.signals.stop.is_set():
            return
        if plan.at_limit:  # said: a lowered max_samples un-trains nothing
            logger.warning("run %s is already at raw position %d, at or past max_samples=%d: no record to read (raise "
                           "max_samples to train further)", cfg.run_name, plan.start, cfg.max_samples)
            return
        stream = self.stream
        if stream is None:  # else opened at the start of the call, at the checkpoint's position
            stream = self.stream = open_stream(plan, cfg, st.filtered)
        self.freeze_heap_again()  # the dataset's objects too (datasets imports much of itself on opening a stream)
        progress = plan.progress
        for raw_index, text in stream:
            if progress.is_finished(raw_index):  # finished above the checkpoint's position, or since (the journal)
                st.skip_to(raw_index + 1)
                continue
            # learn-batches workers mostly wait for big answers: plan for them meanwhile (a worker sending a request
            # per chunk would wait for the GIL this takes when its answer comes: it plans its own samples)
            planned = plan_ahead(text, self.tokenizer, cfg.layers) if self.offers.learn_batches else None
            if not self._wait_for_room():
                return  # this record was read, not dispatched: the position stays below it
            st.dispatch(raw_index)
            self.inbox.put(Job(raw_index, text, progress.recovery(raw_index), planned=planned))
            self._receive(block=False)
        st.skip_to(stream.position)

    def _stop_workers(self, workers: list[Worker], finish_queued: bool) -> None:
        """Wait for the workers: each finishes the sample it holds; queued ones too if ``finish_queued``.

        Samples not finished stay in flight, so the checkpoint's position stays below them. A stop signal while
        waiting turns a normal end into a stop; a second one stops waiting.
        """
        self._release_workers(workers, finish_queued)
        announced = False
        for w in workers:
            while w.is_alive():
                if self.signals.stop.is_set() and not self.stop.is_set():
                    self.stop.set()
                if self.signals.stop.is_set() and not announced:  # only when somebody pressed Ctrl-C
                    announced = True
                    # in an outage the samples in flight wait for the server, for as long as its budget allows
                    failing = self.outage.status(blips=True)
                    logger.warning("waiting for the workers to finish their current sample%s (Ctrl-C again: stop "
                                   "without waiting; the next run replays those samples from the journal)",
                                   f", which waits for the {failing}" if failing else "")
                if self.signals.abandon.is_set():
                    logger.warning("not waiting for the in-flight samples: the next run replays them from the journal")
                    self._drain_quietly()
                    return
                self.signals.raise_if_pending()
                w.join(timeout=0.2)
                self._drain_quietly()
                self._show_outage()
        self._drain_quietly()

    def abort_retries(self, why: str) -> None:
        _abort_retries(self.outage, self.config.run_name, self.server_url, why)

    def _release_workers(self, workers: list[Worker], finish_queued: bool) -> None:
        """No more samples come: each worker ends after the sample it holds (after the queued ones too, if asked)."""
        if not finish_queued:
            self.stop.set()
        for _ in workers:
            self.inbox.put(None)

    def _drain_quietly(self) -> None:
        while True:
            try:
                outcome = self.outbox.get_nowait()
            except queue.Empty:
                return
            if outcome.fatal is not None:
                self.fatal = self.fatal or outcome.fatal
                continue
            self._take(outcome)

    def execute(self) -> TrainResult:
        cfg = self.config
        self._metrics_row("resume" if self.plan.resumed else "start")
        if self.progress:
            from tqdm.auto import tqdm

            size = dataset_size(self.plan.dataset)
            total = min(x for x in (cfg.max_samples, size) if x is not None) if (cfg.max_samples or size) else None
            self.bar = tqdm(total=total, initial=self.plan.start, desc=cfg.run_name, unit="rec", dynamic_ncols=True)
        workers = self.workers
        try:
            try:
                ctx = WorkerContext(config=cfg, server_url=self.server_url, token=token_for(self.server_url, cfg),
                                     tokenizer=self.tokenizer, journal=self.journal, learn_batch=self.offers.learn_batch,
                                     learn_batches=self.offers.learn_batches, batch_endpoint=self.offers.batch_endpoint,
                                     inbox=self.inbox, outbox=self.outbox, stop=self.stop, outage=self.outage,
                                     on_session_lost=self._check_after_session_loss)
                workers.extend(Worker(ctx, i) for i in range(cfg.num_workers))
                for w in workers:
                    w.start()
                self._dispatch_all()
                if self.signals.stop.is_set():
                    logger.warning("run %s interrupted: finishing in-flight samples, then checkpointing", cfg.run_name)
                self._stop_workers(workers, finish_queued=not self.signals.stop.is_set())
                self.outage.check()
                if self.fatal is not None:
                    raise self.fatal
                # failures of the last samples, taken while the workers finished
                self.state.check_failures(cfg.run_name, cfg.max_failures)
                reason: Literal["end", "interrupt"] = "interrupt" if self.signals.stop.is_set() else "end"
                self._record_point()
                self.checkpoint(reason)
                self._finish_bar(reason)
            except KeyboardInterrupt:
                self._release_workers(workers, finish_queued=False)
                logger.warning("run %s stopped at once, without a checkpoint: the next run resumes exactly from "
                               "the last checkpoint and the journal", cfg.run_name)
                raise
            except BaseException as exc:
                self.abort_retries(f"{type(exc).__name__}")  # no worker waits for the server any more
                if isinstance(exc, KnowledgeBaseMismatch):  # found during this call
                    self._roll_back(exc)
                self._stop_workers(workers, finish_queued=False)
                try:
                    self.checkpoint("error", error=f"{type(exc).__name__}: {exc}", cause=exc)
                except KnowledgeBaseMismatch as found:
                    self._roll_back(found, stopped_on=exc)
                except StreamtrainError as ckpt_exc:
                    logger.error("could not write the error checkpoint: %s", ckpt_exc)
                raise
        finally:
            self.journal.close()
            if self.bar is not None:
                self.bar.close()
        return self._result(reason)

    def _finish_bar(self, reason: str) -> None:
        """A finished run's bar stands at its end: 100%, also when the stream ended before ``total``."""
        bar = self.bar
        if bar is None:
            return
        mark = self.state.mark
        if reason == "end" and (bar.total is None or mark < bar.total):
            bar.total = mark
        bar.update(mark - bar.n)
        bar.refresh()

    def _result(self, reason: Literal["end", "interrupt"]) -> TrainResult:
        c, before = self.state.counters, self.plan.progress.counters
        elapsed = self.clock.monotonic() - self.t0
        new_samples = c.samples_trained + c.samples_failed - (before.samples_trained + before.samples_failed)
        new_tokens = c.tokens - before.tokens
        return TrainResult(
            run_name=self.config.run_name, reason=reason, resumed=self.plan.resumed,
            start_position=self.plan.start, final_position=self.state.mark,
            samples_trained=c.samples_trained, samples_filtered=c.samples_filtered, samples_failed=c.samples_failed,
            filter_reasons=c.filter_reasons.model_copy(),
            tokens=c.tokens, patterns_learned=list(c.patterns_learned), new_samples=new_samples, new_tokens=new_tokens,
            elapsed_seconds=elapsed, samples_per_second=new_samples / elapsed if elapsed else 0.0,
            tokens_per_second=new_tokens / elapsed if elapsed else 0.0, num_workers=self.config.num_workers,
            checkpoints_written=self.checkpoints_written, last_checkpoint=self.last_checkpoint,
            server_url=self.server_url, server_idempotency=self.offers.idempotency, failures=self.state.failure_list(),
            history=self.history.points,
        )


def _server_failing(exc: BaseException | None) -> bool:
    """The server is down or failing (no answer within the budget, a 5xx): not worth another read."""
    return isinstance(exc, ServerUnavailable) or (isinstance(exc, ProtocolError) and (exc.status_code or 0) >= 500)


def train(config: RunConfig, *, fresh: bool = False, move_aside: bool = False, progress: bool = True,
          stop: threading.Event | None = None, resend_in_doubt: bool = False) -> TrainResult:
    """Train ``config``'s run: resume from its newest valid checkpoint (and journal), or start it.

    ``fresh=True`` refuses to start over existing checkpoints unless ``move_aside=True`` moves the run's folder
    aside first (a run that trained nothing yet starts over without it). Raising ``max_samples`` continues a
    finished run from where it ended; samples that failed (rejected for their content) are retried first. Returns
    a TrainResult; on Ctrl-C or SIGTERM it finishes in-flight samples, writes an ``interrupt`` checkpoint and
    returns; on an error (the server's faults included) it writes an ``error`` checkpoint and re-raises.

    ``stop``: setting this event (from any thread) is one Ctrl-C: the way to stop a call running in a background
    thread, where no signal reaches it. A Ctrl-C in the main thread sets it too. Set before the server answers at
    start-up, it raises KeyboardInterrupt (nothing was trained).

    The embedded server (no ``server_url``) runs in a process group of its own, so a Ctrl-C or SIGTERM sent to the
    whole group reaches only this process; it is restarted when it dies (docs/trainer.md).

    ``resend_in_doubt=True`` sends samples in doubt again even when the server may no longer hold the keys that
    would decide them (a resume after its key lifetime; refused with StepsInDoubt otherwise): they may be learned
    twice.
    """
    config = config.with_overrides()  # a config changed with model_copy(update=...) was never validated
    if fresh:
        RunDir(config.run_dir).start_fresh(config.run_name, move_aside)
    held = ExitStack()
    held.enter_context(CheckpointStore(config.run_dir, keep=config.keep_checkpoints).lock())
    outage = OutageTracker(config.client.outage_seconds)
    workers: list[Worker] = []  # the call's worker threads: the lock waits for those a second Ctrl-C left behind
    server: tuple[str, bool] | None = None
    try:
        with run_server(config, on_lost=outage.abort) as server:
            url, embedded = server
            return _call(config, url, embedded, progress=progress, stop=stop, outage=outage,
                         resend_in_doubt=resend_in_doubt, workers=workers, clock=SYSTEM)
    finally:
        if server is not None:  # workers left behind by a second Ctrl-C stop waiting for the server
            _abort_retries(outage, config.run_name, server[0], "its call ended")
        _release_lock(held, workers if server is not None and not server[1] else [], config.run_name)


def _call(config: RunConfig, url: str, embedded: bool, *, progress: bool, stop: threading.Event | None,
          outage: OutageTracker, resend_in_doubt: bool, workers: list[Worker], clock: Clock) -> TrainResult:
    """One call on the run's server: wait for it to answer, plan the resume (``resume.plan_resume``), train."""
    tokenizer = get_tokenizer(config.tokenizer)
    rundir = RunDir(config.run_dir, keep=config.keep_checkpoints)
    signals = StopSignals(stop)
    with signals.installed(), frozen_heap() as freeze_heap_again:  # stop signals: requests (StopSignals)
        token = token_for(url, config)
        # checkpoint-time reads of the KB try a few times only: the dispatcher must not wait out an outage there
        attempts = min(KB_READ_ATTEMPTS, config.client.retry_max_attempts or KB_READ_ATTEMPTS)
        quick = config.client.model_copy(update={"retry_max_attempts": attempts})
        kb_client = KatoClient(url, token=token, settings=quick, outage=outage)
        try:
            wait_for_server(url, token, config.client, signals.stop, outage)
            with KatoClient(url, token=token, settings=config.client, outage=outage) as probe:
                offers = ServerOffers.of(probe, config.client)
                plan = plan_resume(config, rundir, probe, embedded=embedded, server_url=url,
                                   resend_in_doubt=resend_in_doubt, now=clock.now())
            logger.info("run %s: %s", config.run_name, plan.why)
            logger.debug("run %s: resume checks: %s", config.run_name, "; ".join(plan.checks))
            run = _Run(config, plan, server_url=url, embedded=embedded, offers=offers, kb_client=kb_client,
                       rundir=rundir, tokenizer=tokenizer, signals=signals, outage=outage, workers=workers,
                       freeze_heap_again=freeze_heap_again, progress=progress, clock=clock)
            return run.execute()
        finally:
            kb_client.close()


def _abort_retries(outage: OutageTracker, run_name: str, url: str, why: str) -> None:
    """The call is ending: no client of it waits for the server any more (a sample left in a retry stays
    unfinished; the next call replays it from the journal)."""
    outage.abort(ServerUnavailable(f"run {run_name} is stopping ({why}): not waiting for the server at {url} any more"))


def _release_lock(held: ExitStack, workers: list[Worker], name: str) -> None:
    """Release the run's lock; after a second Ctrl-C, only once the workers left behind have stopped.

    Those workers may still be sending their last request (retries included): a new call of the same run must not
    replay that sample beside it, on a server without idempotency. (The caller passes none for the embedded server:
    it stopped with the call, and it has idempotency keys anyway.)
    """
    stragglers = [w for w in workers if w.is_alive()]
    if not stragglers:
        held.close()
        return

    def release() -> None:
        for w in stragglers:
            w.join()
        held.close()
        logger.info("run %s: the workers left behind have stopped; its lock is free", name)

    threading.Thread(target=release, name="streamtrain-lock-release", daemon=True).start()


def train_parallel(config: RunConfig, num_workers: int, **kwargs: Any) -> TrainResult:
    """:func:`train` with ``num_workers`` worker threads (each with its own client and sessions)."""
    return train(config.with_overrides(num_workers=num_workers), **kwargs)
