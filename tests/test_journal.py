"""The journal on its own: what it reads back, what it refuses, what compaction keeps, and a write that fails
halfway (a real file-size limit of the kernel, not a patched os.write)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamtrain.errors import JournalDamaged
from streamtrain.records.journal import FILENAME, Journal, read_journal

HEADER = {"run_name": "r", "config": {"run_name": "r"}}


def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path, HEADER)


def test_lines_read_back_per_sample(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.step(3, 0, "observe", "s1")
    j.step(3, 0, "learn", "s1")
    j.step(3, 1, "batch", "", end=9)
    j.finished(4, trained=1, tokens=10, learns=[2, 1])
    j.close()
    state = read_journal(tmp_path / FILENAME)
    assert state.header["run_name"] == "r"
    rec = state.samples[3]
    assert (rec.last_step, rec.last_phase, rec.last_end, rec.finished) == (1, "batch", 9, None)
    assert state.samples[4].finished["learns"] == [2, 1]


def test_any_text_of_an_error_is_written_as_ascii_and_read_back(tmp_path: Path) -> None:
    """Error messages are the one free text of a line: non-ASCII is escaped, and a lone surrogate (which the fast
    encoder refuses) is written all the same, as json.dumps writes it."""
    j = _journal(tmp_path)
    j.finished(1, trained=0, tokens=0, learns=[0], error="rejected: é \u2028")
    j.finished(2, trained=0, tokens=0, learns=[0], error="rejected: \ud800")
    j.close()
    assert (tmp_path / FILENAME).read_bytes().isascii()
    state = read_journal(tmp_path / FILENAME)
    assert state.samples[1].finished["error"] == "rejected: é \u2028"
    assert state.samples[2].finished["error"] == "rejected: \ud800"


def test_a_step_after_a_fin_line_starts_a_new_attempt(tmp_path: Path) -> None:
    """A failed sample retried by a later call: its old fin line no longer holds once the retry sends a step."""
    j = _journal(tmp_path)
    j.finished(7, trained=0, tokens=0, learns=[0], error="rejected", steps_done=2)
    assert read_journal(tmp_path / FILENAME).samples[7].finished["steps_done"] == 2
    j.step(7, 2, "keyed", "s")
    rec = read_journal(tmp_path / FILENAME).samples[7]
    assert rec.finished is None and rec.last_step == 2
    j.finished(7, trained=1, tokens=5, learns=[1])
    assert read_journal(tmp_path / FILENAME).samples[7].finished["error"] is None


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.step(1, 0, "keyed", "s")
    j.close()
    path = tmp_path / FILENAME
    with open(path, "ab") as fh:
        fh.write(b'{"s":2,"k":0,"p":"ke')
    assert set(read_journal(path).samples) == {1}
    j = _journal(tmp_path)  # reopening cuts the torn tail, so the next line is whole
    j.step(3, 0, "keyed", "s")
    j.close()
    assert set(read_journal(path).samples) == {1, 3}
    assert path.read_bytes().endswith(b"\n")


@pytest.mark.parametrize("line, what", [
    (b"\x8f\xff\n", "not JSON"),
    (b"null\n", "a JSON NoneType"),
    (b"[1, 2]\n", "a JSON list"),
    (b'{"s": "abc", "p": 1}\n', "not a valid StepLine"),
    (b'{"s": 1, "p": "fin", "trained": 5, "tokens": 1, "learns": []}\n', "not a valid FinLine"),
    (b'{"s": 1, "k": 0, "p": "observe", "sid": "x", "extra": 1}\n', "not a valid StepLine"),
])
def test_damage_is_named_with_file_line_and_the_ways_out(tmp_path: Path, line: bytes, what: str) -> None:
    j = _journal(tmp_path)
    j.step(1, 0, "keyed", "s")
    j.close()
    path = tmp_path / FILENAME
    with open(path, "ab") as fh:
        fh.write(line)
        fh.write(b'{"s":2,"k":0,"p":"keyed","sid":"s"}\n')
    with pytest.raises(JournalDamaged) as info:
        read_journal(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and what in message
    assert "restore" in message and "idempotency" in message


def test_compaction_keeps_what_a_resume_from_any_kept_checkpoint_needs(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    for s in range(10):
        j.step(s, 0, "keyed", "s")
        j.finished(s, trained=1, tokens=1, learns=[1])
    j.step(2, 0, "keyed", "s")  # a failure below the position, retried: kept whatever the position
    j.compact(keep_from=6, keep_also={2})
    j.step(11, 0, "keyed", "s")  # appends still work after the rewrite
    j.close()
    state = read_journal(tmp_path / FILENAME)
    assert sorted(state.samples) == [2, 6, 7, 8, 9, 11]
    assert state.header["run_name"] == "r"
    assert state.samples[7].finished is not None and state.samples[2].finished is None


def test_a_write_that_fails_halfway_leaves_only_whole_lines(tmp_path: Path) -> None:
    """A child process with a kernel file-size limit (RLIMIT_FSIZE): the append that crosses it fails halfway;
    the journal raises a clear CheckpointError and cuts the half line, so the file still reads back whole."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        from streamtrain.errors import CheckpointError
        from streamtrain.records.journal import Journal
        j = Journal({str(tmp_path)!r}, {HEADER!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            for s in range(1000):
                j.step(s, 0, "keyed", "session-" + "x" * 30)
        except CheckpointError as exc:
            print("stopped at", s, exc)
            sys.exit(0)
        sys.exit(1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot append to the journal" in done.stdout
    stopped_at = int(done.stdout.split()[2])
    path = tmp_path / FILENAME
    assert path.read_bytes().endswith(b"\n") and path.stat().st_size <= 2000
    assert sorted(read_journal(path).samples) == list(range(stopped_at))


def test_a_counted_step_keeps_its_counter_through_compaction(tmp_path: Path) -> None:
    """A "counted" line (counter protocol) carries the session's counter before the request; compaction keeps it."""
    j = _journal(tmp_path)
    j.step(5, 2, "counted", "s9", counter=96)
    j.step(6, 0, "counted", "s9", counter=0)
    j.compact(keep_from=5)
    j.close()
    rec = read_journal(tmp_path / FILENAME).samples[5]
    assert (rec.last_step, rec.last_phase, rec.last_session, rec.last_counter) == (2, "counted", "s9", 96)
    assert read_journal(tmp_path / FILENAME).samples[6].last_counter == 0
