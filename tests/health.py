"""Does the server answer GET /health while a learn request waits for its store? Decided without a clock: the test
holds SQLite's write lock, so the request cannot finish until the test lets it; the server says when the request's
write transaction begins (announcing_server.py); /health is called then, and the request must still be unanswered.
A server that ran the request on its event loop would answer no /health until the request had ended (SQLite's
busy timeout, 5 s, then an error answer): the check fails, it cannot pass by timing."""

from __future__ import annotations

import http.client
import select
import sqlite3
import sys
import time
from pathlib import Path

import httpx

from streamtrain.server import EmbeddedServer

SCRIPT = Path(__file__).with_name("announcing_server.py")


class AnnouncingServer(EmbeddedServer):
    """An embedded server process whose store appends a line to ``marks`` as each write transaction begins."""

    def __init__(self, db_path: Path, marks: Path, **options) -> None:
        super().__init__(db_path, **options)
        self.marks = marks

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("-m")
        assert cmd[at + 1] == "streamtrain.server", cmd
        return [sys.executable, str(SCRIPT), str(self.marks), *cmd[at + 2:]]

    def transactions_begun(self) -> int:
        return len(self.marks.read_text().splitlines()) if self.marks.exists() else 0


def _answered(conn: http.client.HTTPConnection) -> bool:
    """Whether the server has sent (some of) its answer on ``conn``, without waiting."""
    assert conn.sock is not None
    return bool(select.select([conn.sock], [], [], 0)[0])


def health_while_a_request_waits_for_the_store(srv: AnnouncingServer, path: str, body: bytes,
                                               polls: int = 10) -> tuple[int, bytes]:
    """POST ``body`` (JSON) to ``path`` while this process holds the write lock of the server's database; once the
    server says the request's write transaction begins, call /health ``polls`` times (each must answer 200) and
    check the request is still unanswered; then release the lock. Returns the request's status and body."""
    lock = sqlite3.connect(srv.db_path, isolation_level=None, timeout=30)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        lock.execute("BEGIN IMMEDIATE")  # SQLite's write lock: the request's own BEGIN IMMEDIATE waits for it
        begun = srv.transactions_begun()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while srv.transactions_begun() == begun:
            assert not _answered(conn), "the request was answered before it reached the store"
            assert time.monotonic() < deadline, f"the request did not reach the store within 60 s:\n{srv.log_tail()}"
            time.sleep(0.005)
        with httpx.Client(base_url=srv.url, timeout=60) as health:
            for i in range(polls):
                assert health.get("/health").status_code == 200
                assert not _answered(conn), (
                    f"the request was answered while SQLite's write lock was held (before /health answer {i + 1}): "
                    "it did not wait for the store, or /health waited for it")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    try:
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()
