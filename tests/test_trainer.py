"""The trainer end to end: real corpus, embedded server as a real process, trainers killed with real signals.

Knowledge bases are compared level by level ({level: {pattern name: frequency}}): names above level 0 are names of
names, independent of the run's name, so runs under different run_names on one server can be compared exactly.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from runs import SAMPLES, kb_by_level, make_config, train_command
from soak import SOAK
from zygote import ForkedProcess, Zygote

from streamtrain.config import ClientConfig, LayerConfig, RunConfig
from streamtrain.errors import CheckpointError, ResumeMismatch, ServerUnavailable
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.server import EmbeddedServer
from streamtrain.trainer import train, train_parallel


def test_uninterrupted_run_accounts_for_every_record(server, demo_corpus, tmp_path, reference):
    """Every raw record below the end is trained, filtered or failed; the last checkpoint says 'end'."""
    cfg = make_config(tmp_path, demo_corpus, "accounting", server.url)
    result = train(cfg, progress=False)
    assert result.samples_trained + result.samples_filtered + result.samples_failed == SAMPLES
    assert result.samples_filtered > 0 and result.samples_failed == 0
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt is not None and ckpt.reason == "end" and ckpt.position.raw_offset == SAMPLES
    assert ckpt.counters.samples_trained == result.samples_trained
    assert kb_by_level(server.url, cfg) == reference



def test_heap_is_frozen_while_training_and_given_back(server, demo_corpus, tmp_path, reference):
    """train() hides the objects that exist when it starts from the garbage collector while it trains (a full
    collection scanned them all) and gives them back at its end; a caller's own gc.freeze() is left alone."""
    import gc
    import threading

    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(gc.get_freeze_count())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train(make_config(tmp_path, demo_corpus, "heap", server.url), progress=False)
    finally:
        done.set()
        watcher.join()
    assert max(seen) > 0 and gc.get_freeze_count() == 0

    gc.freeze()  # the caller's own (as before a fork)
    try:
        cfg = make_config(tmp_path, demo_corpus, "heap-caller", server.url)
        train(cfg, progress=False)
        assert gc.get_freeze_count() > 0  # still frozen: an unfreeze would have made it 0
    finally:
        gc.unfreeze()
    assert kb_by_level(server.url, cfg) == reference

@pytest.mark.parametrize("workers", [2, 4])
def test_parallel_equals_sequential(server, demo_corpus, tmp_path, reference, workers):
    """N workers, completions out of order: the same knowledge base as one worker."""
    cfg = make_config(tmp_path, demo_corpus, f"parallel{workers}", server.url)
    result = train_parallel(cfg, num_workers=workers)
    assert result.num_workers == workers and result.final_position == SAMPLES
    assert kb_by_level(server.url, cfg) == reference


def _start_child(processes: Zygote, cfg: RunConfig, tmp_path: Path, log: Path) -> ForkedProcess:
    """`python -m streamtrain train --config CONFIG.json --no-progress`, its output appended to ``log`` (forked by
    conftest's zygote)."""
    path = tmp_path / f"{cfg.run_name}-{cfg.num_workers}.json"
    path.write_text(cfg.model_dump_json())
    return processes.spawn(train_command(path), log)


def _journal_size(cfg: RunConfig) -> int:
    try:
        return (cfg.run_dir / "journal.jsonl").stat().st_size
    except FileNotFoundError:  # not yet written, or removed this instant by a call that found nothing trained
        return 0


