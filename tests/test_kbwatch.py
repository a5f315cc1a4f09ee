"""The knowledge base is watched during a call: a node cleared or a server swapped mid-call stops the run, rolls it
back to its last good checkpoint, and the run resumes exactly once the right knowledge base is back.

The integration tests train against their own server process through a FaultProxy that injects no fault: its
``match`` hook acts on the server (copies its database, clears a node, restarts it on another database) just before
it forwards a chosen request, so the change lands at a known point of the call."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from faultproxy import FaultProxy
from hypothesis import given
from hypothesis import strategies as st
from runs import kb_by_level, make_config, train_command

from streamtrain.cli import EXIT_ERROR, EXIT_OK, main
from streamtrain.config import ClientConfig, RunConfig
from streamtrain.kbcheck import Learned, knowledge_base_problems, next_record
from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.records.journal import FILENAME, Journal, read_journal
from streamtrain.records.knowledge_base import KnowledgeBaseRecord, NodeTotals, Probe
from streamtrain.server import EmbeddedServer
from streamtrain.trainer import train

# -- the comparison: records in, problems out ----------------------------------------------------------------


def _record(db: str | None = "db-a", nodes: dict[str, tuple[int, int]] | None = None,
            probes: list[tuple[int, str, str, int]] | None = None) -> KnowledgeBaseRecord:
    return KnowledgeBaseRecord(
        database_id=db,
        nodes=[NodeTotals(node_id=n, patterns=p, total_frequency=f) for n, (p, f) in (nodes or {}).items()],
        probes=[Probe(level=lv, node_id=n, name=name, frequency=f) for lv, n, name, f in (probes or [])])


def test_a_kb_that_only_grew_has_no_problem():
    expected = _record(nodes={"r-L0": (10, 20), "r-L1": (3, 3)}, probes=[(0, "r-L0", "PTRN|a", 2)])
    found = _record(nodes={"r-L0": (10, 25), "r-L1": (4, 4), "other": (1, 1)},
                    probes=[(0, "r-L0", "PTRN|a", 5), (1, "r-L1", "PTRN|b", 1)])
    assert knowledge_base_problems(expected, found, [Learned(1, "r-L1", "PTRN|b")]) == []
    assert knowledge_base_problems(None, found) == []


def test_each_shortfall_names_what_was_expected_and_what_was_found():
    expected = _record(nodes={"r-L0": (10, 20), "r-L1": (3, 3), "r-L2": (1, 1)},
                       probes=[(0, "r-L0", "PTRN|a", 2), (1, "r-L1", "PTRN|b", 4)])
    found = _record(db="db-b", nodes={"r-L0": (10, 19), "r-L1": (2, 9)}, probes=[(1, "r-L1", "PTRN|b", 3)])
    assert knowledge_base_problems(expected, found, [Learned(2, "r-L2", "PTRN|c")]) == [
        "database id: expected db-a, found db-b (another or a new database)",
        "node r-L0: expected at least 10 patterns (total frequency 20), found 10 (total frequency 19)",
        "node r-L1: expected at least 3 patterns (total frequency 3), found 2 (total frequency 9)",
        "node r-L2: expected at least 1 patterns (total frequency 1), found 0 (total frequency 0)",
        "node r-L0: pattern PTRN|a is missing (learned by this run)",
        "node r-L1: pattern PTRN|b has frequency 3, expected at least 4",
        "node r-L2: expected pattern PTRN|c (level 2, learned by this run since the last check), found none",
    ]
    not_embedded = _record(db=None)
    assert knowledge_base_problems(expected, not_embedded)[0] == (
        "database id: expected db-a, found none (not the embedded server) (another or a new database)")


def test_patterns_learned_since_the_last_check_must_be_there():
    """A fresh run's first record holds no totals of its nodes: a node cleared before the first checkpoint shows
    only as a pattern the run learned that is gone. One named in both lists is reported once."""
    start = _record(nodes={})
    learned = [Learned(0, "r-L0", "PTRN|a"), Learned(0, "r-L0", "PTRN|x"), Learned(1, "r-L1", "PTRN|b")]
    found = _record(nodes={"r-L0": (3, 3)}, probes=[(0, "r-L0", "PTRN|a", 1)])
    assert knowledge_base_problems(start, found, learned) == [
        "node r-L0: expected pattern PTRN|x (level 0, learned by this run since the last check), found none",
        "node r-L1: expected pattern PTRN|b (level 1, learned by this run since the last check), found none",
    ]
    expected = _record(probes=[(0, "r-L0", "PTRN|x", 1)])
    assert knowledge_base_problems(expected, _record(), [Learned(0, "r-L0", "PTRN|x")]) == [
        "node r-L0: pattern PTRN|x is missing (learned by this run)"]


node_totals = st.dictionaries(st.sampled_from(["r-L0", "r-L1", "r-L2"]), st.tuples(st.integers(0, 50), st.integers(0, 99)))
probe_list = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["r-L0", "r-L1"]), st.sampled_from("abcdef"),
                                st.integers(1, 9)), unique_by=lambda p: (p[1], p[2]), max_size=6)


@given(nodes=node_totals, probes=probe_list, data=st.data())
def test_any_kb_that_only_grew_has_no_problem_and_any_shortfall_is_named(nodes, probes, data):
    """Totals and probe frequencies anywhere at least the recorded ones, nodes and patterns added: no problem.
    Then one shortfall (the database swapped, a node's count or frequency down, a probe gone or down): named."""
    recorded = [(lv, n, f"PTRN|{x}", f) for lv, n, x, f in probes]
    expected = _record(nodes=nodes, probes=recorded)
    grow = lambda: data.draw(st.integers(0, 5))  # noqa: E731
    found = _record(nodes={n: (p + grow(), f + grow()) for n, (p, f) in nodes.items()} | {"other": (3, 3)},
                    probes=[(lv, n, name, f + grow()) for lv, n, name, f in recorded] + [(0, "r-L0", "PTRN|zz", 1)])
    assert knowledge_base_problems(expected, found) == []

    shortfalls = (["database"] + [f"node-{n}" for n, totals in nodes.items() if totals != (0, 0)]
                  + [f"probe-{i}" for i in range(len(probes))])
    short = data.draw(st.sampled_from(shortfalls))
    if short == "database":
        found = found.model_copy(update={"database_id": "db-other"})
        named = "database id: expected db-a, found db-other (another or a new database)"
    elif short.startswith("node-"):
        node = short[5:]
        want_p, want_f = nodes[node]
        lower = ((want_p - 1, want_f) if want_p and (not want_f or data.draw(st.booleans())) else (want_p, want_f - 1))
        found = found.model_copy(update={"nodes": [t.model_copy(update={"patterns": lower[0], "total_frequency": lower[1]})
                                                   if t.node_id == node else t for t in found.nodes]})
        named = f"node {node}: expected at least {want_p} patterns (total frequency {want_f}), found {lower[0]} " \
                f"(total frequency {lower[1]})"
    else:
        _, node, x, freq = probes[int(short[6:])]
        name = f"PTRN|{x}"
        if freq > 1 and data.draw(st.booleans()):
            found = found.model_copy(update={"probes": [p.model_copy(update={"frequency": freq - 1})
                                                        if (p.node_id, p.name) == (node, name) else p
                                                        for p in found.probes]})
            named = f"node {node}: pattern {name} has frequency {freq - 1}, expected at least {freq}"
        else:
            found = found.model_copy(update={"probes": [p for p in found.probes if (p.node_id, p.name) != (node, name)]})
            named = f"node {node}: pattern {name} is missing (learned by this run)"
    assert knowledge_base_problems(expected, found) == [named]


def test_the_next_record_keeps_the_oldest_and_the_newest_probe_per_level():
    found = _record(nodes={"r-L0": (5, 9)}, probes=[(0, "r-L0", "PTRN|old", 3), (0, "r-L0", "PTRN|prev", 1),
                                                  (0, "r-L0", "PTRN|new", 2), (1, "r-L1", "PTRN|only", 1)])
    kept = next_record(found)
    assert [(p.level, p.name, p.frequency) for p in kept.probes] == [
        (0, "PTRN|old", 3), (0, "PTRN|new", 2), (1, "PTRN|only", 1)]
    assert kept.nodes == found.nodes and kept.database_id == "db-a"


# -- the journal: compacted as the checkpoint describes it, cut back to it ----------------------------------


def test_the_journal_is_compacted_up_to_the_check_and_cut_back_to_that_part(tmp_path):
    journal = Journal(tmp_path, {"run_name": "r", "config": {}})
    journal.step(1, 0, "keyed", "s1")
    journal.finished(1, trained=1, tokens=3, learns=[1])
    journal.step(2, 0, "keyed", "s2")
    upto = journal.size  # the checkpoint's check: samples 1 (finished) and 2 (in flight) are what it describes
    journal.step(2, 1, "keyed", "s2")  # written while the checkpoint is being written
    journal.finished(2, trained=1, tokens=4, learns=[2])
    compacted = journal.compact(1, upto=upto)
    state = read_journal(tmp_path / FILENAME)
    assert state.samples[2].finished is not None and state.samples[1].finished is not None  # nothing lost
    journal.step(3, 0, "keyed", "s3")
    journal.cut_back(compacted)
    state = read_journal(tmp_path / FILENAME)
    assert set(state.samples) == {1, 2} and state.samples[2].finished is None and state.samples[2].last_step == 0
    with pytest.raises(Exception, match="closed"):
        journal.step(4, 0, "keyed", "s4")
    assert (tmp_path / FILENAME).stat().st_size == compacted


# -- through the CLI, on a real server process ---------------------------------------------------------------


class ActOnce:
    """A FaultProxy ``match`` hook: runs ``action`` once, just before the first request ``when`` accepts is
    forwarded (the proxy waits for it); it injects no fault."""

    def __init__(self, when: Callable[[str, str], bool], action: Callable[[], None]) -> None:
        self.when, self.action = when, action
        self.fired = threading.Event()
        self.armed = True

    def __call__(self, method: str, path: str) -> bool:
        if self.armed and not self.fired.is_set() and self.when(method, path):
            self.fired.set()
            self.action()
        return False


def _nth(n: int, method: str, suffix: str, also: Callable[[], bool] = lambda: True) -> Callable[[str, str], bool]:
    seen = {"n": 0}

    def when(m: str, path: str) -> bool:
        if m == method and path.split("?")[0].endswith(suffix) and also():
            seen["n"] += 1
            return seen["n"] == n
        return False
    return when


def _copy_database(db: Path, copy: Path) -> None:
    """An online copy of a running server's database (sqlite3's backup API)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _restore(srv: EmbeddedServer, copy: Path) -> None:
    srv.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{srv.db_path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, srv.db_path)
    srv.start()


def _clear_node(url: str, node_id: str) -> None:
    """Another client clears the node: ``clear-all`` on a session of its own."""
    with httpx.Client(base_url=url) as http:
        sid = http.post("/sessions", json={"node_id": node_id}).json()["session_id"]
        assert http.post(f"/sessions/{sid}/clear-all").status_code == 200


def _database_id(url: str) -> str:
    return httpx.get(url + "/").json()["database_id"]


def _cli_train(cfg: RunConfig, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / f"{cfg.run_name}.json"
    path.write_text(cfg.model_dump_json())
    code = main(["train", "--config", str(path), "--no-progress"])
    return code, capsys.readouterr().err


def _assert_rolled_back(cfg: RunConfig, good_name: str | None) -> None:
    """The newest checkpoint is an error one repeating the last good one (or, with none, the run's start); the
    journal counts no sample past it."""
    entries = CheckpointStore(cfg.run_dir).entries()
    error = entries[-1].checkpoint
    assert error is not None and error.reason == "error" and "rolled back" in (error.error or "")
    if good_name is None:
        assert error.position.raw_offset == 0 and not error.has_progress and len(entries) == 1
        assert not read_journal(cfg.run_dir / FILENAME).samples
        return
    good = next(e.checkpoint for e in entries if e.path.name == good_name)
    assert good is not None and good.reason in ("interval", "end")
    assert (error.position, error.counters, error.failures) == (good.position, good.counters, good.failures)
    assert error.knowledge_base is not None and good.knowledge_base is not None
    assert error.knowledge_base.database_id == good.knowledge_base.database_id
    assert error.knowledge_base.nodes == good.knowledge_base.nodes or good.reason == "end"
    finished = {s for s, rec in read_journal(cfg.run_dir / FILENAME).samples.items() if rec.finished}
    assert all(s < good.position.raw_offset or s in good.position.done_above for s in finished)


@pytest.mark.parametrize("when", ["before-first-checkpoint", "mid-call", "at-the-end"])
def test_a_node_cleared_during_a_call_stops_it_and_the_run_resumes_exactly_from_a_copy(
        when, demo_corpus, tmp_path, reference, capsys):
    """Another client clears one of the run's nodes (a copy of the database is made just before): the call ends
    non-zero naming the node, what was expected and what was found, and is rolled back to its last good
    checkpoint; once the node is restored from the copy, one call ends the run with the uninterrupted KB."""
    srv = EmbeddedServer(tmp_path / "kb.sqlite3").start()
    copy = tmp_path / "copy.sqlite3"
    node = {"before-first-checkpoint": 0, "mid-call": 1, "at-the-end": 0}[when]
    try:
        client = ClientConfig(outage_seconds=30, read_timeout=10, samples_per_request=4)
        with FaultProxy(srv.url, fault_rate=0.0) as proxy:
            cfg = make_config(tmp_path, demo_corpus, f"cleared-{when}", proxy.url, client=client)
            good: str | None = None
            ckpts = lambda: sorted(cfg.run_dir.glob("ckpt-*.json"))  # noqa: E731

            def copy_then_clear() -> None:
                _copy_database(srv.db_path, copy)
                _clear_node(srv.url, cfg.node_id(node))

            if when == "before-first-checkpoint":
                hook = ActOnce(_nth(2, "POST", "/learn-batches", also=lambda: not ckpts()), copy_then_clear)
            elif when == "mid-call":
                hook = ActOnce(_nth(1, "POST", "/learn-batches", also=lambda: bool(ckpts())), copy_then_clear)
            else:  # a first call to 40 ends well; the second's end checkpoint (its only one) finds the change
                first = cfg.with_overrides(max_samples=40)
                assert _cli_train(first, tmp_path, capsys)[0] == EXIT_OK
                good = ckpts()[-1].name
                cfg = cfg.with_overrides(checkpoint_every=10_000)
                # the second call reads /nodes twice: at its start, then for its end checkpoint
                hook = ActOnce(_nth(2, "GET", "/nodes"), copy_then_clear)
            proxy.match = hook
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert hook.fired.is_set() and code == EXIT_ERROR, err
            assert f"node {cfg.node_id(node)}: expected" in err and "found" in err and "rolled back" in err, err
            assert "Traceback" not in err
            if when == "mid-call":
                good = CheckpointStore(cfg.run_dir).entries()[-2].path.name
                assert f"node {cfg.node_id(node)}: expected at least" in err, err  # totals went down
                assert main(["inspect", str(cfg.run_dir)]) == EXIT_OK  # the rollback shows there
                shown = capsys.readouterr().out
                assert "reason:      error: the knowledge base at" in shown and "rolled back" in shown, shown
            if when == "at-the-end":
                assert "found 0 (total frequency 0)" in err and f"the start of this call (resumed from {good})" in err
            _assert_rolled_back(cfg, good)
            hook.armed = False
            _restore(srv, copy)
            code, err = _cli_train(cfg.with_overrides(checkpoint_every=7), tmp_path, capsys)
            assert code == EXIT_OK, err
        assert CheckpointStore(cfg.run_dir).latest().reason == "end"
        assert kb_by_level(srv.url, cfg) == reference
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["batch", "keys"])
def test_a_server_restarted_on_another_database_stops_the_call_and_the_run_resumes_on_the_right_one(
        mode, demo_corpus, tmp_path, reference, capsys):
    """The server is restarted on an empty database mid-call: the call ends non-zero naming both database ids
    (found at the next checkpoint with learn-batches; with one keyed request per chunk, as soon as a worker finds
    its session gone). Restarted on the right database, one call ends the run with the uninterrupted KB."""
    srv = EmbeddedServer(tmp_path / "kb.sqlite3").start()
    right = _database_id(srv.url)
    other = EmbeddedServer(tmp_path / "other.sqlite3", port=srv.port)
    try:
        client = ClientConfig(outage_seconds=30, read_timeout=10, samples_per_request=4,
                              learn_batch=mode == "batch")
        with FaultProxy(srv.url, fault_rate=0.0) as proxy:
            cfg = make_config(tmp_path, demo_corpus, f"swapped-{mode}", proxy.url, client=client)

            def swap() -> None:
                srv.stop()
                other.start()

            learn = "/learn-batches" if mode == "batch" else "/observe-sequence"
            proxy.match = hook = ActOnce(_nth(1, "POST", learn, also=lambda: any(cfg.run_dir.glob("ckpt-*"))), swap)
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert hook.fired.is_set() and code == EXIT_ERROR, err
            wrong = _database_id(other.url)
            assert f"database id: expected {right}, found {wrong}" in err and "rolled back" in err, err
            if mode == "keys":
                assert "found when a session on node" in err, err
            _assert_rolled_back(cfg, CheckpointStore(cfg.run_dir).entries()[-2].path.name)
            hook.armed = False
            other.stop()
            srv.start()
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert code == EXIT_OK, err
        assert kb_by_level(srv.url, cfg) == reference
    finally:
        other.stop()
        srv.stop()


def test_without_idempotency_keys_the_message_says_what_a_restore_learns_again(demo_corpus, tmp_path, reference,
                                                                               capsys):
    """A server without keys (as a real KATO): a node cleared before the first checkpoint stops the call, and
    the message says the limit (what a restored copy holds from after the last good point is learned again).
    Restored from a copy made at the run's start, the resumed run leaves exactly the uninterrupted KB."""
    srv = EmbeddedServer(tmp_path / "kb.sqlite3", idempotency=False).start()
    copy = tmp_path / "copy.sqlite3"
    try:
        with FaultProxy(srv.url, fault_rate=0.0) as proxy:
            cfg = make_config(tmp_path, demo_corpus, "cleared-unkeyed", proxy.url)
            _copy_database(srv.db_path, copy)  # made at the start: it holds nothing of the run
            proxy.match = hook = ActOnce(_nth(3, "POST", "/observe-sequence"),
                                         lambda: _clear_node(srv.url, cfg.node_id(0)))
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert hook.fired.is_set() and code == EXIT_ERROR, err
            assert f"node {cfg.node_id(0)}: expected pattern" in err and "learned a second time" in err, err
            _assert_rolled_back(cfg, None)
            hook.armed = False
            _restore(srv, copy)
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert code == EXIT_OK, err
        assert kb_by_level(srv.url, cfg) == reference
    finally:
        srv.stop()


def test_a_run_stopped_before_it_could_check_is_rolled_back_on_a_server_with_keys(demo_corpus, tmp_path, reference,
                                                                                   capsys):
    """A node is cleared mid-call (a copy made just before), a request goes on into the cleared node, then every
    learn is answered 500 (a full disk): the run stops before a checkpoint could check the knowledge base, and its
    error checkpoint cannot move past what was checked. With idempotency keys it is rolled back, so once the node
    is restored from the copy the samples trained into the cleared node are trained again and the KB is exact."""
    srv = EmbeddedServer(tmp_path / "kb.sqlite3").start()
    copy = tmp_path / "copy.sqlite3"
    learns = {"after": 0}
    try:
        # one sample per request: the one request into the cleared node cannot bring on a checkpoint (which would
        # find the change itself) before the 500s stop the run
        client = ClientConfig(outage_seconds=2, read_timeout=5, samples_per_request=1)
        with FaultProxy(srv.url, fault_rate=1.0, kinds=["500"]) as proxy:
            cfg = make_config(tmp_path, demo_corpus, "unchecked", proxy.url, client=client)

            def match(method: str, path: str) -> bool:
                if method != "POST" or path != "/learn-batches" or not any(cfg.run_dir.glob("ckpt-*")):
                    return False
                if learns["after"] == 0:
                    _copy_database(srv.db_path, copy)
                    _clear_node(srv.url, cfg.node_id(0))
                learns["after"] += 1
                return learns["after"] > 1  # this request trains into the cleared node; the next ones fail

            proxy.match = match
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert code == EXIT_ERROR and "500" in err, err
            entries = CheckpointStore(cfg.run_dir).entries()
            error, good = entries[-1].checkpoint, entries[-2].checkpoint
            assert error.reason == "error" and "500" in error.error and "rolled back" in error.error, error.error
            assert (error.position, error.counters) == (good.position, good.counters)
            proxy.match = None
            proxy.fault_rate = 0.0
            _restore(srv, copy)
            code, err = _cli_train(cfg, tmp_path, capsys)
            assert code == EXIT_OK, err
        assert kb_by_level(srv.url, cfg) == reference
    finally:
        srv.stop()


def test_a_trainer_killed_during_the_rollback_resumes_exactly(demo_corpus, tmp_path, reference, zygote):
    """A node is cleared mid-call (a copy made just before); the proxy then holds every request on one worker's
    session, so the other worker trains on into the cleared node until the next checkpoint finds the change, and
    the rollback, after cutting the journal back, waits for the held worker. SIGKILL then: no error checkpoint
    was written, and once the node is restored from the copy the run resumes exactly (the journal's lines of the
    samples trained into the cleared node no longer count)."""
    srv = EmbeddedServer(tmp_path / "kb.sqlite3").start()
    copy = tmp_path / "copy.sqlite3"
    held: dict[str, str] = {}
    try:
        client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=False)
        with FaultProxy(srv.url, fault_rate=1.0, kinds=["stall"], stall_seconds=30) as proxy:
            cfg = make_config(tmp_path, demo_corpus, "killed-rollback", proxy.url, client=client, num_workers=2)

            def match(method: str, path: str) -> bool:
                if method != "POST" or not path.endswith("/observe-sequence"):
                    return False
                if not held and any(cfg.run_dir.glob("ckpt-*")):
                    _copy_database(srv.db_path, copy)
                    _clear_node(srv.url, cfg.node_id(0))
                    held["session"] = path.split("/")[2]  # this worker's requests are held from now on
                return path.split("/")[2] == held.get("session")

            proxy.match = match
            config = tmp_path / "run.json"
            config.write_text(cfg.model_dump_json())
            log = tmp_path / "child.log"
            child = zygote.spawn(train_command(config), log)
            deadline = time.monotonic() + 60
            read = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
            while "its journal no longer counts the samples finished since" not in read():
                assert child.poll() is None and time.monotonic() < deadline, read()[-3000:]
                time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            entries = CheckpointStore(cfg.run_dir).entries()
            assert entries and all(e.checkpoint and e.checkpoint.reason == "interval" for e in entries)
            proxy.match = None
            proxy.fault_rate = 0.0
            _restore(srv, copy)
            result = train(cfg, progress=False)
        assert result.reason == "end" and kb_by_level(srv.url, cfg) == reference
    finally:
        srv.stop()
