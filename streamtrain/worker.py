"""A worker thread: takes samples from the dispatcher, learns each up the hierarchy exactly once, reports back.

Each worker has its own client and its own session per level. Whole samples go in keyed learn-batch requests
where the server offers them (several per request), otherwise one exactly-once unit per step
(``exactly_once.NodeSession``). Only a sample's own content fails it (``SampleFault``); any other error is the server's
or the run's and stops the run, the sample left unfinished for the next call (docs/trainer.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from .client import KatoClient
from .client.exactly_once import NodeSession, unit_took_effect
from .client.outage import OutageTracker
from .config import LayerConfig, RunConfig
from .errors import ProtocolError
from .hierarchy import Step, part_key, plan_sample, sample_key, step_key
from .indoubt import SESSION_TTL_SECONDS
from .limits import TRAINER_MAX_BYTES, TRAINER_MAX_ITEMS
from .records.checkpoint import FailedSample
from .records.journal import Journal, SampleRecord
from .resume import first_step
from .runstate import Outcome

logger = logging.getLogger(__name__)


# In learn-batches runs a sample of at most this many characters is planned by the dispatcher, ahead (it has the
# time while the workers wait for the server); a bigger one by its worker, so that queued samples hold no big plans.
PLAN_AHEAD_MAX_CHARS = 1 << 16

Planned = tuple[list[str], list[Step]]   # a sample's tokens and steps


@dataclass(frozen=True)
class Job:
    raw_index: int
    text: str
    recovery: SampleRecord | None  # what the journal knows of an earlier attempt that a crash cut short
    retry: FailedSample | None = None  # a failed sample of an earlier call, tried again
    planned: Planned | str | None = None  # made ahead (plan_ahead): the plan, or why the tokenizer failed


def plan_text(text: str, tokenizer: Callable[[str], list[str]], layers: list[LayerConfig]) -> Planned | str:
    """The sample's tokens and steps, or why the tokenizer failed on its text."""
    try:
        tokens = tokenizer(text)
    except Exception as exc:
        return f"the tokenizer failed: {type(exc).__name__}: {exc}"
    return tokens, plan_sample(tokens, layers)


def plan_ahead(text: str, tokenizer: Callable[[str], list[str]], layers: list[LayerConfig]) -> Planned | str | None:
    """``plan_text`` for a small sample; None for a big one (its worker plans it)."""
    return plan_text(text, tokenizer, layers) if len(text) <= PLAN_AHEAD_MAX_CHARS else None


class SampleFault(Exception):
    """The sample's own content was rejected: it fails, the run goes on, and the next call retries it."""

    def __init__(self, message: str, steps_done: int) -> None:
        super().__init__(message)
        self.steps_done = steps_done


# Answers that reject a request for what it carries (malformed, too large): the sample's fault. Every other error
# (5xx, transport errors, time-outs past the retry budget, a wrong token) is the server's, and stops the run.
CONTENT_REJECTED = frozenset({400, 413, 422})


def _cost(step: Step) -> int:
    """The bytes a step adds to a request body, roughly (JSON of its node id and events)."""
    return 48 + sum(len(symbol) + 6 for event in step.events for symbol in event)


def batch_parts(steps: list[Step]) -> list[tuple[int, int]]:
    """Cut a sample's steps into consecutive parts (first, end) within the items and (estimated) bytes bounds."""
    parts: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, step in enumerate(steps):
        cost = _cost(step)
        if i > start and (i - start >= TRAINER_MAX_ITEMS or size + cost > TRAINER_MAX_BYTES):
            parts.append((start, i))
            start, size = i, 0
        size += cost
    if start < len(steps):
        parts.append((start, len(steps)))
    return parts


