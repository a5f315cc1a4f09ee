"""The main job: stream a dataset, learn each sample up the hierarchy, checkpoint, resume exactly.

One engine serves ``train`` and ``train_parallel``: the calling thread reads the stream and dispatches samples to
N worker threads, each with its own client and its own session per level; completions come back out of order.

Exactness, in three parts (each argued where its code is):

* **Position.** The checkpointed position is the low-water mark: the first raw index not yet finished. Finished
  samples above it are listed in the checkpoint (``done_above``), so a resume neither skips an unfinished sample
  nor re-trains a finished one. At most ``2 * N + 2`` samples are outstanding, so that list and memory stay small
  however long the stream.
* **Steps.** A sample is a fixed plan of learns (``hierarchy.plan_sample``); each learn is applied exactly once by
  ``client.NodeSession.learn_unit`` through faults, retries and server restarts.
* **Trainer crashes.** Before each request the worker appends a line to the journal (``journal.py``); a resumed
  run reads it to skip samples finished since the checkpoint and to find which step of each in-flight sample took
  effect (idempotency keys replay harmlessly; without them the recorded session's STM tells).

Counters follow the same rule: a sample's counts are added once, when it finishes (or from its journal ``fin``
line after a crash), and ``samples_filtered`` is derived from the position, so no count is lost or doubled.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from . import __version__
from .checkpoint import Checkpoint, CheckpointStore, Counters, FailedSample, ServerInfo, StreamPosition
from .client import KatoClient, NodeSession, unit_took_effect
from .config import RunConfig, check_resume
from .errors import (
    CheckpointError,
    ConfigRejected,
    ProtocolError,
    ServerUnavailable,
    SessionLost,
    StreamtrainError,
    TooManyFailures,
)
from .hierarchy import Step, plan_sample, sample_key, step_key
from .journal import Journal, SampleRecord, read_journal
from .stream import DatasetStream
from .tokenize import get_tokenizer

logger = logging.getLogger(__name__)

# Errors that say the server or its setup is unusable: retrying other samples would only fail them all.
FATAL_ERRORS = (ServerUnavailable, ConfigRejected, SessionLost, CheckpointError)

# Training sessions live a day (the idempotency keys' default lifetime too): a trainer killed mid-step and resumed
# within that time can still read its old sessions' STM to decide whether the step took effect.
SESSION_TTL_SECONDS = 86400

MAX_HISTORY_POINTS = 4000  # TrainResult.history (throughput plots) stays this small however long the run


class ProgressPoint(BaseModel):
    elapsed_seconds: float
    position: int
    samples_trained: int
    tokens: int


class TrainResult(BaseModel):
    """What a call of :func:`train` did, and where the run stands."""

    run_name: str
    reason: Literal["end", "interrupt"]
    resumed: bool
    start_position: int = Field(description="Raw stream position this call started from.")
    final_position: int = Field(description="Raw stream position of the last checkpoint (first unfinished record).")
    samples_trained: int = Field(description="Whole run, all calls.")
    samples_filtered: int
    samples_failed: int
    tokens: int
    patterns_learned: list[int] = Field(description="Learns per level, whole run.")
    new_samples: int = Field(description="Samples finished by this call.")
    new_tokens: int
    elapsed_seconds: float = Field(description="This call.")
    samples_per_second: float
    tokens_per_second: float
    num_workers: int
    checkpoints_written: int
    last_checkpoint: Path | None
    server_url: str
    server_idempotency: bool
    failures: list[FailedSample]
    history: list[ProgressPoint]


class _StopSignals:
    """Ctrl-C and SIGTERM during a run, turned into flags that the dispatcher reads where its state is whole.

    An exception raised by a signal handler lands between any two bytecodes: between advancing the read position
    and marking a sample in flight, or between finishing a sample and counting it. The checkpoint written after it
    would then skip that sample or lose its counts. So the first signal only asks the run to stop: no sample is
    dispatched any more, each worker finishes the one it holds, and an 'interrupt' checkpoint is written. The
    second stops waiting for the workers (their samples stay unfinished; the next run replays them from the
    journal). The third raises KeyboardInterrupt at once and no checkpoint is written: the last checkpoint and the
    journal still resume exactly, as after a crash.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self.stop = threading.Event()
        self.abandon = threading.Event()

    def _handle(self, signum: int, frame: Any) -> None:
        # no logging here: the handler may run inside a logging call of the same thread
        self.received += 1
        if self.received == 1:
            self.stop.set()
        elif self.received == 2:
            self.abandon.set()
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread: nothing to catch here
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def _server_for(config: RunConfig) -> Iterator[tuple[str, bool]]:
    """The run's server URL; starts the embedded server (its database beside the checkpoints) when none is given."""
    if config.server_url:
        yield config.server_url, False
        return
    from .server import EmbeddedServer

    config.run_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer(config.run_dir / "kb.sqlite3", log_path=config.run_dir / "server.log") as server:
        logger.info("embedded server for run %s at %s", config.run_name, server.url)
        yield server.url, True