def _stop_and_resume(processes: Zygote, cfg: RunConfig, tmp_path: Path, bursts: list[list[signal.Signals]],
                     seed: int, resume_workers: int | None = None) -> int:
    """Stop a training process with real signals at a random moment, once per burst (its signals sent in a row),
    then let one run to the end. Returns how many runs the signals stopped.

    Each burst waits until the child's journal grew by a random 1-300 bytes (a line is written before every
    request), so signals land at random points of the work, whatever its speed, rather than in the start-up.
    """
    rng = random.Random(seed)
    log_path = tmp_path / f"{cfg.run_name}.log"
    stopped = 0
    for burst in bursts:
        before = _journal_size(cfg)
        proc = _start_child(processes, cfg, tmp_path, log_path)
        deadline = time.monotonic() + 60
        target = before + rng.randint(1, 300)
        while proc.poll() is None and _journal_size(cfg) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is not None:
            break  # it finished before the signal: nothing left to stop
        for i, sig in enumerate(burst):
            if i:
                time.sleep(rng.uniform(0, 0.01))
            proc.send_signal(sig)
        code = proc.wait(timeout=60)
        # the CLI's 130 after a stop; a burst's later signals may come as the process exits and end it
        expected = {0, 130} | {-int(sig) for sig in burst[1:]} | {-int(sig) for sig in burst if sig == signal.SIGKILL}
        assert code in expected, log_path.read_text()[-3000:]
        stopped += code != 0
    if resume_workers is not None:
        cfg = cfg.model_copy(update={"num_workers": resume_workers})
    proc = _start_child(processes, cfg, tmp_path, log_path)
    assert proc.wait(timeout=240) == 0, log_path.read_text()[-3000:]
    return stopped


def _kill_and_resume(processes: Zygote, cfg: RunConfig, tmp_path: Path, kills: int, seed: int,
                     resume_workers: int | None = None) -> int:
    """SIGKILL a training process at random moments ``kills`` times, then let one run to the end."""
    return _stop_and_resume(processes, cfg, tmp_path, [[signal.SIGKILL]] * kills, seed, resume_workers)


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["batch", "keys", "verify"])
def test_crash_equivalence(mode, server, server_without_idempotency, demo_corpus, tmp_path, reference, zygote):
    """The headline: a trainer SIGKILLed >= 10 times and resumed leaves exactly the uninterrupted knowledge base.

    batch: one keyed learn-batch request per sample (the embedded server's fast path); keys: one keyed request
    per chunk; verify: a server without idempotency (a real KATO), one request per chunk, a lost answer decided from
    the session's observation counter and STM (client/exactly_once.py, counter mode).
    """
    srv = server if mode != "verify" else server_without_idempotency
    client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=(mode == "batch"))
    cfg = make_config(tmp_path, demo_corpus, f"crash-{mode}", srv.url, checkpoint_every=5, client=client)
    kills = 50 if SOAK else 10
    killed = _kill_and_resume(zygote, cfg, tmp_path, kills, seed={"batch": 5, "keys": 7, "verify": 11}[mode])
    assert killed == kills, f"only {killed} of {kills} kills landed before the run finished"
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.reason == "end" and ckpt.server.idempotency == (mode != "verify")
    assert kb_by_level(srv.url, cfg) == reference
    # counters are counted once too: each learn adds one to one frequency
    assert ckpt.counters.patterns_learned == [sum(reference[level].values()) for level in sorted(reference)]
    assert ckpt.counters.samples_trained + ckpt.counters.samples_filtered == SAMPLES


def test_four_workers_killed_resume_with_two(server_without_idempotency, demo_corpus, tmp_path, reference, zygote):
    """A 4-worker run killed twice and resumed with 2 workers gives the same knowledge base (no idempotency)."""
    srv = server_without_idempotency
    cfg = make_config(tmp_path, demo_corpus, "four-to-two", srv.url, num_workers=4)
    killed = _kill_and_resume(zygote, cfg, tmp_path, kills=2, seed=3, resume_workers=2)
    assert killed == 2, "a kill came after the end"
    assert kb_by_level(srv.url, cfg) == reference


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_write_an_interrupt_checkpoint(sig, server, demo_corpus, tmp_path, zygote):
    """SIGTERM and Ctrl-C: in-flight samples finish, a checkpoint with reason 'interrupt' is written, exit 130."""
    cfg = make_config(tmp_path, demo_corpus, f"signal{int(sig)}", server.url, max_samples=None, checkpoint_every=10**6)
    proc = _start_child(zygote, cfg, tmp_path, tmp_path / "child.log")
    journal = cfg.run_dir / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or journal.stat().st_size < 2000):
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130, (tmp_path / "child.log").read_text()[-3000:]
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt is not None and ckpt.reason == "interrupt" and ckpt.position.raw_offset > 0


