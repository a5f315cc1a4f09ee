"""`python announcing_server.py MARKS SERVER-ARGS...`: the embedded server (`python -m streamtrain.server
SERVER-ARGS...`), whose store appends a line to the file MARKS each time a write transaction is about to begin
(before its BEGIN IMMEDIATE), naming the thread that begins it. A test holding SQLite's write lock then knows when
a request has reached the store and waits for that lock (health.py)."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

from streamtrain.server.cli import main
from streamtrain.server.store import Store

MARKS = sys.argv.pop(1)
_begin = Store.transaction


@contextmanager
def _announced(self: Store):
    with open(MARKS, "a", encoding="utf-8") as fh:
        fh.write(f"begin {threading.current_thread().name}\n")
    with _begin(self) as conn:
        yield conn


Store.transaction = _announced  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
