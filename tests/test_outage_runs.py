"""Server outages during a run, through the real fault proxy between the trainer and a real server process: an
outage shorter than client.outage_seconds is ridden out in ONE call with exactly the uninterrupted knowledge base, in
every protocol; the progress bar and the log say what the run waits for; past the budget the run stops with an
'error' checkpoint and the same command finishes it once the server is back."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import pytest
from faultproxy import FaultProxy
from runs import SAMPLES, kb_by_level, make_config

from streamtrain.cli import EXIT_ERROR, EXIT_OK, main
from streamtrain.config import ClientConfig
from streamtrain.errors import CheckpointError
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.trainer import train

# learn-batches: the embedded server's default (keyed, several samples per request); keys: one keyed request per
# chunk (client.learn_batch = false); counter: a server without idempotency, as a real KATO (the counter protocol)
PROTOCOLS = ["learn-batches", "keys", "counter"]
# the outage begins after this many POSTs: a few requests into the run, most of its 90 samples still to be sent
POSTS_BEFORE = {"learn-batches": 4, "keys": 60, "counter": 60}
STATUS = re.compile(r"server (?:\S+ )?answering 500 since \d\d:\d\d:\d\d, retrying \((\d+) s left\)")


def _client(protocol: str, **changes) -> ClientConfig:
    # a few samples per request, so that the run has many requests; short backoff steps, so that the run goes on
    # within a second of the server's return
    fields = dict(outage_seconds=60, read_timeout=10, backoff_max=1.0, learn_batch=protocol == "learn-batches",
                  samples_per_request=4)
    fields.update(changes)
    return ClientConfig(**fields)


def _lock_is_free(run_dir) -> bool:
    try:
        with CheckpointStore(run_dir).lock():
            return True
    except CheckpointError:
        return False


class Posts:
    """The proxy's outage matcher: every POST, each one's time kept (to check the outage came mid-run)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, method: str, path: str) -> bool:
        if method != "POST":
            return False
        self.times.append(time.monotonic())
        return True


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_500_outage_mid_run_is_ridden_out_in_one_call_exactly(
        protocol, server, server_without_idempotency, demo_corpus, tmp_path, reference, caplog, capsys):
    """Every POST answered 500 for 8 s mid-run: the one call ends with reason 'end', no sample failed, and exactly
    the uninterrupted knowledge base. Meanwhile the bar counts the budget down and the log warns, then says when
    the server answers again."""
    srv = server_without_idempotency if protocol == "counter" else server
    posts = Posts()
    with FaultProxy(srv.url, fault_rate=0.0) as proxy, caplog.at_level(logging.INFO, logger="streamtrain"):
        proxy.outage(8.0, "500", after=POSTS_BEFORE[protocol], match=posts)
        cfg = make_config(tmp_path, demo_corpus, f"ride-{protocol}", proxy.url, client=_client(protocol),
                          num_workers=2)
        result = train(cfg, progress=True)
        began, ended = proxy.outage_window
        answered = proxy.counts.get("outage", 0)
    assert result.reason == "end" and result.final_position == SAMPLES
    assert result.samples_failed == 0 and not result.failures and result.checkpoints_written >= 1
    assert kb_by_level(srv.url, cfg) == reference
    # the outage came mid-run, lasted its 8 s, and was met by retries
    assert began is not None and ended is not None and ended - began >= 8.0 and answered >= 3
    assert any(t < began for t in posts.times) and any(t > ended for t in posts.times)
    # the log: a warning naming the server and counting down from the budget; one line when it answers again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and STATUS.search(r.getMessage())]
    assert warnings and proxy.url in warnings[0]
    assert all(50 <= int(STATUS.search(w).group(1)) < 60 for w in warnings)
    assert len(warnings) <= 2  # rate-limited: not one per attempt of each worker
    again = [r.getMessage() for r in caplog.records if "answering again after" in r.getMessage()]
    said = [re.search(r"answering again after (\d+\.\d) s \(it was answering 500\)", m) for m in again]
    assert len(said) == 1 and said[0], again
    # how long it was down, as the proxy saw it: from its first 500 to the first POST it forwarded again
    back = min(t for t in posts.times if t >= ended)
    assert abs(float(said[0].group(1)) - (back - began)) < 1.0, (again, back - began)
    # the bar: the same words, counting down second by second, then the run's name alone again
    bar = capsys.readouterr().err
    lefts = [int(n) for n in STATUS.findall(bar)]
    assert len(set(lefts)) >= 5 and lefts == sorted(lefts, reverse=True) and lefts[0] < 60
    assert bar.rstrip().rsplit("\r", 1)[-1].startswith(f"ride-{protocol}: 100%")