@pytest.mark.soak
@pytest.mark.parametrize("workers", [1, 3])
def test_stopped_by_signals_at_random_moments_resumes_exactly(workers, server, demo_corpus, tmp_path, reference,
                                                              zygote):
    """Ctrl-C and SIGTERM land anywhere in the dispatcher's loop (also twice: stop without waiting); every stop
    writes its 'interrupt' checkpoint, and the resumed run still ends with exactly the uninterrupted knowledge base."""
    # checkpoints (which compact the journal) are rare here, so the journal-growth trigger keeps firing mid-run
    # two samples a request at most: 90 samples must last for all the rounds of signals
    client = ClientConfig(outage_seconds=30, read_timeout=10, samples_per_request=2)
    cfg = make_config(tmp_path, demo_corpus, f"signals-{workers}", server.url, num_workers=workers, checkpoint_every=30,
                      client=client)
    rounds = 24 if SOAK else 8
    bursts = [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGINT]]
    stopped = _stop_and_resume(zygote, cfg, tmp_path, [bursts[i % len(bursts)] for i in range(rounds)], seed=workers)
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.reason == "end"
    assert kb_by_level(server.url, cfg) == reference
    assert ckpt.counters.patterns_learned == [sum(reference[level].values()) for level in sorted(reference)]
    assert ckpt.counters.samples_trained + ckpt.counters.samples_filtered == SAMPLES
    assert stopped >= rounds // 2, f"only {stopped} of {rounds} signals landed before the run finished"


