"""People and servers acting on a run, as they do outside the tests' usual aim at the trainer's pid: a terminal's
Ctrl-C and a supervisor's SIGTERM sent to the whole process group, the trainer's own embedded server killed
mid-run (restarted; or not restartable), an external server killed and restarted mid-run, and a call in a
background thread stopped by its event. Every one through the real command or API on real processes, and each
exact run compared with the uninterrupted reference knowledge base.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from runs import SAMPLES, kb_by_level, make_config
from zygote import ForkedProcess, Zygote

from streamtrain.config import ClientConfig, RunConfig
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.server import EmbeddedServer
from streamtrain.trainer import train, train_parallel

# The run's requests met the dead server (the kill landed while it still had samples to send): the outage's warning
# (past a blip of 1 s), or a lost answer decided.
MET_DEAD_SERVER = re.compile(r"(refusing|dropping) connections since|answer lost")


def _write_config(cfg: RunConfig, tmp_path: Path) -> Path:
    path = tmp_path / f"{cfg.run_name}.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def _command(zygote: Zygote, config: Path, log: Path, *options: str, new_session: bool = False) -> ForkedProcess:
    """`python -m streamtrain train --config CONFIG --no-progress`, its stdout and stderr in ``log``."""
    return zygote.spawn([sys.executable, "-m", "streamtrain", "train", "--config", config, "--no-progress", *options],
                        log, new_session=new_session)


def _wait_for_checkpoint(cfg: RunConfig, running: ForkedProcess | threading.Thread, timeout: float = 60) -> None:
    """Until the run has written its first checkpoint (it is training, past its start-up)."""
    deadline = time.monotonic() + timeout
    alive = running.is_alive if isinstance(running, threading.Thread) else (lambda: running.poll() is None)
    while not CheckpointStore(cfg.run_dir).paths():
        assert alive(), "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time allowed"
        time.sleep(0.01)


def _servers_on(db: Path) -> list[psutil.Process]:
    """Every embedded server process serving ``db``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "streamtrain.server" in cmd and str(db) in cmd:
            found.append(proc)
    return found


def _own_server(trainer_pid: int) -> psutil.Process:
    """The trainer's embedded server: its child process."""
    children = [c for c in psutil.Process(trainer_pid).children() if "streamtrain.server" in c.cmdline()]
    assert len(children) == 1, children
    return children[0]


def _embedded_kb(cfg: RunConfig) -> dict[int, dict[str, int]]:
    with EmbeddedServer(cfg.run_dir / "kb.sqlite3") as srv:
        return kb_by_level(srv.url, cfg)


# -- Ctrl-C and SIGTERM to the process group ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_reaches_the_trainer_not_its_server(sig, demo_corpus, tmp_path, reference,
                                                                          zygote):
    """The command runs as a shell's foreground job (leading its own process group); Ctrl-C (SIGINT) or a
    supervisor's `kill -TERM -PGID` goes to the whole group. The embedded server, in a group of its own, is not
    hit: the trainer finishes its in-flight samples, checkpoints 'interrupt', stops its server and exits 130; the
    same command then ends with exactly the uninterrupted knowledge base."""
    # one request per chunk: the run lasts a few seconds, so the signal lands mid-run
    client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=False)
    cfg = make_config(tmp_path, demo_corpus, f"group-{sig.name}", None, client=client)
    config, log = _write_config(cfg, tmp_path), tmp_path / "command.log"
    proc = _command(zygote, config, log, new_session=True)
    _wait_for_checkpoint(cfg, proc)
    server = _own_server(proc.pid)
    assert os.getpgid(proc.pid) == proc.pid and os.getpgid(server.pid) != proc.pid
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    stopped = CheckpointStore(cfg.run_dir).latest()
    assert stopped.reason == "interrupt" and stopped.position.raw_offset < SAMPLES
    assert "Traceback" not in log.read_text() and "exited unexpectedly" not in log.read_text()
    assert not server.is_running() and _servers_on(cfg.run_dir / "kb.sqlite3") == []  # the trainer stopped it

    assert _command(zygote, config, log).wait(timeout=120) == 0, log.read_text()[-3000:]
    assert CheckpointStore(cfg.run_dir).latest().reason == "end"
    assert _embedded_kb(cfg) == reference


# -- the trainer's own server dies -------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_batch", [True, False], ids=["learn-batches", "keys"])
def test_the_trainers_own_server_killed_mid_run_is_restarted_and_the_call_ends_exactly(
        learn_batch, demo_corpus, tmp_path, reference, zygote):
    """SIGKILL (an OOM kill) of the trainer's embedded server mid-run: the trainer says so at once (how it ended,
    where its log is), restarts it on the same database and port, and the one call exits 0 with exactly the
    uninterrupted knowledge base."""
    client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=learn_batch, samples_per_request=1)
    cfg = make_config(tmp_path, demo_corpus, f"own-server-{learn_batch}", None, client=client)
    log = tmp_path / "command.log"
    proc = _command(zygote, _write_config(cfg, tmp_path), log, "-v")
    _wait_for_checkpoint(cfg, proc)
    server = _own_server(proc.pid)
    server.kill()
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    server_log = cfg.run_dir / "server.log"
    assert f"(pid {server.pid}, " in text and "exited unexpectedly (killed by signal SIGKILL)" in text, text[-3000:]
    assert f"its log: {server_log}" in text and "restart 1 of at most" in text and "embedded server restarted" in text
    after_restart = text[text.index("embedded server restarted"):]
    assert "(interval) at raw position" in after_restart, "nothing was trained after the restart: the kill came late"
    assert CheckpointStore(cfg.run_dir).latest().reason == "end"
    assert _servers_on(cfg.run_dir / "kb.sqlite3") == []
    assert _embedded_kb(cfg) == reference