@pytest.mark.parametrize("protocol", ["learn-batches", "counter"])
def test_refused_connections_mid_run_are_ridden_out_in_one_call_exactly(
        protocol, server, server_without_idempotency, demo_corpus, tmp_path, reference, caplog):
    """The proxy stops listening for 3 s mid-run and drops its open connections (a server restarting: requests in
    flight may have been applied, unanswered): one call, exactly the uninterrupted knowledge base."""
    srv = server_without_idempotency if protocol == "counter" else server
    posts = Posts()
    with FaultProxy(srv.url, fault_rate=0.0) as proxy, caplog.at_level(logging.WARNING, logger="streamtrain"):
        proxy.outage(3.0, "refuse", after=POSTS_BEFORE[protocol], match=posts)
        cfg = make_config(tmp_path, demo_corpus, f"refused-{protocol}", proxy.url, client=_client(protocol),
                          num_workers=2)
        result = train(cfg, progress=False)
        began, ended = proxy.outage_window
    assert result.reason == "end" and result.final_position == SAMPLES and result.samples_failed == 0
    assert kb_by_level(srv.url, cfg) == reference
    assert began is not None and ended is not None and ended - began >= 3.0
    assert any(t < began for t in posts.times) and any(t > ended for t in posts.times)
    assert any(re.search(r"server \S+ refusing connections since \d\d:\d\d:\d\d, retrying \(\d+ s left\)",
                         r.getMessage()) for r in caplog.records)


def test_past_the_budget_the_run_stops_and_the_same_command_finishes_it(
        server_without_idempotency, demo_corpus, tmp_path, reference, capsys):
    """Through the CLI, on a server without keys (the counter protocol): every POST answered 500 for longer than a
    2 s budget stops the run with exit code 1, an 'error' checkpoint and a message naming the cause, how long it
    lasted and what to do; once the server is back, the same command exits 0 with exactly the uninterrupted KB."""
    srv = server_without_idempotency
    with FaultProxy(srv.url, fault_rate=0.0) as proxy:
        proxy.outage(3600.0, "500", after=POSTS_BEFORE["counter"], match=Posts())
        cfg = make_config(tmp_path, demo_corpus, "past-budget", proxy.url,
                          client=_client("counter", outage_seconds=2.0, backoff_max=0.5))
        config = tmp_path / "run.json"
        config.write_text(cfg.model_dump_json())
        command = ["train", "--config", str(config), "--no-progress"]
        assert main(command) == EXIT_ERROR
        err = capsys.readouterr().err
        assert re.search(r"has been answering 500 since \d\d:\d\d:\d\d \(\d\.\d s\), longer than "
                         r"client.outage_seconds \(2 s\)", err), err
        assert "run the same command again" in err and "raise client.outage_seconds" in err
        stopped = CheckpointStore(cfg.run_dir).latest()
        assert stopped.reason == "error" and "answering 500" in stopped.error
        assert stopped.counters.samples_failed == 0 and stopped.position.raw_offset < SAMPLES
        proxy.end_outage()  # the server is back
        assert main(command) == EXIT_OK
    assert kb_by_level(srv.url, cfg) == reference


def test_two_ctrl_c_in_an_outage_leave_no_worker_waiting(server, demo_corpus, tmp_path, reference, caplog):
    """Ctrl-C twice while every POST is answered 500: the first says that the samples in flight wait for the failing
    server; the call returns 'interrupt' and its workers left behind stop waiting for the server at once (not for
    the rest of the budget, holding the run's lock); once the server is back, the next call finishes the run
    exactly."""
    with FaultProxy(server.url, fault_rate=0.0) as proxy:
        proxy.outage(3600.0, "500", after=POSTS_BEFORE["learn-batches"], match=Posts())
        cfg = make_config(tmp_path, demo_corpus, "two-ctrl-c", proxy.url, client=_client("learn-batches"),
                          num_workers=2)

        def ctrl_c_twice() -> None:  # the run cannot end before: its workers wait for the server (60 s budget)
            deadline = time.monotonic() + 60
            while proxy.counts.get("outage", 0) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c_twice, daemon=True).start()
        with caplog.at_level(logging.WARNING, logger="streamtrain"):
            result = train(cfg, progress=False)
        assert result.reason == "interrupt" and result.final_position < SAMPLES
        assert re.search(r"finish their current sample, which waits for the server answering 500 since "
                         r"\d\d:\d\d:\d\d, retrying \(\d+ s left\) \(Ctrl-C again", caplog.text), caplog.text
        deadline = time.monotonic() + 10
        while not _lock_is_free(cfg.run_dir):  # held until the workers left behind have stopped
            assert time.monotonic() < deadline, "a worker kept waiting for the server after its call ended"
            time.sleep(0.05)
        assert not any(t.name.startswith("streamtrain-worker-") for t in threading.enumerate())
        proxy.end_outage()
        result = train(cfg, progress=False)
    assert result.reason == "end" and result.final_position == SAMPLES and result.samples_failed == 0
    assert kb_by_level(server.url, cfg) == reference