class _SignalsAtLines:
    """Sends this process SIGINT at given lines of the calling thread, counted from the start of the trainer's
    dispatch loop (in any module: the trainer, the ``datasets`` reader, checkpointing, logging...). Python runs the
    handler right there, at that line: real signals at chosen moments, which no timer can aim at."""

    def __init__(self, lines: list[int]):
        self.at, self.lines, self.armed, self.sent = sorted(lines), 0, False, 0

    def _trace(self, frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_dispatch_all":
            self.armed = True
        if event == "line" and self.armed and self.sent < len(self.at):
            self.lines += 1
            while self.sent < len(self.at) and self.lines >= self.at[self.sent]:
                self.sent += 1
                os.kill(os.getpid(), signal.SIGINT)
        return self._trace if self.sent < len(self.at) else None

    def __enter__(self):
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _train_when_unlocked(cfg: RunConfig, timeout: float = 60):
    """train(), waiting while the workers left behind by an earlier call of this process still hold the run."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return train(cfg, progress=False)
        except CheckpointError as exc:
            if "this process is still training" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_at_any_line_of_the_calling_thread_loses_nothing(workers, server_without_idempotency, demo_corpus,
                                                                 tmp_path, reference):
    """Ctrl-C at random lines of the thread that runs train() (the dispatcher, the dataset reader, checkpointing),
    once (finish the samples in flight), twice (stop without waiting) or three times (stop at once, no
    checkpoint), again and again until the run ends: exactly the uninterrupted knowledge base and counts, on a
    server without idempotency.

    A KeyboardInterrupt raised in the middle of the dispatcher's bookkeeping or of the dataset reader once left a
    checkpoint that skipped a record or lost its counts; stop signals are now requests the loop answers."""
    srv = server_without_idempotency
    rng = random.Random(workers)
    cfg = make_config(tmp_path, demo_corpus, f"lines-{workers}", srv.url, num_workers=workers, checkpoint_every=3)
    stops = {"interrupt": 0, "forced": 0}
    for _ in range(200 if SOAK else 40):
        first = rng.randint(1, 30_000)
        lines = [first + rng.randint(0, 3_000) * k for k in range(rng.choice([1, 1, 2, 3]))]
        with _SignalsAtLines(lines) as aim:
            try:
                result = _train_when_unlocked(cfg)
            except KeyboardInterrupt:  # the third signal: raised at once
                assert aim.sent == 3
                stops["forced"] += 1
                continue
        if result.reason == "end" and aim.sent == 0:
            break
        stops["interrupt"] += result.reason == "interrupt"
    else:
        result = _train_when_unlocked(cfg)
    assert result.reason == "end"
    assert kb_by_level(srv.url, cfg) == reference
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.counters.patterns_learned == [sum(reference[level].values()) for level in sorted(reference)]
    assert ckpt.counters.samples_trained + ckpt.counters.samples_filtered == SAMPLES
    assert ckpt.counters.samples_failed == 0
    assert stops["interrupt"] >= 5 and stops["forced"] >= 1, stops

def test_server_gone_writes_error_checkpoint_and_raises(demo_corpus, tmp_path):
    """The server dies for good mid-run: an 'error' checkpoint is written and the error is raised."""
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        cfg = make_config(tmp_path, demo_corpus, "server-gone", srv.url, max_samples=None,
                          client=ClientConfig(outage_seconds=2, read_timeout=2, backoff_max=0.5))
        import threading

        threading.Timer(1.5, srv.kill).start()
        with pytest.raises(ServerUnavailable):
            train(cfg, progress=False)
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.reason == "error" and "ServerUnavailable" in (ckpt.error or "")


def test_raising_max_samples_continues_where_it_ended(server, demo_corpus, tmp_path, reference, caplog):
    """Train to 40, then to 90: the second call starts at the first one's end; same KB as one run to 90. A third
    call with max_samples lowered to 60 reads nothing, trains nothing, and says why."""
    first = train(make_config(tmp_path, demo_corpus, "extend", server.url, max_samples=40), progress=False)
    second = train(make_config(tmp_path, demo_corpus, "extend", server.url), progress=False)
    assert first.final_position == 40 and second.start_position == 40 and second.resumed
    assert second.samples_trained == first.samples_trained + second.new_samples
    assert kb_by_level(server.url, make_config(tmp_path, demo_corpus, "extend", server.url)) == reference
    with caplog.at_level("WARNING", logger="streamtrain"):
        third = train(make_config(tmp_path, demo_corpus, "extend", server.url, max_samples=60), progress=False)
    assert (third.start_position, third.final_position, third.new_samples) == (SAMPLES, SAMPLES, 0)
    assert third.samples_trained == second.samples_trained
    assert "at or past max_samples=60" in caplog.text
    assert kb_by_level(server.url, make_config(tmp_path, demo_corpus, "extend", server.url)) == reference


def test_must_match_change_is_refused(server, demo_corpus, tmp_path):
    """A different layer setup cannot continue the run; the message names the field."""
    train(make_config(tmp_path, demo_corpus, "mismatch", server.url, max_samples=10), progress=False)
    changed = make_config(tmp_path, demo_corpus, "mismatch", server.url, layers=[LayerConfig(chunk_size=5)])
    with pytest.raises(ResumeMismatch, match=r"layers\[0\]\.chunk_size: checkpoint=6 current=5"):
        train(changed, progress=False)


def test_fresh_refuses_then_moves_aside(server, demo_corpus, tmp_path):
    """fresh=True will not start over existing checkpoints unless asked to move them aside."""
    cfg = make_config(tmp_path, demo_corpus, "fresh", server.url, max_samples=5)
    train(cfg, progress=False)
    with pytest.raises(CheckpointError, match="move"):
        train(cfg, fresh=True, progress=False)
    result = train(cfg, fresh=True, move_aside=True, progress=False)
    assert result.start_position == 0 and not result.resumed
    assert any(p.name.startswith("fresh.moved-") for p in cfg.run_dir.parent.iterdir())


def test_failed_samples_are_retried_and_stop_the_run_past_max_failures(demo_corpus, tmp_path):
    """Steps the server rejects for their size (even alone in a request) fail their samples, listed with raw index
    and the steps that took effect; past max_failures the run stops. With the limit lifted, the next call retries
    each failure from its first step not applied: the knowledge base equals a run that never failed."""
    layers = [LayerConfig(chunk_size=40)]
    # 480 bytes: some chunks of 40 words do not fit even alone, some samples fail after their first chunk
    with EmbeddedServer(tmp_path / "kb.sqlite3", extra_args=["--max-body-bytes", "480"]) as srv:
        cfg = make_config(tmp_path, demo_corpus, "failing", srv.url, layers=layers, max_failures=1000)
        result = train(cfg, progress=False)
        assert result.samples_failed > 0 and result.samples_trained > 0 and result.reason == "end"
        assert all(f.error for f in result.failures) and len(result.failures) == result.samples_failed
        assert any(f.steps_done > 0 for f in result.failures)  # some failed after a first part took effect
        strict = make_config(tmp_path / "strict", demo_corpus, "failing", srv.url, layers=layers, max_failures=0)
        from streamtrain.errors import TooManyFailures

        with pytest.raises(TooManyFailures):
            train(strict, progress=False)
    ckpt = CheckpointStore(strict.run_dir).latest()
    assert ckpt.reason == "error" and ckpt.failures
    with EmbeddedServer(tmp_path / "kb.sqlite3") as srv:
        retried = train(cfg.with_overrides(server_url=srv.url), progress=False)
        assert retried.samples_failed == 0 and not retried.failures
        assert retried.samples_trained == result.samples_trained + result.samples_failed
        assert retried.samples_filtered == result.samples_filtered and retried.final_position == SAMPLES
        clean = make_config(tmp_path / "clean", demo_corpus, "never-failed", srv.url, layers=layers)
        assert train(clean, progress=False).samples_trained == retried.samples_trained
        assert kb_by_level(srv.url, cfg) == kb_by_level(srv.url, clean)


def test_embedded_server_by_default(demo_corpus, tmp_path):
    """No server_url: the embedded server runs for the run, its database beside the checkpoints, found on resume."""
    cfg = make_config(tmp_path, demo_corpus, "embedded", None, max_samples=20)
    first = train(cfg, progress=False)
    assert (cfg.run_dir / "kb.sqlite3").exists() and first.final_position == 20
    second = train(cfg.model_copy(update={"max_samples": 30}), progress=False)
    assert second.start_position == 20
    with EmbeddedServer(cfg.run_dir / "kb.sqlite3") as srv:
        kb = kb_by_level(srv.url, cfg)
    assert sum(kb[0].values()) == second.patterns_learned[0]


def test_killed_trainer_with_its_own_embedded_server_resumes_exactly(demo_corpus, tmp_path, reference,
                                                                     zygote):
    """Default mode (no server_url): the trainer and its embedded server child are killed with it; the orphaned
    server shuts itself down, and the resumed trainer's server reopens the same knowledge base: still exact."""
    # 2 samples per request: with the default 128 the whole run is one or two requests, and a kill aimed at the
    # journal's growth can come after the end on a fast machine
    client = ClientConfig(outage_seconds=30, read_timeout=10, samples_per_request=2)
    cfg = make_config(tmp_path, demo_corpus, "embedded-crash", None, checkpoint_every=5, client=client)
    assert _kill_and_resume(zygote, cfg, tmp_path, kills=3, seed=5) == 3, "a kill came after the end"
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.reason == "end" and ckpt.server.embedded
    with EmbeddedServer(cfg.run_dir / "kb.sqlite3") as srv:
        assert kb_by_level(srv.url, cfg) == reference


@pytest.mark.parametrize("mode", ["batch", "verify"])
def test_training_through_faults_is_exact(mode, server, server_without_idempotency, demo_corpus, tmp_path, reference):
    """10% of requests dropped before or after reaching the server, answered 503/429, or stalled past the read
    timeout: the run finishes with exactly the fault-free knowledge base.

    One sample per request in batch mode: the proxy draws its faults in request order from a fixed seed, so a run
    of ~100 requests meets every kind, whatever the timing (several samples per request: the next test)."""
    from faultproxy import FaultProxy

    srv = server if mode == "batch" else server_without_idempotency
    client = ClientConfig(read_timeout=0.3, outage_seconds=30, backoff_initial=0.01, backoff_max=0.1,
                          samples_per_request=1)
    kinds = ("drop_before", "drop_after", "503", "429", "stall")
    with FaultProxy(srv.url, fault_rate=0.1, seed=3, kinds=kinds, retry_after="0", stall_seconds=0.6) as proxy:
        cfg = make_config(tmp_path, demo_corpus, f"faults-{mode}", proxy.url, client=client, num_workers=2)
        result = train(cfg, progress=False)
        counts = proxy.counts
    faults = {kind: counts.get(kind, 0) for kind in ("drop_before", "drop_after", "503", "429", "stall")}
    assert result.samples_failed == 0 and sum(faults.values()) >= 5 and faults["drop_after"] > 0, counts
    assert kb_by_level(srv.url, cfg) == reference


def test_several_samples_per_request_through_lost_answers_is_exact(server, demo_corpus, tmp_path, reference):
    """Half of the learn-batches requests (several samples each, a key per sample) lose their answer after the
    server applied them (the ambiguous case; the other kinds are in the test above): every sample is still
    learned exactly once."""
    from faultproxy import FaultProxy

    # up to 4 samples per request: some 25 requests, so that about half of them lose their answer whatever the
    # timing (with up to 128, a fast dispatcher filled 2-4 requests in all, and the seeded faults could miss them)
    client = ClientConfig(read_timeout=2, outage_seconds=30, backoff_initial=0.01, backoff_max=0.1,
                          samples_per_request=4)
    with FaultProxy(server.url, fault_rate=0.5, seed=5, kinds=("drop_after",),
                    match=lambda method, path: path == "/learn-batches") as proxy:
        cfg = make_config(tmp_path, demo_corpus, "faults-batches", proxy.url, client=client, num_workers=2)
        result = train(cfg, progress=False)
        counts = proxy.counts
    assert result.samples_failed == 0 and counts.get("drop_after", 0) > 0, counts
    assert kb_by_level(server.url, cfg) == reference


def test_journal_write_failure_stops_the_run_with_a_clear_error(server, demo_corpus, tmp_path, zygote):
    """A journal that cannot be appended to (a full disk: here the kernel's file-size limit on the trainer's
    process) stops the run with a CheckpointError saying what to do, instead of hanging or training unjournaled;
    once there is room, the same run finishes with exactly the knowledge base of a run that never stopped."""
    samples = 300
    cfg = make_config(tmp_path, demo_corpus, "journal-full", server.url, num_workers=2, max_samples=samples,
                      checkpoint_every=10_000)
    path = tmp_path / "run.json"
    path.write_text(cfg.model_dump_json())

    # in the child: writes past 16 KB fail (EFBIG) instead of killing it; its own output stays far below that
    out, err = tmp_path / "child.out", tmp_path / "child.err"
    code = zygote.spawn(train_command(path), out, err, fsize_limit=16_000).wait(timeout=240)
    stderr = err.read_text()
    assert code == 1 and "cannot append to the journal" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    ckpt = CheckpointStore(cfg.run_dir).latest()
    assert ckpt.reason == "error" and "journal" in ckpt.error and ckpt.position.raw_offset < samples
    assert train(cfg, progress=False).final_position == samples
    clean = make_config(tmp_path, demo_corpus, "journal-room", server.url, max_samples=samples)
    train(clean, progress=False)
    assert kb_by_level(server.url, cfg) == kb_by_level(server.url, clean)