def test_a_server_that_cannot_be_restarted_stops_the_run_at_once_with_its_cause(demo_corpus, tmp_path, zygote):
    """The database file is replaced by one that is not a database, then the server is killed: its restart
    fails, and the run stops at once (its clients' retries cut short: their budget here is 10 minutes) with an
    'error' checkpoint, exit 1 and a message naming how the server ended and the end of its log."""
    client = ClientConfig(outage_seconds=600, read_timeout=10, learn_batch=False)
    cfg = make_config(tmp_path, demo_corpus, "lost-server", None, client=client)
    log = tmp_path / "command.log"
    proc = _command(zygote, _write_config(cfg, tmp_path), log)
    _wait_for_checkpoint(cfg, proc)
    server = _own_server(proc.pid)
    # a file put in the database's place, without the old one's write-ahead log (SQLite would read the pages it
    # holds, the first included, over the new file's)
    db = cfg.run_dir / "kb.sqlite3"
    garbage = cfg.run_dir / "garbage"
    garbage.write_bytes(b"this is not a database file " * 1000)
    os.replace(garbage, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    server.kill()
    assert proc.wait(timeout=60) == 1, log.read_text()[-3000:]  # not after the clients' 600 s budget
    text = log.read_text()
    assert "Traceback" not in text
    said = "error: the run's embedded server exited unexpectedly (killed by signal SIGKILL) and could not be restarted"
    assert said in text, text[-3000:]
    error = text[text.index(said):]  # the CLI's one message: the server's exit, then the end of its log
    assert "exited (exit code 2) during startup" in error and str(cfg.run_dir / "server.log") in error
    assert "this file is not a streamtrain server database" in error
    stopped = CheckpointStore(cfg.run_dir).latest()
    assert stopped.reason == "error" and "could not be restarted" in (stopped.error or "")
    assert _servers_on(cfg.run_dir / "kb.sqlite3") == []


# -- an external server dies and comes back ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["learn-batches", "keys", "counter"])
def test_an_external_server_killed_and_restarted_mid_run_leaves_the_call_exact(mode, demo_corpus, tmp_path,
                                                                                reference, caplog):
    """The run's server (given as server_url) is SIGKILLed mid-run and started again on the same database 1.5 s
    later: the one call ends with exactly the uninterrupted knowledge base, in every protocol (keys where the
    server has them; without them, as on a real KATO, the counter protocol decides each lost answer)."""
    client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=mode == "learn-batches",
                          samples_per_request=1)
    with EmbeddedServer(tmp_path / "kb.sqlite3", idempotency=mode != "counter") as srv:
        cfg = make_config(tmp_path, demo_corpus, f"external-{mode}", srv.url, client=client)
        outcome: dict = {}
        call = threading.Thread(target=lambda: outcome.update(result=train(cfg, progress=False)))
        with caplog.at_level("INFO", logger="streamtrain"):
            call.start()
            _wait_for_checkpoint(cfg, call)
            srv.kill()
            time.sleep(1.5)
            srv.start()
            call.join(timeout=120)
        assert not call.is_alive() and "result" in outcome, "the call did not end"
        result = outcome["result"]
        assert result.reason == "end" and result.samples_failed == 0 and result.final_position == SAMPLES
        assert MET_DEAD_SERVER.search(caplog.text), "no request met the dead server"
        assert kb_by_level(srv.url, cfg) == reference


# -- a call in a background thread, stopped by its event ----------------------------------------------------------


def test_a_call_in_a_background_thread_stops_on_its_event_and_resumes_exactly(server, demo_corpus, tmp_path,
                                                                               reference):
    """No signal reaches a thread: setting ``stop`` is its Ctrl-C. The call finishes its in-flight samples,
    checkpoints 'interrupt' and returns; the next call (``train_parallel``, also stoppable) resumes exactly."""
    client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=False)
    cfg = make_config(tmp_path, demo_corpus, "thread-stop", server.url, client=client)
    stop = threading.Event()
    outcome: dict = {}
    call = threading.Thread(target=lambda: outcome.update(result=train(cfg, progress=False, stop=stop)))
    call.start()
    _wait_for_checkpoint(cfg, call)
    stop.set()
    call.join(timeout=60)
    assert not call.is_alive() and "result" in outcome, "the call did not stop"
    stopped = outcome["result"]
    assert stopped.reason == "interrupt" and stopped.final_position < SAMPLES
    assert CheckpointStore(cfg.run_dir).latest().reason == "interrupt"
    resumed = train_parallel(cfg, 2, progress=False, stop=threading.Event())
    assert resumed.reason == "end" and resumed.start_position == stopped.final_position
    assert kb_by_level(server.url, cfg) == reference


# -- a notebook's own server dies ----------------------------------------------------------------------------------


def test_a_notebook_connections_server_killed_is_restarted_under_the_same_url(tmp_path, caplog):
    """``connect(None, db)`` (what training.ipynb does): the notebook's server outlives cells, so one that dies
    (an OOM kill) is said and restarted on the same database, port and token; the connection's client, and the
    trainers given its URL, go on. Closing the connection stops it."""
    from streamtrain.serverconn import connect

    db = tmp_path / "kb.sqlite3"
    with caplog.at_level("INFO", logger="streamtrain"), connect(None, db) as conn:
        first = conn.server.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while conn.server.pid in (None, first):
            assert time.monotonic() < deadline, "the connection's server was not restarted"
            time.sleep(0.05)
        assert conn.client.health().status == "healthy"
        assert re.search(rf"the notebook connection's embedded server \(pid {first}, .*\) exited unexpectedly "
                         r"\(killed by signal SIGKILL\)", caplog.text), caplog.text
    assert _servers_on(db) == []