class _Tracker:
    """Which raw indices are finished: the low-water mark and the finished ones above it."""

    def __init__(self, raw_offset: int, done_above: set[int]):
        self.read_pos = raw_offset
        self.in_flight: set[int] = set()
        self.done_above = set(done_above)

    @property
    def mark(self) -> int:
        return min(self.in_flight) if self.in_flight else self.read_pos

    def finish(self, raw_index: int) -> None:
        self.in_flight.discard(raw_index)
        self.done_above.add(raw_index)
        mark = self.mark
        self.done_above = {i for i in self.done_above if i >= mark}


@dataclass
class _Outcome:
    raw_index: int
    tokens: int = 0
    learns: list[int] = field(default_factory=list)
    error: str | None = None
    fatal: BaseException | None = None  # raised again in the dispatcher: the run cannot go on


class _Worker(threading.Thread):
    """One client, one session per level; takes samples until told to stop."""

    def __init__(self, run: _Run, number: int):
        super().__init__(name=f"streamtrain-worker-{number}", daemon=True)
        self.run_ = run
        self.client = KatoClient(run.server_url, token=run.config.server_token, settings=run.config.client)
        self.sessions = self._new_sessions()

    def _new_sessions(self) -> list[NodeSession]:
        cfg = self.run_.config
        return [NodeSession(self.client, cfg.node_id(level), layer.session_config(), ttl_seconds=SESSION_TTL_SECONDS)
                for level, layer in enumerate(cfg.layers)]

    def run(self) -> None:
        run = self.run_
        clean = True  # no sample left half done: the sessions can go
        try:
            while not run.stop.is_set():
                item = run.inbox.get()
                if item is None or run.stop.is_set():
                    break  # an item left here stays unfinished: the position cannot pass it
                raw_index, text, recovery = item
                try:
                    outcome = self._train_sample(raw_index, text, recovery)
                except BaseException as exc:  # e.g. the journal cannot be written: the dispatcher must hear of it
                    outcome = _Outcome(raw_index=raw_index, fatal=exc)
                clean = outcome.fatal is None
                run.outbox.put(outcome)
        finally:
            if clean:
                for s in self.sessions:
                    s.close()
            # else the sessions stay (until their TTL): the next run may read their STM to finish the sample
            self.client.close()

    def _train_sample(self, raw_index: int, text: str, recovery: SampleRecord | None) -> _Outcome:
        run = self.run_
        cfg = run.config
        tokens: list[str] = []
        try:
            tokens = run.tokenizer(text)
            steps = plan_sample(tokens, cfg.layers)
            batched = recovery is not None and recovery.last_phase == "batch"
            if steps and (run.learn_batch or batched):
                self._learn_batch(raw_index, steps)
            else:
                first = self._first_step_to_send(raw_index, steps, recovery)
                for step in steps[first:]:
                    session = self.sessions[step.level]
                    key = step_key(cfg.run_name, session.node_id, raw_index, step)
                    on_phase = lambda phase, sid, k=step.index: run.journal.step(raw_index, k, phase, sid)  # noqa: E731
                    session.learn_unit(step.events, key, on_phase=on_phase)
            learns = [0] * len(cfg.layers)
            for step in steps:
                learns[step.level] += 1
            run.journal.finished(raw_index, trained=1, tokens=len(tokens), learns=learns)
            return _Outcome(raw_index=raw_index, tokens=len(tokens), learns=learns)
        except FATAL_ERRORS as exc:
            return _Outcome(raw_index=raw_index, fatal=exc)
        except Exception as exc:  # noqa: BLE001 - a bad sample is recorded, counted and shown, not fatal
            message = f"{type(exc).__name__}: {exc}"
            logger.warning("sample %d failed: %s", raw_index, message)
            # the sessions' STM may hold part of the sample: start the next one from fresh sessions
            for s in self.sessions:
                s.close()
            self.sessions = self._new_sessions()
            run.journal.finished(raw_index, trained=0, tokens=len(tokens), learns=[0] * len(cfg.layers), error=message)
            return _Outcome(raw_index=raw_index, tokens=len(tokens), error=message)

    def _learn_batch(self, raw_index: int, steps: list[Step]) -> None:
        """The whole sample in one keyed request: applied once however often it is sent (also after a crash)."""
        cfg = self.run_.config
        if not self.client.supports_learn_batch:
            raise ProtocolError(
                f"sample {raw_index} was sent as one learn-batch before the last stop, but {self.client.base_url} "
                "does not offer that extension now: it cannot be finished exactly on this server"
            )
        self.run_.journal.step(raw_index, 0, "batch", "")
        names = self.client.learn_batch([(cfg.node_id(s.level), s.events) for s in steps],
                                        sample_key(cfg.run_name, raw_index, steps))
        if names != [s.name for s in steps]:
            raise ProtocolError(f"sample {raw_index}: {self.client.base_url} learned other names than planned")

    def _first_step_to_send(self, raw_index: int, steps: list[Step], recovery: SampleRecord | None) -> int:
        """After a trainer crash: the first step of this sample that did not take effect (journal.py argues why)."""
        if recovery is None or recovery.last_step is None or recovery.last_step >= len(steps):
            return 0
        k = recovery.last_step
        if recovery.last_phase == "learn":
            step = steps[k]
            node_id = self.run_.config.node_id(step.level)
            applied = unit_took_effect(self.client, node_id, recovery.last_session or "", step.events, "learn")
            logger.info("sample %d: step %d's learn %s before the crash", raw_index, k, "took effect" if applied else "did not take effect")
            return k + 1 if applied else k
        # "observe": its learn was never sent; a keyed step replays harmlessly under its idempotency key
        return k


