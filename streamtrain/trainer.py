"""The main job: stream a dataset, learn each sample up the hierarchy, checkpoint, resume exactly.

One engine serves ``train`` and ``train_parallel``: the calling thread reads the stream and dispatches samples to
N worker threads, each with its own client and its own session per level; completions come back out of order.

Exactness, in three parts (each argued where its code is):

* **Position.** The checkpointed position is the low-water mark: the first raw index not yet finished. Finished
  samples above it are listed in the checkpoint (``done_above``), so a resume neither skips an unfinished sample
  nor re-trains a finished one. At most ``2 * N + 2`` samples are outstanding, so that list and memory stay small
  however long the stream.
* **Steps.** A sample is a fixed plan of learns (``hierarchy.plan_sample``); each learn is applied exactly once by
  ``units.NodeSession.learn_unit`` through faults, retries and server restarts.
* **Trainer crashes.** Before each request the worker appends a line to the journal (``journal.py``); a resumed
  run reads it to skip samples finished since the checkpoint and to find which step of each in-flight sample took
  effect (idempotency keys replay harmlessly; without them the recorded session's STM tells).

Counters follow the same rule: a sample's counts are added once, when it finishes (or from its journal ``fin``
line after a crash), and ``samples_filtered`` is derived from the position, so no count is lost or doubled.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from . import __version__
from .checkpoint import Checkpoint, CheckpointStore, FailedSample, ServerInfo
from .client import KatoClient
from .config import RunConfig, check_resume
from .datafiles import DatasetRecord, dataset_changes, dataset_size, describe_dataset
from .errors import (
    CheckpointError,
    DatasetChanged,
    DatasetError,
    ProtocolError,
    ServerUnavailable,
    StreamtrainError,
    TooManyFailures,
)
from .hierarchy import Step, part_key, plan_sample, sample_key, step_key
from .journal import Journal, SampleRecord, read_journal
from .kbcheck import KnowledgeBaseRecord, check_knowledge_base, record_knowledge_base
from .metrics import Event, MetricsLog
from .rundir import RunDir
from .runstate import Outcome, RunState
from .stream import DatasetStream
from .tokenize import get_tokenizer
from .units import NodeSession, unit_took_effect

logger = logging.getLogger(__name__)

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


def _token_for(url: str, config: RunConfig) -> str | None:
    """The bearer token of the run's server: that of an embedded server this process started at ``url`` (kept in
    memory only), else the config's ``server_token`` (or its environment variable)."""
    from .server.launcher import token_for

    return token_for(url) or config.server_token_value()


@contextmanager
def _server_for(config: RunConfig) -> Iterator[tuple[str, bool]]:
    """The run's server URL; starts the embedded server (its database beside the checkpoints) when none is given.

    The embedded server gets a fresh random bearer token at each start, so no other local process can read or
    change the run's knowledge base while it trains; the run's clients send it (``_token_for``).
    """
    if config.server_url:
        yield config.server_url, False
        return
    from .server import EmbeddedServer

    config.run_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    with EmbeddedServer(config.run_dir / "kb.sqlite3", log_path=config.run_dir / "server.log", token=token) as server:
        logger.info("embedded server for run %s at %s (bearer token required)", config.run_name, server.url)
        yield server.url, True


@dataclass(frozen=True)
class _Job:
    raw_index: int
    text: str
    recovery: SampleRecord | None  # what the journal knows of an earlier attempt that a crash cut short
    retry: FailedSample | None = None  # a failed sample of an earlier call, tried again


class _SampleFault(Exception):
    """The sample's own content was rejected: it fails, the run goes on, and the next call retries it."""

    def __init__(self, message: str, steps_done: int) -> None:
        super().__init__(message)
        self.steps_done = steps_done


# Answers that reject a request for what it carries (malformed, too large): the sample's fault. Every other error
# (5xx, transport errors, time-outs past the retry budget, a wrong token) is the server's, and stops the run.
_CONTENT_REJECTED = frozenset({400, 413, 422})

# One learn-batch request carries at most this much of a sample; a bigger sample goes in several keyed parts.
MAX_BATCH_ITEMS = 1000
MAX_BATCH_BYTES = 1 << 20


# One learn-batches request carries at most this many whole samples (each under its own key), filled with whatever
# samples are ready when a worker takes its next one, so a slow stream never waits for a request to fill.
SAMPLES_PER_REQUEST = 16