def fill_requests(ready: list[tuple[Job, list[str], list[Step]]],
                  costs: list[int]) -> list[list[tuple[Job, list[str], list[Step]]]]:
    """Whole samples packed, in order, into requests within the items and bytes bounds of one learn-batch part
    (``costs``: each sample's estimated bytes)."""
    groups: list[list[tuple[Job, list[str], list[Step]]]] = []
    items = size = 0
    for entry, cost in zip(ready, costs, strict=True):
        steps = entry[2]
        if groups and items + len(steps) <= TRAINER_MAX_ITEMS and size + cost <= TRAINER_MAX_BYTES:
            groups[-1].append(entry)
            items, size = items + len(steps), size + cost
        else:
            groups.append([entry])
            items, size = len(steps), cost
    return groups


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs of its run, fixed before the workers start (they never see the dispatcher's state)."""

    config: RunConfig
    server_url: str
    token: str | None
    tokenizer: Callable[[str], list[str]]
    journal: Journal
    learn_batch: bool  # whole samples in keyed learn-batch requests
    learn_batches: bool  # ... several per request
    batch_endpoint: str  # "batches" or "batch": where new batch requests go
    inbox: queue.Queue[Job | None]
    outbox: queue.Queue[Outcome]
    stop: threading.Event  # take no more samples
    outage: OutageTracker  # the server's health, shared by every client of the run
    # after a lost session, before a new one: (this worker's client, the node) -> raises if the KB changed
    on_session_lost: Callable[[KatoClient, str], None] | None = None


class Worker(threading.Thread):
    """One client, one session per level; takes samples until told to stop."""

    def __init__(self, ctx: WorkerContext, number: int):
        super().__init__(name=f"streamtrain-worker-{number}", daemon=True)
        self.ctx = ctx
        self.number = number
        self.client = KatoClient(ctx.server_url, token=ctx.token, settings=ctx.config.client, outage=ctx.outage)
        self.sessions = self._new_sessions()

    def _new_sessions(self) -> list[NodeSession]:
        cfg, check = self.ctx.config, self.ctx.on_session_lost
        return [NodeSession(self.client, cfg.node_id(level), layer.session_config(), ttl_seconds=SESSION_TTL_SECONDS,
                            on_session_lost=partial(check, self.client, cfg.node_id(level)) if check else None)
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

    def _take_ready(self, job: Job) -> tuple[list[Job], bool]:
        """``job`` and, where several samples go in one request, the plain samples already waiting (never waits for
        more). True when a stop sentinel was taken too: this worker ends after these."""
        jobs = [job]
        if not self.ctx.learn_batches or job.recovery is not None or job.retry is not None:
            return jobs, False
        # filled with the samples already waiting, never waiting for more: a slow stream does not delay them
        while len(jobs) < self.ctx.config.client.samples_per_request:
            try:
                more = self.ctx.inbox.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return jobs, True
            jobs.append(more)
        return jobs, False

    def _train_jobs(self, jobs: list[Job]) -> Iterator[Outcome]:
        """Each job's outcome as soon as it is known. Whole small samples share keyed learn-batches requests; the
        rest (a retry, a sample in flight at a crash, a sample too big for one request) go alone."""
        if len(jobs) == 1:
            yield self._train_sample(jobs[0])
            return
        ready: list[tuple[Job, list[str], list[Step]]] = []
        costs: list[int] = []
        for job in jobs:
            if job.recovery is not None or job.retry is not None:
                yield self._train_sample(job)
                continue
            planned = self._plan(job)
            if isinstance(planned, Outcome):
                yield planned
                continue
            steps = planned[1]
            cost = sum(_cost(s) for s in steps)
            if not steps or len(steps) > TRAINER_MAX_ITEMS or cost > TRAINER_MAX_BYTES:  # more than one part: alone
                yield self._send_sample(job, *planned)
            else:
                ready.append((job, *planned))
                costs.append(cost)
        for group in fill_requests(ready, costs):
            yield from self._send_group(group)

    def _send_group(self, group: list[tuple[Job, list[str], list[Step]]]) -> Iterator[Outcome]:
        """Several whole samples in one request, each under its own key (the one it has when sent alone)."""
        ctx, cfg = self.ctx, self.ctx.config
        ctx.journal.batches_sent([(job.raw_index, len(steps)) for job, _, steps in group])
        nodes = [cfg.node_id(level) for level in range(len(cfg.layers))]
        batches = [(sample_key(cfg.run_name, job.raw_index, steps), [(nodes[s.level], s.events) for s in steps])
                   for job, _, steps in group]
        try:
            answers = self.client.learn_batches(batches)
        except ProtocolError as exc:
            if exc.status_code not in CONTENT_REJECTED:
                raise
            # the server applied none of it: each sample alone, so a fault is pinned on its own sample
            for job, tokens, steps in group:
                yield self._send_sample(job, tokens, steps)
            return
        if len(answers) != len(group):
            raise ProtocolError(f"{self.client.base_url}: learn-batches answered {len(answers)} results for {len(group)} batches")
        for (job, _, steps), names in zip(group, answers, strict=True):
            if names != [s.name for s in steps]:
                raise ProtocolError(f"sample {job.raw_index}: {self.client.base_url} learned other names than planned")
        outcomes = [self._outcome(job, tokens, steps) for job, tokens, steps in group]
        ctx.journal.finished_many([(o.raw_index, {"trained": 1, "tokens": o.tokens, "learns": o.learns})
                                   for o in outcomes])
        yield from outcomes

    def _train_sample(self, job: Job) -> Outcome:
        planned = self._plan(job)
        return planned if isinstance(planned, Outcome) else self._send_sample(job, *planned)

    def _plan(self, job: Job) -> Planned | Outcome:
        """The sample's tokens and steps (made ahead, or now), or its failure when the tokenizer rejects its text."""
        planned = job.planned if job.planned is not None else plan_text(job.text, self.ctx.tokenizer,
                                                                       self.ctx.config.layers)
        return self._failed(job, SampleFault(planned, 0)) if isinstance(planned, str) else planned

    def _send_sample(self, job: Job, tokens: list[str], steps: list[Step]) -> Outcome:
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
        except SampleFault as exc:
            return self._failed(job, exc)
        return self._trained(job, tokens, steps)

    def _failed(self, job: Job, exc: SampleFault) -> Outcome:
        message, levels = str(exc), len(self.ctx.config.layers)
        logger.warning("sample %d failed (the next call retries it): %s", job.raw_index, message)
        # the sessions' STM may hold part of the sample: start the next one from fresh sessions
        for s in self.sessions:
            s.close()
        self.sessions = self._new_sessions()
        self.ctx.journal.finished(job.raw_index, trained=0, tokens=0, learns=[0] * levels, error=message,
                                   steps_done=exc.steps_done)
        return Outcome(job.raw_index, job.retry is not None, error=message, steps_done=exc.steps_done)

    def _trained(self, job: Job, tokens: list[str], steps: list[Step]) -> Outcome:
        outcome = self._outcome(job, tokens, steps)
        self.ctx.journal.finished(job.raw_index, trained=1, tokens=outcome.tokens, learns=outcome.learns)
        return outcome

    def _outcome(self, job: Job, tokens: list[str], steps: list[Step]) -> Outcome:
        """A trained sample's outcome (its journal line is the caller's)."""
        learns = [0] * len(self.ctx.config.layers)
        names: dict[int, str] = {}
        for step in steps:
            learns[step.level] += 1
            names.setdefault(step.level, step.name)
        return Outcome(job.raw_index, job.retry is not None, tokens=len(tokens), learns=learns, names=names,
                       worker=self.number)

    def _learn_steps(self, raw_index: int, steps: list[Step], first: int) -> None:
        """One exactly-once unit per step (keys, or verify on a server without them)."""
        ctx, cfg = self.ctx, self.ctx.config
        for step in steps[first:]:
            session = self.sessions[step.level]
            # the key is the request's Idempotency-Key in keys mode; the other modes only name the step with it
            key = (step_key(cfg.run_name, session.node_id, raw_index, step) if session.mode == "keys"
                   else f"sample {raw_index} step {step.index}")
            on_phase = lambda phase, sid, t, k=step.index: ctx.journal.step(raw_index, k, phase, sid, counter=t)  # noqa: E731
            try:
                session.learn_unit(step.events, key, on_phase=on_phase, name=step.name)
            except ProtocolError as exc:
                if exc.status_code not in CONTENT_REJECTED:
                    raise
                raise SampleFault(f"step {step.index} (level {step.level}) was rejected: {exc}", step.index) from exc

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
            if exc.status_code not in CONTENT_REJECTED:
                raise
            if exc.status_code == 413 and b - a > 1:  # over the server's body limit: halves, each keyed
                mid = (a + b) // 2
                self._send_range(raw_index, steps, a, mid, endpoint)
                self._send_range(raw_index, steps, mid, b, endpoint)
                return
            raise SampleFault(f"steps {a}-{b - 1} were rejected: {exc}", a) from exc
        if names != [s.name for s in part]:
            raise ProtocolError(f"sample {raw_index}: {self.client.base_url} learned other names than planned")

    def _first_step(self, job: Job, steps: list[Step]) -> int:
        """The first step to send: after a stop, from the journal; for a retried failure, past its steps done
        (``resume.first_step`` decides; a step whose effect its session tells is asked of the server here)."""
        rec = job.recovery

        def took_effect(k: int) -> bool:
            assert rec is not None
            step = steps[k]
            applied = unit_took_effect(self.client, self.ctx.config.node_id(step.level), rec.last_session or "",
                                       step.events, str(rec.last_phase), rec.last_counter)
            logger.info("sample %d: step %d's learn %s before the crash", job.raw_index, k,
                        "took effect" if applied else "did not take effect")
            return applied

        return first_step(len(steps), rec, job.retry, took_effect)