class _Run:
    """State of one call of train(): the dispatcher side."""

    def __init__(self, config: RunConfig, server_url: str, embedded: bool, progress: bool):
        self.config = config
        self.server_url = server_url
        self.embedded = embedded
        self.progress = progress
        self.tokenizer = get_tokenizer(config.tokenizer)
        self.store = CheckpointStore(config.run_dir, keep=config.keep_checkpoints)
        self.stop = threading.Event()  # tells the workers to take no more samples
        self.signals = _StopSignals()
        self.capacity = 2 * config.num_workers + 2
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.journal: Journal  # opened in execute()
        self.checkpoints_written = 0
        self.last_checkpoint: Path | None = None
        self.history: list[ProgressPoint] = []
        self.point_every = 1.0  # seconds between history points; doubles each time the history is thinned
        self.stream: DatasetStream | None = None
        self.workers: list[_Worker] = []

    # -- resume -------------------------------------------------------------------------------------------
    def load_state(self) -> None:
        cfg = self.config
        found = self.store.latest_with_path()
        journal_state = read_journal(cfg.run_dir / "journal.jsonl")
        if found is not None:
            ckpt, path = found
            check_resume(ckpt.config, cfg, path)
            self.resumed = True
            self.sequence = ckpt.sequence
            self.started_at = ckpt.started_at
            self.elapsed_before = ckpt.elapsed_seconds
            self.counters = ckpt.counters.model_copy(deep=True)
            self.failures = list(ckpt.failures)
            raw_offset, done_above = ckpt.position.raw_offset, set(ckpt.position.done_above)
            self.stream_state = ckpt.position.state_dict
            logger.info("resuming run %s from %s at raw position %d", cfg.run_name, path.name, raw_offset)
        else:
            if journal_state.header is not None:
                check_resume(RunConfig.model_validate(journal_state.header["config"]), cfg, cfg.run_dir / "journal.jsonl")
            self.resumed = journal_state.header is not None
            self.sequence = 0
            self.started_at = datetime.now(timezone.utc)
            self.elapsed_before = 0.0
            self.counters = Counters(patterns_learned=[0] * len(cfg.layers))
            self.failures = []
            raw_offset, done_above = 0, set()
            self.stream_state = None
        if len(self.counters.patterns_learned) != len(cfg.layers):
            self.counters.patterns_learned = [0] * len(cfg.layers)
        # what the journal knows beyond the checkpoint: samples finished since, and steps in flight
        self.recovery: dict[int, SampleRecord] = {}
        for raw_index, rec in journal_state.samples.items():
            if raw_index < raw_offset or raw_index in done_above:
                continue
            if rec.finished is not None:
                self._count(_Outcome(raw_index=raw_index, tokens=rec.finished.get("tokens", 0),
                                     learns=rec.finished.get("learns", []), error=rec.finished.get("error")))
                done_above.add(raw_index)
            elif rec.last_step is not None:
                self.recovery[raw_index] = rec
        if self.recovery:
            logger.info("run %s: %d sample(s) were in flight when the last trainer stopped", cfg.run_name, len(self.recovery))
        self.start_position = raw_offset
        self.tracker = _Tracker(raw_offset, done_above)
        self.done_at_start = self.counters.samples_trained + self.counters.samples_failed
        self.tokens_at_start = self.counters.tokens

    def _count(self, outcome: _Outcome) -> None:
        c = self.counters
        c.tokens += outcome.tokens
        if outcome.error is None:
            c.samples_trained += 1
            for level, n in enumerate(outcome.learns[: len(c.patterns_learned)]):
                c.patterns_learned[level] += n
        else:
            c.samples_failed += 1
            self.failures.append(FailedSample(raw_index=outcome.raw_index, error=outcome.error))

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint(self, reason: str, error: str | None = None) -> Path:
        t = self.tracker
        mark = t.mark
        done_above = sorted(i for i in t.done_above if i >= mark)
        finished = self.counters.samples_trained + self.counters.samples_failed
        # every raw index below the mark is finished or was filtered out
        self.counters.samples_filtered = max(0, mark - (finished - len(done_above)))
        self.sequence = max(self.sequence + 1, self.store.next_sequence())
        ckpt = Checkpoint(
            library_version=__version__,
            sequence=self.sequence,
            run_name=self.config.run_name,
            config=self.config,
            position=StreamPosition(raw_offset=mark, done_above=done_above, state_dict=self._stream_state(mark)),
            counters=self.counters,
            failures=self.failures,
            reason=reason,
            error=error,
            started_at=self.started_at,
            created_at=datetime.now(timezone.utc),
            elapsed_seconds=self.elapsed_before + (time.monotonic() - self.t0),
            server=ServerInfo(url=None if self.embedded else self.server_url, embedded=self.embedded,
                              idempotency=self.idempotency),
        )
        path = self.store.save(ckpt)
        self.journal.compact(mark, set(done_above))
        self.checkpoints_written += 1
        self.last_checkpoint = path
        self.since_checkpoint, self.checkpoint_time = 0, time.monotonic()
        logger.info("checkpoint %s (%s) at raw position %d", path.name, reason, mark)
        return path

    def _stream_state(self, mark: int) -> dict[str, Any] | None:
        """The dataset's exact state at the mark, when the reader stands there (always at the end of a call)."""
        if self.stream is None:
            return self.stream_state if mark == self.start_position else None
        return self.stream.state_for(mark)

    def _checkpoint_due(self) -> bool:
        cfg = self.config
        if self.since_checkpoint >= cfg.checkpoint_every:
            return True
        every = cfg.checkpoint_every_seconds
        return every is not None and self.since_checkpoint > 0 and time.monotonic() - self.checkpoint_time >= every

    # -- the loop -----------------------------------------------------------------------------------------
    def _receive(self, block: bool) -> None:
        """Take finished samples; raise on a fatal worker error or too many failures."""
        try:
            outcome = self.outbox.get(timeout=0.2) if block else self.outbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if outcome.fatal is not None:
                self.fatal = outcome.fatal
                raise outcome.fatal
            self.tracker.finish(outcome.raw_index)
            self._count(outcome)
            self.since_checkpoint += 1
            if self.counters.samples_failed > self.config.max_failures:
                raise TooManyFailures(
                    f"run {self.config.run_name}: {self.counters.samples_failed} samples failed, more than "
                    f"max_failures={self.config.max_failures}; the last: raw index {outcome.raw_index}: {outcome.error}. "
                    "Every failure is listed in the checkpoint (streamtrain inspect); fix the cause, or raise max_failures."
                )
            try:
                outcome = self.outbox.get_nowait()
            except queue.Empty:
                break
        self._after_progress()

    def _after_progress(self) -> None:
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.tracker.mark - self.bar.n)
            self.bar.set_postfix(trained=self.counters.samples_trained, failed=self.counters.samples_failed,
                                 ckpt=self.last_checkpoint.name if self.last_checkpoint else "-", refresh=False)
        if now - self.last_point >= self.point_every:
            self._record_point()
        if self._checkpoint_due():
            self.checkpoint("interval")

    def _record_point(self) -> None:
        self.last_point = time.monotonic()
        if len(self.history) >= MAX_HISTORY_POINTS:
            self.history = self.history[::2]  # thinned evenly: days of training keep a bounded, even record
            self.point_every *= 2
        self.history.append(ProgressPoint(elapsed_seconds=round(self.last_point - self.t0, 3), position=self.tracker.mark,
                                          samples_trained=self.counters.samples_trained, tokens=self.counters.tokens))

    def _dispatch_all(self) -> None:
        cfg, t = self.config, self.tracker
        limit = cfg.max_samples
        if limit is not None and t.read_pos >= limit:
            return
        stream = self.stream = DatasetStream(cfg.dataset, start=t.read_pos, state_dict=self.stream_state, stop=limit)
        stop = self.signals.stop
        for raw_index, text in stream:
            if raw_index in t.done_above:
                t.read_pos = raw_index + 1
                continue
            while len(t.in_flight) >= self.capacity and not stop.is_set():
                self._receive(block=True)
            if stop.is_set():
                return  # this record was read, not dispatched: the position stays below it
            # in flight first, then the read position: the mark never passes a sample that is not finished
            t.in_flight.add(raw_index)
            t.read_pos = raw_index + 1
            self.inbox.put((raw_index, text, self.recovery.pop(raw_index, None)))
            self._receive(block=False)
        t.read_pos = max(t.read_pos, stream.position)

    def _stop_workers(self, workers: list[_Worker], finish_queued: bool) -> None:
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
                if self.stop.is_set() and not announced:
                    announced = True
                    logger.warning("waiting for the workers to finish their current sample (Ctrl-C again: stop "
                                   "without waiting; the next run replays those samples from the journal)")
                if self.signals.abandon.is_set():
                    logger.warning("not waiting for the in-flight samples: the next run replays them from the journal")
                    self._drain_quietly()
                    return
                w.join(timeout=0.2)
                self._drain_quietly()
        self._drain_quietly()

    def _release_workers(self, workers: list[_Worker], finish_queued: bool) -> None:
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
            self.tracker.finish(outcome.raw_index)
            self._count(outcome)

    def execute(self) -> TrainResult:
        with self.signals.installed():  # from here on a stop signal is a request the loop answers (_StopSignals)
            return self._execute()

    def _execute(self) -> TrainResult:
        cfg = self.config
        self.load_state()
        with KatoClient(self.server_url, token=cfg.server_token, settings=cfg.client) as probe:
            self.idempotency = probe.supports_idempotency
            self.learn_batch = cfg.client.learn_batch and probe.supports_learn_batch
        self.journal = Journal(cfg.run_dir, {"run_name": cfg.run_name, "config": cfg.model_dump(mode="json")})
        self.t0 = self.checkpoint_time = self.last_point = time.monotonic()
        self.since_checkpoint = 0
        self.fatal: BaseException | None = None
        self.bar = None
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_samples, initial=self.start_position, desc=cfg.run_name, unit="rec",
                            dynamic_ncols=True)
        workers = self.workers
        try:
            try:
                workers.extend(_Worker(self, i) for i in range(cfg.num_workers))
                for w in workers:
                    w.start()
                self._dispatch_all()
                if self.signals.stop.is_set():
                    logger.warning("run %s interrupted: finishing in-flight samples, then checkpointing", cfg.run_name)
                self._stop_workers(workers, finish_queued=not self.signals.stop.is_set())
                if self.fatal is not None:
                    raise self.fatal
                reason: Literal["end", "interrupt"] = "interrupt" if self.signals.stop.is_set() else "end"
                self._record_point()
                self.checkpoint(reason)
            except KeyboardInterrupt:
                self._release_workers(workers, finish_queued=False)
                logger.warning("run %s stopped at once, without a checkpoint: the next run resumes exactly from "
                               "the last checkpoint and the journal", cfg.run_name)
                raise
            except BaseException as exc:
                self._stop_workers(workers, finish_queued=False)
                try:
                    self.checkpoint("error", error=f"{type(exc).__name__}: {exc}")
                except StreamtrainError as ckpt_exc:
                    logger.error("could not write the error checkpoint: %s", ckpt_exc)
                raise
        finally:
            self.journal.close()
            if self.bar is not None:
                self.bar.close()
        return self._result(reason)

    def _result(self, reason: Literal["end", "interrupt"]) -> TrainResult:
        c = self.counters
        elapsed = time.monotonic() - self.t0
        new_samples = c.samples_trained + c.samples_failed - self.done_at_start
        new_tokens = c.tokens - self.tokens_at_start
        return TrainResult(
            run_name=self.config.run_name, reason=reason, resumed=self.resumed,
            start_position=self.start_position, final_position=self.tracker.mark,
            samples_trained=c.samples_trained, samples_filtered=c.samples_filtered, samples_failed=c.samples_failed,
            tokens=c.tokens, patterns_learned=list(c.patterns_learned), new_samples=new_samples, new_tokens=new_tokens,
            elapsed_seconds=elapsed, samples_per_second=new_samples / elapsed if elapsed else 0.0,
            tokens_per_second=new_tokens / elapsed if elapsed else 0.0, num_workers=self.config.num_workers,
            checkpoints_written=self.checkpoints_written, last_checkpoint=self.last_checkpoint,
            server_url=self.server_url, server_idempotency=self.idempotency, failures=list(self.failures),
            history=self.history,
        )