def _cost(step: Step) -> int:
    """The bytes a step adds to a request body, roughly (JSON of its node id and events)."""
    return 48 + sum(len(symbol) + 6 for event in step.events for symbol in event)


def batch_parts(steps: list[Step]) -> list[tuple[int, int]]:
    """Cut a sample's steps into consecutive parts (first, end) within the items and (estimated) bytes bounds."""
    parts: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, step in enumerate(steps):
        cost = _cost(step)
        if i > start and (i - start >= MAX_BATCH_ITEMS or size + cost > MAX_BATCH_BYTES):
            parts.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(steps):
        parts.append((start, len(steps)))
    return parts


def _fill_requests(ready: list[tuple[_Job, list[str], list[Step]]]) -> list[list[tuple[_Job, list[str], list[Step]]]]:
    """Whole samples packed, in order, into requests within the items and bytes bounds of one learn-batch part."""
    groups: list[list[tuple[_Job, list[str], list[Step]]]] = []
    items = size = 0
    for entry in ready:
        steps = entry[2]
        cost = sum(_cost(s) for s in steps)
        if groups and items + len(steps) <= MAX_BATCH_ITEMS and size + cost <= MAX_BATCH_BYTES:
            groups[-1].append(entry)
            items, size = items + len(steps), size + cost
        else:
            groups.append([entry])
            items, size = len(steps), cost
    return groups


@dataclass(frozen=True)
class _WorkerContext:
    """What a worker needs of its run, fixed before the workers start (they never see the dispatcher's state)."""

    config: RunConfig
    server_url: str
    token: str | None
    tokenizer: Callable[[str], list[str]]
    journal: Journal
    learn_batch: bool  # whole samples in keyed learn-batch requests
    learn_batches: bool  # ... several per request
    batch_endpoint: str  # "batches" or "batch": where new batch requests go
    inbox: queue.Queue[_Job | None]
    outbox: queue.Queue[Outcome]
    stop: threading.Event  # take no more samples


