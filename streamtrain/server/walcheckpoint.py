"""Folding the write-ahead log into the database file from a background thread, off the requests' path.

SQLite's own auto-checkpoint runs inside the COMMIT that crosses its threshold: that request waits for the copy
of thousands of pages and two fsyncs (tens to hundreds of milliseconds on this project's disks, a third of the
time of a training run's learns). Here a thread with its own connection runs a PASSIVE checkpoint shortly after
commits, while the writer goes on; a commit's durability is unchanged (with ``synchronous=NORMAL`` a commit never
waited for a checkpoint's fsyncs to be durable against a process kill, and with ``FULL`` it fsyncs the WAL itself).
The writer keeps a high auto-checkpoint threshold as a backstop, should this thread fall behind.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BACKSTOP_PAGES = 65536      # the writer's own auto-checkpoint (256 MiB of 4 KiB pages): only if this thread lags


class WalCheckpointer:
    """A daemon thread that checkpoints `path`'s WAL at most every `interval` seconds after `nudge()`."""

    def __init__(self, path: Path, *, interval: float = 0.25) -> None:
        self.path = path
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.checkpoints = 0        # completed PASSIVE checkpoints (tests and logs)
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A commit happened: checkpoint soon."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread (it finishes a checkpoint in progress); the caller folds the rest in."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.warning("background WAL checkpoints of %s are off (cannot open it); the writer's own take over",
                        self.path, exc_info=True)
            return
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error:  # busy or I/O: the next nudge tries again, the writer's backstop bounds the WAL
                    log.debug("background WAL checkpoint of %s failed", self.path, exc_info=True)
                # coalesce: commits during this pause are folded in by one checkpoint
                if self._stopping.wait(self.interval):
                    return
        finally:
            conn.close()