def _start_fresh(config: RunConfig, move_aside: bool) -> None:
    run_dir = config.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not move_aside:
        raise CheckpointError(
            f"run '{config.run_name}' already has files in {run_dir} (checkpoints, journal or knowledge base): "
            "a fresh start would mix with them. Resume instead (drop --fresh), use a new run_name, or let streamtrain "
            "move the folder aside (--fresh --move-aside / fresh=True, move_aside=True)."
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.moved-{stamp}")
    os.replace(run_dir, target)
    logger.warning("moved the previous run folder %s aside to %s", run_dir, target)


def train(config: RunConfig, *, fresh: bool = False, move_aside: bool = False, progress: bool = True) -> TrainResult:
    """Train ``config``'s run: resume from its newest valid checkpoint (and journal), or start it.

    ``fresh=True`` refuses to start over existing checkpoints unless ``move_aside=True`` moves the run's folder
    aside first. Raising ``max_samples`` continues a finished run from where it ended. Returns a TrainResult;
    on Ctrl-C or SIGTERM it finishes in-flight samples, writes an ``interrupt`` checkpoint and returns; on an
    error it writes an ``error`` checkpoint and re-raises.
    """
    if fresh:
        _start_fresh(config, move_aside)
    held = ExitStack()
    held.enter_context(CheckpointStore(config.run_dir, keep=config.keep_checkpoints).lock())
    run: _Run | None = None
    try:
        with _server_for(config) as (url, embedded):
            run = _Run(config, url, embedded, progress)
            return run.execute()
    finally:
        _release_lock(held, run)


def _release_lock(held: ExitStack, run: _Run | None) -> None:
    """Release the run's lock; after a second Ctrl-C, only once the workers left behind have stopped.

    Those workers may still be sending their last request (retries included): a new call of the same run must not
    replay that sample beside it, on a server without idempotency. The embedded server stopped with the call,
    and it has idempotency keys anyway.
    """
    stragglers = [w for w in run.workers if w.is_alive()] if run is not None and not run.embedded else []
    if not stragglers:
        held.close()
        return

    def release() -> None:
        for w in stragglers:
            w.join()
        held.close()
        logger.info("run %s: the workers left behind have stopped; its lock is free", run.config.run_name)

    threading.Thread(target=release, name="streamtrain-lock-release", daemon=True).start()


def train_parallel(config: RunConfig, num_workers: int, **kwargs: Any) -> TrainResult:
    """:func:`train` with ``num_workers`` worker threads (each with its own client and sessions)."""
    return train(config.model_copy(update={"num_workers": num_workers}), **kwargs)