class _Worker(threading.Thread):
    """One client, one session per level; takes samples until told to stop."""

    def __init__(self, ctx: _WorkerContext, number: int):
        super().__init__(name=f"streamtrain-worker-{number}", daemon=True)
        self.ctx = ctx
        self.client = KatoClient(ctx.server_url, token=ctx.token, settings=ctx.config.client)
        self.sessions = self._new_sessions()

    def _new_sessions(self) -> list[NodeSession]:
        cfg = self.ctx.config
        return [NodeSession(self.client, cfg.node_id(level), layer.session_config(), ttl_seconds=SESSION_TTL_SECONDS)
                for level, layer in enumerate(cfg.layers)]

    def run(self) -> None:
        ctx = self.ctx
        clean = True  # no sample left half done: the sessions can go
        try:
            while clean and not ctx.stop.is_set():
                job = ctx.inbox.get()
                if job is None or ctx.stop.is_set():
                    break  # a job left here stays unfinished: the position cannot pass it
                jobs, ending = self._take_ready(job)
                done: set[int] = set()
                try:
                    for outcome in self._train_jobs(jobs):
                        done.add(outcome.raw_index)
                        ctx.outbox.put(outcome)
                except BaseException as exc:  # the server's fault, or the journal's: the dispatcher must hear of it
                    first = next(j for j in jobs if j.raw_index not in done)  # the others stay unfinished too
                    ctx.outbox.put(Outcome(first.raw_index, retry=first.retry is not None, fatal=exc))
                    clean = False
                if ending:
                    break
        finally:
            if clean:
                for s in self.sessions:
                    s.close()
            # else the sessions stay (until their TTL): the next run may read their STM to finish the sample
            self.client.close()

    def _take_ready(self, job: _Job) -> tuple[list[_Job], bool]:
        """``job`` and, where several samples go in one request, the plain samples already waiting (never waits for
        more). True when a stop sentinel was taken too: this worker ends after these."""
        jobs = [job]
        if not self.ctx.learn_batches or job.recovery is not None or job.retry is not None:
            return jobs, False
        while len(jobs) < SAMPLES_PER_REQUEST:
            try:
                more = self.ctx.inbox.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return jobs, True
            jobs.append(more)
        return jobs, False

    def _train_jobs(self, jobs: list[_Job]) -> Iterator[Outcome]:
        """Each job's outcome as soon as it is known. Whole small samples share keyed learn-batches requests; the
        rest (a retry, a sample in flight at a crash, a sample too big for one request) go alone."""
        if len(jobs) == 1:
            yield self._train_sample(jobs[0])
            return
        ready: list[tuple[_Job, list[str], list[Step]]] = []
        for job in jobs:
            if job.recovery is not None or job.retry is not None:
                yield self._train_sample(job)
                continue
            planned = self._plan(job)
            if isinstance(planned, Outcome):
                yield planned
            elif not planned[1] or len(batch_parts(planned[1])) > 1:
                yield self._send_sample(job, *planned)
            else:
                ready.append((job, *planned))
        for group in _fill_requests(ready):
            yield from self._send_group(group)

    def _send_group(self, group: list[tuple[_Job, list[str], list[Step]]]) -> Iterator[Outcome]:
        """Several whole samples in one request, each under its own key (the one it has when sent alone)."""
        ctx, cfg = self.ctx, self.ctx.config
        for job, _, steps in group:
            ctx.journal.step(job.raw_index, 0, "batches", "", end=len(steps))
        batches = [(sample_key(cfg.run_name, job.raw_index, steps), [(cfg.node_id(s.level), s.events) for s in steps])
                   for job, _, steps in group]
        try:
            answers = self.client.learn_batches(batches)
        except ProtocolError as exc:
            if exc.status_code not in _CONTENT_REJECTED:
                raise
            # the server applied none of it: each sample alone, so a fault is pinned on its own sample
            for job, tokens, steps in group:
                yield self._send_sample(job, tokens, steps)
            return
        for (job, tokens, steps), names in zip(group, answers):
            if names != [s.name for s in steps]:
                raise ProtocolError(f"sample {job.raw_index}: {self.client.base_url} learned other names than planned")
            yield self._trained(job, tokens, steps)

    def _train_sample(self, job: _Job) -> Outcome:
        planned = self._plan(job)
        return planned if isinstance(planned, Outcome) else self._send_sample(job, *planned)

    def _plan(self, job: _Job) -> tuple[list[str], list[Step]] | Outcome:
        """The sample's tokens and steps, or its failure when the tokenizer rejects its text."""
        try:
            tokens = self.ctx.tokenizer(job.text)
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer raises, it is about this text
            return self._failed(job, _SampleFault(f"the tokenizer failed: {type(exc).__name__}: {exc}", 0))
        return tokens, plan_sample(tokens, self.ctx.config.layers)

    def _send_sample(self, job: _Job, tokens: list[str], steps: list[Step]) -> Outcome:
        ctx = self.ctx
        try:
            first = self._first_step(job, steps)
            rec = job.recovery
            recovered = rec is not None and rec.last_phase in ("batch", "batches")
            if steps and (ctx.learn_batch or recovered):
                resend = None
                endpoint = rec.last_phase if recovered and rec is not None else ctx.batch_endpoint
                if recovered and rec is not None and rec.last_step is not None and rec.last_step < len(steps):
                    # the range the last request carried (a journal line without "e" is a whole-sample batch)
                    resend = (rec.last_step, rec.last_end if rec.last_end is not None else len(steps))
                self._learn_batch(job.raw_index, steps, first, resend, endpoint or "batch")
            else:
                self._learn_steps(job.raw_index, steps, first)
        except _SampleFault as exc:
            return self._failed(job, exc)
        return self._trained(job, tokens, steps)

    def _failed(self, job: _Job, exc: _SampleFault) -> Outcome:
        message, levels = str(exc), len(self.ctx.config.layers)
        logger.warning("sample %d failed (the next call retries it): %s", job.raw_index, message)
        # the sessions' STM may hold part of the sample: start the next one from fresh sessions
        for s in self.sessions:
            s.close()
        self.sessions = self._new_sessions()
        self.ctx.journal.finished(job.raw_index, trained=0, tokens=0, learns=[0] * levels, error=message,
                                   steps_done=exc.steps_done)
        return Outcome(job.raw_index, job.retry is not None, error=message, steps_done=exc.steps_done)

    def _trained(self, job: _Job, tokens: list[str], steps: list[Step]) -> Outcome:
        learns = [0] * len(self.ctx.config.layers)
        names: dict[int, str] = {}
        for step in steps:
            learns[step.level] += 1
            names.setdefault(step.level, step.name)
        self.ctx.journal.finished(job.raw_index, trained=1, tokens=len(tokens), learns=learns)
        return Outcome(job.raw_index, job.retry is not None, tokens=len(tokens), learns=learns, names=names)

    def _learn_steps(self, raw_index: int, steps: list[Step], first: int) -> None:
        """One exactly-once unit per step (keys, or verify on a server without them)."""
        ctx, cfg = self.ctx, self.ctx.config
        for step in steps[first:]:
            session = self.sessions[step.level]
            key = step_key(cfg.run_name, session.node_id, raw_index, step)
            on_phase = lambda phase, sid, t, k=step.index: ctx.journal.step(raw_index, k, phase, sid, counter=t)  # noqa: E731
            try:
                session.learn_unit(step.events, key, on_phase=on_phase)
            except ProtocolError as exc:
                if exc.status_code not in _CONTENT_REJECTED:
                    raise
                raise _SampleFault(f"step {step.index} (level {step.level}) was rejected: {exc}", step.index) from exc

    def _learn_batch(self, raw_index: int, steps: list[Step], first: int, resend: tuple[int, int] | None,
                     endpoint: str) -> None:
        """The sample's steps from ``first`` on, in keyed learn-batch requests (one, unless the sample is big).

        A request's key is a function of the range of steps it carries, and each range is journaled (start and
        end, and ``endpoint``: "batch" for ``/learn-batch``, "batches" for ``/learn-batches``, whose keys live
        apart) before it is sent. After a crash, ``resend`` is the last range sent: it goes again under its key on
        the same endpoint (answered from the server's record if it took effect), then the rest from its end.
        """
        offered = self.client.supports_learn_batches if endpoint == "batches" else self.client.supports_learn_batch
        if not offered:
            raise ProtocolError(
                f"sample {raw_index} was sent as a learn-{endpoint} request before the last stop, but "
                f"{self.client.base_url} does not offer that extension now: it cannot be finished exactly on this server"
            )
        if resend is not None:
            self._send_range(raw_index, steps, *resend, endpoint)
            first = resend[1]
        for a, b in batch_parts(steps):
            if b > first:
                self._send_range(raw_index, steps, max(a, first), b, endpoint)

    def _send_range(self, raw_index: int, steps: list[Step], a: int, b: int, endpoint: str) -> None:
        cfg = self.ctx.config
        part = steps[a:b]
        key = (sample_key(cfg.run_name, raw_index, part) if (a, b) == (0, len(steps))
               else part_key(cfg.run_name, raw_index, a, part))
        items = [(cfg.node_id(s.level), s.events) for s in part]
        self.ctx.journal.step(raw_index, a, endpoint, "", end=b)
        try:
            if endpoint == "batches":
                names = self.client.learn_batches([(key, items)])[0]
            else:
                names = self.client.learn_batch(items, key)
        except ProtocolError as exc:
            if exc.status_code not in _CONTENT_REJECTED:
                raise
            if exc.status_code == 413 and b - a > 1:  # over the server's body limit: halves, each keyed
                mid = (a + b) // 2
                self._send_range(raw_index, steps, a, mid, endpoint)
                self._send_range(raw_index, steps, mid, b, endpoint)
                return
            raise _SampleFault(f"steps {a}-{b - 1} were rejected: {exc}", a) from exc
        if names != [s.name for s in part]:
            raise ProtocolError(f"sample {raw_index}: {self.client.base_url} learned other names than planned")

    def _first_step(self, job: _Job, steps: list[Step]) -> int:
        """The first step to send: after a crash, from the journal; for a retried failure, past its steps done."""
        rec = job.recovery
        if rec is not None and rec.last_step is not None:
            return self._first_step_to_send(job.raw_index, steps, rec)
        if job.retry is not None:
            return min(job.retry.steps_done, len(steps))
        return 0

    def _first_step_to_send(self, raw_index: int, steps: list[Step], recovery: SampleRecord) -> int:
        """After a trainer crash: the first step of this sample that did not take effect (journal.py argues why)."""
        if recovery.last_step is None or recovery.last_step >= len(steps):
            return 0
        k = recovery.last_step
        if recovery.last_phase in ("learn", "counted"):
            step = steps[k]
            node_id = self.ctx.config.node_id(step.level)
            applied = unit_took_effect(self.client, node_id, recovery.last_session or "", step.events,
                                       recovery.last_phase, recovery.last_counter)
            logger.info("sample %d: step %d's learn %s before the crash", raw_index, k, "took effect" if applied else "did not take effect")
            return k + 1 if applied else k
        # "observe": its learn was never sent; "keyed" and "batch" replay harmlessly under their idempotency keys
        return k


class _Run:
    """State of one call of train(): the dispatcher side."""

    def __init__(self, config: RunConfig, server_url: str, embedded: bool, progress: bool):
        self.config = config
        self.server_url = server_url
        self.embedded = embedded
        self.progress = progress
        self.tokenizer = get_tokenizer(config.tokenizer)
        self.rundir = RunDir(config.run_dir, keep=config.keep_checkpoints)
        self.store = self.rundir.checkpoints
        self.stop = threading.Event()  # tells the workers to take no more samples
        self.signals = _StopSignals()
        self.capacity = 2 * config.num_workers + 2  # raised when requests carry several samples (_execute)
        self.learn_batch = self.learn_batches = False
        self.batch_endpoint = "batch"
        self.inbox: queue.Queue[_Job | None] = queue.Queue()
        self.outbox: queue.Queue[Outcome] = queue.Queue()
        self.journal: Journal  # opened in execute()
        self.checkpoints_written = 0
        self.last_checkpoint: Path | None = None
        self.history: list[ProgressPoint] = []
        self.point_every = 1.0  # seconds between history points; doubles each time the history is thinned
        self.stream: DatasetStream | None = None
        self.workers: list[_Worker] = []
        self.kb_record: KnowledgeBaseRecord | None = None
        self.probe_names: dict[int, str] = {}  # level -> a pattern learned since the last checkpoint
        self.kept_marks: list[int] = []  # positions of the checkpoints kept on disk, oldest first

    # -- resume -------------------------------------------------------------------------------------------
    def load_state(self, client: KatoClient) -> None:
        """The newest checkpoint and the journal, checked against the config, the dataset and the knowledge base."""
        cfg, rundir = self.config, self.rundir
        found = self.store.latest_with_path()
        journal_state = read_journal(rundir.journal_path)
        ckpt, path = found if found is not None else (None, None)
        # Pinned: something of this run may be on the server. A run that stopped before its first sample (a typo in
        # data_files, a wrong text_field) pins nothing, so the corrected config simply runs.
        pinned = (ckpt is not None and ckpt.has_progress) or bool(journal_state.samples)
        header = journal_state.header or {}
        if pinned and ckpt is not None:
            check_resume(ckpt.config, cfg, path)
        elif pinned and header:
            check_resume(RunConfig.model_validate(header["config"]), cfg, rundir.journal_path)
        elif ckpt is not None or header:
            logger.info("run %s trained nothing before: starting it with this config", cfg.run_name)
            rundir.journal_path.unlink(missing_ok=True)
        self.dataset_record = describe_dataset(cfg.dataset)
        recorded = (ckpt.dataset if ckpt is not None else
                    DatasetRecord.model_validate(header["dataset"]) if header.get("dataset") else None)
        if pinned and recorded is not None:
            problems = dataset_changes(recorded, self.dataset_record)
            if problems:
                raise DatasetChanged(
                    f"cannot resume run '{cfg.run_name}': its dataset's files changed since "
                    f"{path or rundir.journal_path}, so its raw positions would point at other records:\n  "
                    + "\n  ".join(problems)
                    + "\nWays out: restore the files as they were (new files may only come after all the old ones); "
                    "or train the new data as a new run (another run_name); or start this run over "
                    "(streamtrain train --fresh --move-aside)."
                )
        self.resumed = pinned
        self.sequence = ckpt.sequence if ckpt is not None else 0
        if pinned and ckpt is not None:
            where = str(rundir.kb_path) if self.embedded else self.server_url
            check_knowledge_base(client, ckpt.knowledge_base, str(path), where, self.embedded)
            self.kb_record = ckpt.knowledge_base
            self.started_at = ckpt.started_at
            self.elapsed_before = ckpt.elapsed_seconds
            self.stream_state = ckpt.position.state_dict
            self.kept_marks = [e.checkpoint.position.raw_offset for e in self.store.entries() if e.checkpoint]
            logger.info("resuming run %s from %s at raw position %d", cfg.run_name, path.name,
                        ckpt.position.raw_offset)
        else:
            self.started_at = datetime.now(timezone.utc)
            self.elapsed_before = 0.0
            self.stream_state = None
        self.state = RunState.resume(len(cfg.layers), ckpt if pinned else None, journal_state)
        if self.state.recovery:
            logger.info("run %s: %d sample(s) were in flight when the last trainer stopped", cfg.run_name,
                        len(self.state.recovery))
        self.start_position = self.state.read_pos
        c = self.state.counters
        self.done_at_start = c.samples_trained + c.samples_failed
        self.tokens_at_start = c.tokens

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint(self, reason: str, error: str | None = None) -> Path:
        state = self.state
        position = state.position()
        position.state_dict = self._stream_state(position.raw_offset)
        if reason != "error":  # after an error the server may be down: the last record still holds (KBs only grow)
            self.kb_record = self._record_knowledge_base()
        self.sequence = max(self.sequence + 1, self.store.next_sequence())
        call_elapsed = time.monotonic() - self.t0
        ckpt = Checkpoint(
            library_version=__version__,
            sequence=self.sequence,
            run_name=self.config.run_name,
            config=self.config,
            position=position,
            counters=state.snapshot_counters(),
            failures=state.failure_list(),
            reason=reason,
            error=error,
            started_at=self.started_at,
            created_at=datetime.now(timezone.utc),
            elapsed_seconds=self.elapsed_before + call_elapsed,
            server=ServerInfo(url=None if self.embedded else self.server_url, embedded=self.embedded,
                              idempotency=self.idempotency),
            knowledge_base=self.kb_record,
            dataset=self.dataset_record,
        )
        path = self.store.save(ckpt)
        self.kept_marks = (self.kept_marks + [position.raw_offset])[-self.config.keep_checkpoints:]
        # lines back to the oldest kept checkpoint: a fallback to it (when a newer one is damaged) stays exact
        self.journal.compact(min(self.kept_marks), set(state.failures))
        self.checkpoints_written += 1
        self.last_checkpoint = path
        self.since_checkpoint, self.checkpoint_time = 0, time.monotonic()
        logger.info("checkpoint %s (%s) at raw position %d", path.name, reason, position.raw_offset)
        event: Event = "checkpoint" if reason == "interval" else reason  # type: ignore[assignment]
        self._metrics_row(event, detail=error or path.name, call_elapsed=call_elapsed)
        return path

    def _metrics_row(self, event: Event, detail: str | None = None, call_elapsed: float | None = None) -> None:
        """A row of metrics.jsonl; a checkpoint's row carries the checkpoint's own time, so the next call's
        clock (which starts from the checkpoint) never runs backwards."""
        c = self.state.snapshot_counters()
        now = time.monotonic() - self.t0 if call_elapsed is None else call_elapsed
        self.metrics.write(event, now, elapsed_seconds=self.elapsed_before + now, position=self.state.mark,
                           samples_trained=c.samples_trained, samples_filtered=c.samples_filtered,
                           samples_failed=c.samples_failed, tokens=c.tokens, patterns_learned=c.patterns_learned,
                           detail=detail)

    def _record_knowledge_base(self) -> KnowledgeBaseRecord | None:
        node_ids = [self.config.node_id(level) for level in range(len(self.config.layers))]
        try:
            record = record_knowledge_base(self.kb_client, node_ids, self.probe_names, self.kb_record)
        except StreamtrainError as exc:
            logger.warning("could not read the knowledge base for the checkpoint (%s); it keeps the last record", exc)
            return self.kb_record
        self.probe_names = {}
        return record

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
    def _take(self, outcome: Outcome) -> None:
        self.state.finish(outcome)
        if outcome.names:
            self.probe_names.update(outcome.names)

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
            self._take(outcome)
            self.since_checkpoint += 1
            if self.state.counters.samples_failed > self.config.max_failures:
                raise TooManyFailures(
                    f"run {self.config.run_name}: {self.state.counters.samples_failed} samples failed, more than "
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
        c = self.state.counters
        if self.bar is not None:
            self.bar.update(self.state.mark - self.bar.n)
            self.bar.set_postfix(trained=c.samples_trained, failed=c.samples_failed,
                                 ckpt=self.last_checkpoint.name if self.last_checkpoint else "-", refresh=False)
        if now - self.last_point >= self.point_every:
            self._record_point()
        if self.metrics.due(now - self.t0):
            self._metrics_row("progress")
        if self._checkpoint_due():
            self.checkpoint("interval")

    def _record_point(self) -> None:
        self.last_point = time.monotonic()
        if len(self.history) >= MAX_HISTORY_POINTS:
            self.history = self.history[::2]  # thinned evenly: days of training keep a bounded, even record
            self.point_every *= 2
        c = self.state.counters
        self.history.append(ProgressPoint(elapsed_seconds=round(self.last_point - self.t0, 3), position=self.state.mark,
                                          samples_trained=c.samples_trained, tokens=c.tokens))

    def _wait_for_room(self) -> bool:
        """Block until fewer than ``capacity`` samples are outstanding; False when a stop was asked for."""
        stop = self.signals.stop
        while self.state.outstanding >= self.capacity and not stop.is_set():
            self._receive(block=True)
        return not stop.is_set()

    def _dispatch_retries(self) -> None:
        """Failed samples of earlier calls first: each from the first step that did not take effect."""
        st = self.state
        if st.failures:
            logger.info("run %s: retrying %d failed sample(s)", self.config.run_name, len(st.failures))
        for raw_index in sorted(st.failures):
            text = self._read_record(raw_index)
            if not self._wait_for_room():
                return
            st.dispatch_retry(raw_index)
            self.inbox.put(_Job(raw_index, text, st.recovery.pop(raw_index, None), retry=st.failures[raw_index]))
            self._receive(block=False)

    def _read_record(self, raw_index: int) -> str:
        with DatasetStream(self.config.dataset, start=raw_index, stop=raw_index + 1) as stream:
            for _, text in stream:
                return text
        raise DatasetError(
            f"raw record {raw_index} (a failed sample to retry) is no longer a sample of dataset "
            f"{self.config.dataset.path!r}: the data changed in place. Restore it, or start the run over."
        )

    def _dispatch_all(self) -> None:
        self._dispatch_retries()
        cfg, st = self.config, self.state
        limit = cfg.max_samples
        if self.signals.stop.is_set() or (limit is not None and st.read_pos >= limit):
            return
        stream = self.stream = DatasetStream(cfg.dataset, start=st.read_pos, state_dict=self.stream_state, stop=limit)
        for raw_index, text in stream:
            if raw_index in st.done_above:
                st.skip_to(raw_index + 1)
                continue
            if not self._wait_for_room():
                return  # this record was read, not dispatched: the position stays below it
            st.dispatch(raw_index)
            self.inbox.put(_Job(raw_index, text, st.recovery.pop(raw_index, None)))
            self._receive(block=False)
        st.skip_to(stream.position)

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
                if self.signals.stop.is_set() and not announced:  # only when somebody pressed Ctrl-C
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
            self._take(outcome)

    def execute(self) -> TrainResult:
        with self.signals.installed():  # from here on a stop signal is a request the loop answers (_StopSignals)
            return self._execute()

    def _execute(self) -> TrainResult:
        cfg = self.config
        token = _token_for(self.server_url, cfg)
        # checkpoint-time reads of the KB get a short budget: a checkpoint must not wait minutes for a dead server
        quick = cfg.client.model_copy(update={"retry_total_seconds": min(10.0, cfg.client.retry_total_seconds)})
        self.kb_client = KatoClient(self.server_url, token=token, settings=quick)
        try:
            self._wait_for_server(token)
            with KatoClient(self.server_url, token=token, settings=cfg.client) as probe:
                self.idempotency = probe.supports_idempotency
                self.learn_batch = cfg.client.learn_batch and probe.supports_learn_batch
                # several samples per request where the server offers it: its keys differ from /learn-batch's, so
                # a sample journaled under one endpoint is always finished on that one
                self.learn_batches = self.learn_batch and probe.supports_learn_batches
                self.batch_endpoint = "batches" if self.learn_batches else "batch"
                if self.learn_batches:
                    self.capacity = cfg.num_workers * (SAMPLES_PER_REQUEST + 1) + 2
                self.load_state(probe)
            return self._train()
        finally:
            self.kb_client.close()

    def _wait_for_server(self, token: str | None) -> None:
        """Until the server answers ``GET /``: say what the run waits for every few seconds, and let one Ctrl-C stop
        at once (nothing is trained yet). Gives up after ``client.retry_total_seconds``."""
        cfg = self.config
        budget = cfg.client.retry_total_seconds
        one_try = cfg.client.model_copy(update={"retry_max_attempts": 1, "connect_timeout": min(2.0, cfg.client.connect_timeout)})
        deadline = time.monotonic() + budget
        with KatoClient(self.server_url, token=token, settings=one_try) as client:
            for attempt in itertools.count(1):
                try:
                    client.info()
                    return
                except ServerUnavailable as exc:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServerUnavailable(
                            f"the server at {self.server_url} did not answer within {budget:g} s "
                            f"({attempt} attempts; last: {exc}). Check that it is running and reachable, or raise "
                            "client.retry_total_seconds") from None
                    logger.warning("waiting for the server at %s (attempt %d, %.0f s left; Ctrl-C to stop)",
                                   self.server_url, attempt, left)
                if self.signals.stop.wait(min(2.0, max(0.0, deadline - time.monotonic()))):
                    raise KeyboardInterrupt  # nothing trained yet: no checkpoint to write

    def _train(self) -> TrainResult:
        cfg = self.config
        self.journal = Journal(cfg.run_dir, {"run_name": cfg.run_name, "config": cfg.model_dump(mode="json"),
                                             "dataset": self.dataset_record.model_dump(mode="json")})
        self.t0 = self.checkpoint_time = self.last_point = time.monotonic()
        self.since_checkpoint = 0
        self.fatal: BaseException | None = None
        self.metrics = MetricsLog(cfg.run_dir)
        self._metrics_row("resume" if self.resumed else "start")
        self.bar = None
        if self.progress:
            from tqdm.auto import tqdm

            size = dataset_size(self.dataset_record)
            total = min(x for x in (cfg.max_samples, size) if x is not None) if (cfg.max_samples or size) else None
            self.bar = tqdm(total=total, initial=self.start_position, desc=cfg.run_name, unit="rec",
                            dynamic_ncols=True)
        workers = self.workers
        try:
            try:
                ctx = _WorkerContext(config=cfg, server_url=self.server_url, token=_token_for(self.server_url, cfg),
                                     tokenizer=self.tokenizer, journal=self.journal, learn_batch=self.learn_batch,
                                     learn_batches=self.learn_batches, batch_endpoint=self.batch_endpoint,
                                     inbox=self.inbox, outbox=self.outbox, stop=self.stop)
                workers.extend(_Worker(ctx, i) for i in range(cfg.num_workers))
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
                self._finish_bar(reason)
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
        c = self.state.counters
        elapsed = time.monotonic() - self.t0
        new_samples = c.samples_trained + c.samples_failed - self.done_at_start
        new_tokens = c.tokens - self.tokens_at_start
        return TrainResult(
            run_name=self.config.run_name, reason=reason, resumed=self.resumed,
            start_position=self.start_position, final_position=self.state.mark,
            samples_trained=c.samples_trained, samples_filtered=c.samples_filtered, samples_failed=c.samples_failed,
            tokens=c.tokens, patterns_learned=list(c.patterns_learned), new_samples=new_samples, new_tokens=new_tokens,
            elapsed_seconds=elapsed, samples_per_second=new_samples / elapsed if elapsed else 0.0,
            tokens_per_second=new_tokens / elapsed if elapsed else 0.0, num_workers=self.config.num_workers,
            checkpoints_written=self.checkpoints_written, last_checkpoint=self.last_checkpoint,
            server_url=self.server_url, server_idempotency=self.idempotency, failures=self.state.failure_list(),
            history=self.history,
        )


def _start_fresh(config: RunConfig, move_aside: bool) -> None:
    rundir = RunDir(config.run_dir)
    if rundir.is_empty():
        return
    if not rundir.has_progress():  # nothing of it reached a server: its files pin nothing
        rundir.clear_unpinned()
        return
    if not move_aside:
        raise CheckpointError(
            f"run '{config.run_name}' already has files in {rundir.path} (checkpoints, journal or knowledge base): "
            "a fresh start would mix with them. Resume instead (drop --fresh), use a new run_name, or let streamtrain "
            "move the folder aside (--fresh --move-aside / fresh=True, move_aside=True)."
        )
    rundir.move_aside()


def train(config: RunConfig, *, fresh: bool = False, move_aside: bool = False, progress: bool = True) -> TrainResult:
    """Train ``config``'s run: resume from its newest valid checkpoint (and journal), or start it.

    ``fresh=True`` refuses to start over existing checkpoints unless ``move_aside=True`` moves the run's folder
    aside first (a run that trained nothing yet starts over without it). Raising ``max_samples`` continues a
    finished run from where it ended; samples that failed (rejected for their content) are retried first. Returns
    a TrainResult; on Ctrl-C or SIGTERM it finishes in-flight samples, writes an ``interrupt`` checkpoint and
    returns; on an error (the server's faults included) it writes an ``error`` checkpoint and re-raises.
    """
    config = config.with_overrides()  # a config changed with model_copy(update=...) was never validated
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
    return train(config.with_overrides(num_workers=num_workers), **kwargs)
